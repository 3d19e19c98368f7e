"""A tiny random SDXL pipeline (two CLIP text encoders, ``text_time`` added conditioning)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .common import CLIP_HIDDEN, clip_config, vae, write_clip_tokenizer


def write_tiny_sdxl(folder: Path, prediction_type: str = "epsilon") -> Path:
    """Write a tiny SDXL pipeline (two CLIP text encoders, ``text_time`` conditioning)."""
    torch.manual_seed(0)
    folder = Path(folder)
    vocab = write_clip_tokenizer(folder / "tokenizer")
    write_clip_tokenizer(folder / "tokenizer_2")
    time_dim = 8
    # A config mapping: diffusers annotates the per-block tuples as one-item tuples.
    unet_config: dict[str, Any] = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * CLIP_HIDDEN,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + CLIP_HIDDEN,
        use_linear_projection=True,
        norm_num_groups=32,
    )
    unet = UNet2DConditionModel(**unet_config)
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        timestep_spacing="leading",
        steps_offset=1,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae(4, scaling_factor=0.13025),
        text_encoder=CLIPTextModel(clip_config(vocab)),
        text_encoder_2=CLIPTextModelWithProjection(clip_config(vocab)),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
        unet=unet,
        # diffusers types this as the enum of Karras schedulers' names, not a scheduler instance
        scheduler=scheduler,  # pyright: ignore[reportArgumentType]
        add_watermarker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def write(folder: Path, prediction_type: str = "epsilon") -> Path:
    return write_tiny_sdxl(folder, prediction_type)
