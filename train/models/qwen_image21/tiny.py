"""A tiny random Qwen-Image 2.1 pipeline: a Qwen3-VL text encoder, the 16x RGBA VAE, the
single-stream block-causal transformer.

The processor is ``train/models/qwen_image_edit/tiny.py``'s ``TinyQwen2VLProcessor`` (Qwen's
tokenizer with the vision placeholders, an image processor, no video processor: it builds without
torchvision) with a Qwen3-VL-style chat template, which the pipeline uses to count the system
tokens it drops. The real pipeline ships a ``Qwen3VLProcessor``; text-to-image reads only its
tokenizer and chat template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers.models.autoencoders.autoencoder_kl_qwenimage21 import AutoencoderKLQwenImage21
from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21Transformer2DModel
from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import QwenImage21Pipeline
from transformers import Qwen2VLImageProcessorPil, Qwen3VLForConditionalGeneration

from ..krea2.tiny import HIDDEN, qwen3_vl_config
from ..qwen_image_edit.tiny import MAX_PIXELS, MIN_PIXELS, TinyQwen2VLProcessor, write_edit_tokenizer
from ..tiny_common import dynamic_shift_scheduler

Z_DIM = 4  # latent channels (64 in the real VAE), read unpatched by the transformer
# Qwen3-VL's chat template, reduced to what the pipeline renders: a message's text parts
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def text_encoder(tok: Any) -> Qwen3VLForConditionalGeneration:
    """Krea 2's tiny Qwen3-VL with ``tok``'s placeholder ids, with its language-model head."""
    ids = [
        tok.convert_tokens_to_ids(t)
        for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
    ]
    return Qwen3VLForConditionalGeneration(qwen3_vl_config(len(tok), *ids))


def write_tiny_qwen_image21(folder: Path) -> Path:
    torch.manual_seed(0)
    folder = Path(folder)
    tok = write_edit_tokenizer(folder / "tokenizer")
    processor = TinyQwen2VLProcessor(
        # 16-pixel patches, as Qwen3-VL's vision tower takes them (Qwen2-VL's are 14)
        image_processor=Qwen2VLImageProcessorPil(patch_size=16, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
        tokenizer=tok,
        chat_template=CHAT_TEMPLATE,
    )
    vae = AutoencoderKLQwenImage21(
        base_dim=8,
        decoder_base_dim=8,
        z_dim=Z_DIM,
        dim_mult=[1, 2, 2, 2, 2],  # four spatial halvings: 16x, as the real one
        num_res_blocks=1,
        temperal_downsample=[False, True, True, True],
        latents_mean=[0.1, -0.2, 0.3, -0.1],
        latents_std=[1.5, 2.0, 2.5, 1.2],
    )
    transformer = QwenImage21Transformer2DModel(
        patch_size=1,
        in_channels=Z_DIM,
        out_channels=Z_DIM,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        context_in_dim=HIDDEN,
        mlp_ratio=2,
        axes_dims_rope=(4, 6, 6),
    )
    pipe = QwenImage21Pipeline(
        scheduler=dynamic_shift_scheduler(max_image_seq_len=4096, max_shift=1.15),
        vae=vae,
        text_encoder=text_encoder(tok),
        processor=processor,  # pyright: ignore[reportArgumentType]  (annotated Qwen3VLProcessor)
        transformer=transformer,
    )
    pipe.save_pretrained(folder)
    return folder


def write(folder: Path) -> Path:
    return write_tiny_qwen_image21(folder)
