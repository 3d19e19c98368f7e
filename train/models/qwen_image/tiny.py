"""A tiny random Qwen-Image pipeline: Qwen2.5-VL text encoder, 3D (video-style) VAE, MMDiT.

The tokenizer is a byte-level BPE like Qwen2's, built offline. ``QwenImagePipeline`` drops the
first 34 tokens of its prompt template (the system prompt) by position, so the tiny vocabulary
has merges that make every word of that template one token, as the real Qwen2 vocabulary does;
``write_qwen_tokenizer`` checks the count. ``train/models/z_image/tiny.py`` uses the same builder with
Qwen3's chat template.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.models.autoencoders.autoencoder_kl_qwenimage import AutoencoderKLQwenImage
from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformer2DModel
from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from ..tiny_common import dynamic_shift_scheduler

QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN_HIDDEN = 32  # the tiny encoder's width -> the transformer's joint_attention_dim
Z_DIM = 4  # tiny latent channels (the real VAE has 16); the transformer packs 2x2 of them
# Words the pipelines' prompt templates are made of, each one token in the tiny vocabulary: bare
# where the template has them after a newline, after a space elsewhere (only those forms: merge
# chains of other forms would compete with these and split the words).
_TEMPLATE_WORDS = ["system", "user", "assistant", "Describe"] + [
    " " + w
    for w in (
        "the image by detailing color shape size texture quantity text spatial relationships "
        "of objects and background"
    ).split()
]


def _word_merges(words: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """The tokens and BPE merges that build each word left to right."""
    tokens: list[str] = []
    merges: list[tuple[str, str]] = []
    seen: set[str] = set()
    for word in words:
        symbols = _bytes_to_unicode(word)
        acc = symbols[0]
        for ch in symbols[1:]:
            merged = acc + ch
            if merged not in seen:
                seen.add(merged)
                tokens.append(merged)
                merges.append((acc, ch))
            acc = merged
    return tokens, merges


def _bytes_to_unicode(text: str) -> str:
    """``text`` in the byte-level alphabet (GPT-2's byte -> printable character table)."""
    table = _byte_table()
    return "".join(table[b] for b in text.encode("utf-8"))


def _byte_table() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def write_qwen_tokenizer(folder: Path, chat_template: str | None = None) -> Qwen2Tokenizer:
    """A Qwen2 byte-level BPE tokenizer (the 256 byte symbols, template-word merges, Qwen's
    special tokens) saved to ``folder``; returns it loaded back."""
    alphabet = sorted(set(_byte_table().values()))
    words, merges = _word_merges(_TEMPLATE_WORDS)
    vocab = {s: i for i, s in enumerate([*alphabet, *words])}
    for special in QWEN_SPECIALS:
        vocab[special] = len(vocab)
    # merges as (left, right) pairs, what the tokenizers BPE takes (transformers annotates strings)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=131072)  # pyright: ignore[reportArgumentType]
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIALS[1:])})
    if chat_template is not None:
        tok.chat_template = chat_template
    tok.save_pretrained(folder)
    tok = Qwen2Tokenizer.from_pretrained(folder)
    return tok


def _check_template(tok: Qwen2Tokenizer) -> None:
    pipe_cls = QwenImagePipeline
    template = "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
    n = len(tok(template).input_ids)
    assert n == 34, (
        f"the tiny Qwen tokenizer splits {pipe_cls.__name__}'s system prompt into {n} tokens, not 34"
    )


def text_encoder(vocab_size: int) -> Qwen2_5_VLForConditionalGeneration:
    """A 2-layer Qwen2.5-VL of width ``QWEN_HIDDEN`` (its vision tower shrunk too; unused for text)."""
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": QWEN_HIDDEN,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "vocab_size": vocab_size,
            "max_position_embeddings": 2048,
            # Qwen's <|endoftext|> and <|im_end|>: the last special tokens of the tiny vocabulary
            "bos_token_id": vocab_size - 3,
            "eos_token_id": vocab_size - 1,
            "pad_token_id": vocab_size - 3,
            "rope_scaling": {"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": QWEN_HIDDEN,
        },
        # image / video placeholders: ids inside the tiny vocabulary (never in a text prompt)
        vision_start_token_id=0,
        vision_end_token_id=1,
        image_token_id=2,
        video_token_id=3,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def qwen_vae() -> AutoencoderKLQwenImage:
    """The Qwen-Image VAE's layout, tiny: 8x (three spatial halvings, one temporal), ``Z_DIM``
    channels, with per-channel statistics the pipelines normalise with (the real ones are measured)."""
    return AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=Z_DIM,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.3, -0.1],
        latents_std=[1.5, 2.0, 2.5, 1.2],
    )


def write_tiny_qwen_image(folder: Path, zero_cond_t: bool = False) -> Path:
    """Write a tiny Qwen-Image pipeline: 8x VAE (three spatial halvings, one temporal), 2x2 patches;
    ``zero_cond_t``: Qwen-Image-Edit-2511's transformer option."""
    torch.manual_seed(0)
    folder = Path(folder)
    tok = write_qwen_tokenizer(folder / "tokenizer")
    _check_template(tok)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=Z_DIM * 4,
        out_channels=Z_DIM,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=QWEN_HIDDEN,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
        zero_cond_t=zero_cond_t,
    )
    pipe = QwenImagePipeline(
        # Qwen/Qwen-Image's scheduler config: resolution-dependent exponential shift
        scheduler=dynamic_shift_scheduler(max_image_seq_len=8192, max_shift=0.9, shift_terminal=0.02),
        vae=qwen_vae(),
        text_encoder=text_encoder(len(tok)),
        tokenizer=tok,
        transformer=transformer,
    )
    pipe.save_pretrained(folder)
    return folder


def write(folder: Path) -> Path:
    return write_tiny_qwen_image(folder)
