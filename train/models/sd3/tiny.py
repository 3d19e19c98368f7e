"""Tiny random Stable Diffusion 3.5 pipelines (Large: MMDiT; Medium: MMDiT-X, dual attention).

The real structure, shrunk: CLIP-L and CLIP-G (hidden states concatenated, zero-padded to the T5
width and stacked before the T5 tokens), T5 tokens, the two CLIP pooled outputs concatenated into
``pooled_projections``, a VAE with SD3's scaling and shift (4 channels, not 16), 2x2 patches, and for the
Medium variant a block whose image stream has a second self-attention (``attn2``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import StableDiffusion3Pipeline
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5Tokenizer

from ..tiny_common import CLIP_HIDDEN, clip_config, t5_encoder, vae, write_clip_tokenizer, write_t5_tokenizer

# The T5 width is the joint attention width; wider than the two CLIP widths together (as 4096 is
# wider than 768 + 1280) so the pipeline's zero-padding of the CLIP hidden states happens here too.
T5_WIDTH = 2 * CLIP_HIDDEN + 16


def write_tiny_sd3(folder: Path, variant: str = "large") -> Path:
    """Write a tiny SD3.5 pipeline (``variant`` "large": plain MMDiT blocks; "medium": the first
    block with dual attention, as SD3.5 Medium's blocks 0-12)."""
    assert variant in ("large", "medium")
    torch.manual_seed(0)
    folder = Path(folder)
    tok_dirs = [folder / "tokenizer", folder / "tokenizer_2", folder / "tokenizer_3"]
    clip_vocab = write_clip_tokenizer(tok_dirs[0])
    write_clip_tokenizer(tok_dirs[1])
    t5_vocab = write_t5_tokenizer(tok_dirs[2])
    transformer = SD3Transformer2DModel(
        sample_size=8,  # 64 px by default
        patch_size=2,
        in_channels=4,  # 16 in SD3.5: a width, shrunk like the others (16-value patches, 32 wide)
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=2 * CLIP_HIDDEN,
        pos_embed_max_size=64,  # up to 1024 px (64 patches a side), as the run entry's sizes need
        qk_norm="rms_norm",
        dual_attention_layers=(0,) if variant == "medium" else (),
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # SD3.5's scheduler config
        vae=vae(
            4, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False
        ),
        text_encoder=CLIPTextModelWithProjection(clip_config(clip_vocab)),
        tokenizer=CLIPTokenizer.from_pretrained(tok_dirs[0]),
        text_encoder_2=CLIPTextModelWithProjection(clip_config(clip_vocab)),
        tokenizer_2=CLIPTokenizer.from_pretrained(tok_dirs[1]),
        text_encoder_3=t5_encoder(t5_vocab, T5_WIDTH),
        tokenizer_3=T5Tokenizer.from_pretrained(tok_dirs[2]),
    )
    pipe.save_pretrained(folder)
    return folder


def write(folder: Path, variant: str = "large") -> Path:
    return write_tiny_sd3(folder, variant)
