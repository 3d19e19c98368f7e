"""Tiny random Qwen-Image-Edit pipelines (``QwenImageEditPipeline``, or with ``plus``
``QwenImageEditPlusPipeline``): the tiny Qwen-Image VAE, transformer and scheduler, a Qwen2.5-VL
text encoder whose vision tower reads the control image, and a ``processor``.

The pipelines build their prompt with an edit template and drop its first 64 tokens (the system
prompt, ``prompt_template_encode_start_idx``) by position: the tiny vocabulary has merges that
make each word of that system prompt one token, as the real Qwen2 vocabulary does (the pretokens
of Qwen2's split pattern), and ``check_edit_template`` counts them. The image placeholders
(``<|vision_start|>``, ``<|image_pad|>``, ``<|vision_end|>``) are special tokens whose ids the
text encoder's config names, so the processor's expanded ``<|image_pad|>`` run is where the VL
puts its vision tower's features, as in the real model.

One difference from the published repos: their ``processor`` folder is a ``Qwen2VLProcessor``,
which transformers 5 loads only with a video processor, and video processors need torchvision.
The pipelines call only ``processor(text=..., images=..., padding=True, return_tensors="pt")``,
so the tiny one is ``TinyQwen2VLProcessor``: the same class without its video part (the same
image processor, ``Qwen2VLImageProcessorPil``, the same placeholder expansion), saved and loaded
the same way (diffusers records it by its module path in ``model_index.json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import QwenImageEditPipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import QwenImageEditPlusPipeline
from transformers import ProcessorMixin, Qwen2Tokenizer, Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ..qwen_image.tiny import QWEN_SPECIALS, _byte_table, _word_merges, text_encoder, write_tiny_qwen_image

# Qwen2.5-VL's image placeholders; placed before QWEN_SPECIALS so those stay the vocabulary's last
# three (text_encoder() takes its bos / eos / pad ids from there)
VISION_SPECIALS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
_VISION_IDS = (
    "vision_start_token_id",
    "vision_end_token_id",
    "image_token_id",
    "video_token_id",
)  # config names
EDIT_DROPPED_TOKENS = 64  # both pipelines' prompt_template_encode_start_idx (the system prompt)
# The system prompt's pretokens (Qwen2's split pattern): the ones after a space first, so their
# merge chains outrank the bare words' (whose merges, such as "c"+"o" of "color", would otherwise
# split " consistency"); the bare ones follow a newline, a bracket or a letter.
_EDIT_SPACED = (
    " the key features of input image ( shape size texture objects background then explain how "
    "user text instruction should alter or modify Generate a new that meets requirements while "
    "maintaining consistency with original where appropriate"
).split(" ")
_EDIT_WORDS = [" " + w for w in dict.fromkeys(_EDIT_SPACED) if w] + [
    "system",
    "user",
    "assistant",
    "Describe",
    "color",
    "),",
    "'s",
]
# Qwen2.5-VL's image processor (its patch 14, merge 2 and min_pixels), with max_pixels shrunk like
# the widths: the real 12845056 lets the VL read Qwen-Image-Edit's ~1 MP control at full size
# (1369 image tokens, seconds of CPU per prompt here); the tiny one reads it at ~224x224 (64 tokens).
MIN_PIXELS, MAX_PIXELS = 56 * 56, 224 * 224


# diffusers loads a component of a module outside diffusers / transformers with the load method of
# the first base class it finds *in that module* by name: ProcessorMixin (from_pretrained)
__all__ = ["ProcessorMixin", "TinyQwen2VLProcessor", "write"]


class TinyQwen2VLProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` for images and text only: it builds and loads without torchvision."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs: Any):
        # the sub-processors are the __init__ parameters: image_processor and tokenizer (the parent
        # passes its video_processor=None third, which the fewer attributes leave out)
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def write_edit_tokenizer(folder: Path) -> Qwen2Tokenizer:
    """Qwen2's byte-level BPE with the edit template's words as merges and Qwen's special tokens,
    the vision placeholders among them, saved to ``folder``; returns it loaded back."""
    alphabet = sorted(set(_byte_table().values()))
    words, merges = _word_merges(_EDIT_WORDS)
    vocab = {s: i for i, s in enumerate([*alphabet, *words, *VISION_SPECIALS, *QWEN_SPECIALS])}
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=131072)  # pyright: ignore[reportArgumentType]
    tok.add_special_tokens({"additional_special_tokens": [*VISION_SPECIALS, *QWEN_SPECIALS[1:]]})
    tok.save_pretrained(folder)
    return Qwen2Tokenizer.from_pretrained(folder)


def check_edit_template(pipe: Any) -> None:
    """The pipeline drops ``prompt_template_encode_start_idx`` tokens: its system prompt, each of
    its pretokens one token, as in the real vocabulary."""
    template, drop = pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx
    system = template[: template.index("<|im_start|>user\n") + len("<|im_start|>user\n")]
    ids = pipe.tokenizer(system).input_ids
    assert len(ids) == drop == EDIT_DROPPED_TOKENS, (
        f"the tiny Qwen tokenizer splits {type(pipe).__name__}'s system prompt into {len(ids)} tokens, "
        f"not the {drop} the pipeline drops"
    )


def vl_text_encoder(tok: Qwen2Tokenizer) -> Any:
    """Qwen-Image's tiny Qwen2.5-VL with the placeholder ids of ``tok``."""
    model = text_encoder(len(tok))
    config = model.config
    ids = {
        name: tok.convert_tokens_to_ids(token)
        for name, token in zip(_VISION_IDS, VISION_SPECIALS, strict=True)
    }
    for name, token_id in ids.items():
        setattr(config, name, token_id)
    return model


def write_tiny_qwen_image_edit(folder: Path, plus: bool = False, zero_cond_t: bool = False) -> Path:
    """Write a tiny Qwen-Image-Edit (``plus``: Edit Plus; ``zero_cond_t``: -2511's transformer) pipeline
    into ``folder``."""
    folder = Path(folder)
    write_tiny_qwen_image(
        folder, zero_cond_t
    )  # the VAE, transformer and scheduler (text parts replaced below)
    base = QwenImagePipeline.from_pretrained(folder)
    tok = write_edit_tokenizer(folder / "tokenizer")
    pipe_cls = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    torch.manual_seed(1)
    processor = TinyQwen2VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
        tokenizer=tok,
    )
    pipe = pipe_cls(
        scheduler=base.scheduler,
        vae=base.vae,
        text_encoder=vl_text_encoder(tok),
        tokenizer=tok,
        processor=processor,
        transformer=base.transformer,
    )
    check_edit_template(pipe)
    pipe.save_pretrained(folder)
    return folder


def write(folder: Path, plus: bool = False, zero_cond_t: bool = False) -> Path:
    return write_tiny_qwen_image_edit(folder, plus=plus, zero_cond_t=zero_cond_t)
