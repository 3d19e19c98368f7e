"""Tiny random Flux.1 pipelines (dev: guidance embedding; schnell: none)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
from transformers import CLIPTextModel, CLIPTokenizer, T5Tokenizer

from ..tiny_common import (
    CLIP_HIDDEN,
    T5_DMODEL,
    clip_config,
    t5_encoder,
    vae,
    write_clip_tokenizer,
    write_t5_tokenizer,
)
from .configs import TRANSFORMER_TINY


def write_tiny_flux(folder: Path, variant: str = "dev", num_single_layers: int = 1) -> Path:
    """Write a tiny Flux.1 pipeline (``variant`` "dev": guidance embedding; "schnell": none)."""
    assert variant in ("dev", "schnell")
    torch.manual_seed(0)
    folder = Path(folder)
    tok_dir, tok2_dir = folder / "tokenizer", folder / "tokenizer_2"
    clip_vocab = write_clip_tokenizer(tok_dir)
    t5_vocab = write_t5_tokenizer(tok2_dir)
    t5 = t5_encoder(t5_vocab)
    config = {**TRANSFORMER_TINY, "num_single_layers": num_single_layers, "guidance_embeds": variant == "dev"}
    assert config["joint_attention_dim"] == T5_DMODEL and config["pooled_projection_dim"] == CLIP_HIDDEN
    transformer = FluxTransformer2DModel(**config)
    if variant == "dev":
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae(
            4, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False
        ),
        text_encoder=CLIPTextModel(clip_config(clip_vocab)),
        tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
        text_encoder_2=t5,
        tokenizer_2=T5Tokenizer.from_pretrained(tok2_dir),
        transformer=transformer,
    )
    pipe.save_pretrained(folder)
    return folder


def write(folder: Path, variant: str = "dev") -> Path:
    return write_tiny_flux(folder, variant)
