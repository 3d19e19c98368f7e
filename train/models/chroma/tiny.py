"""A tiny random Chroma pipeline: T5 only (with its attention mask), a Flux-shaped transformer
whose modulation comes from the distilled-guidance approximator instead of per-block layers."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.models.transformers.transformer_chroma import ChromaTransformer2DModel
from diffusers.pipelines.chroma.pipeline_chroma import ChromaPipeline
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
from transformers import T5Tokenizer

from ..tiny_common import T5_DMODEL, t5_encoder, vae, write_t5_tokenizer


def write_tiny_chroma(folder: Path) -> Path:
    """Write a tiny Chroma pipeline (one double and one single block)."""
    torch.manual_seed(0)
    folder = Path(folder)
    t5_vocab = write_t5_tokenizer(folder / "tokenizer")
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels in 2x2 packed patches
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_DMODEL,
        axes_dims_rope=(4, 6, 6),
        approximator_num_channels=16,
        approximator_hidden_dim=32,
        approximator_layers=1,
    )
    # Chroma1-HD's scheduler config: Flux's resolution-dependent (exponential) shift
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = ChromaPipeline(
        scheduler=scheduler,
        vae=vae(
            4, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False
        ),
        text_encoder=t5_encoder(t5_vocab),
        tokenizer=T5Tokenizer.from_pretrained(folder / "tokenizer"),
        transformer=transformer,
    )
    pipe.save_pretrained(folder)
    return folder


def write(folder: Path) -> Path:
    return write_tiny_chroma(folder)
