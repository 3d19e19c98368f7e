"""A tiny random SDXL pipeline (two CLIP text encoders, ``text_time`` added conditioning)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..tiny_common import CLIP_HIDDEN, clip_config, vae, write_clip_tokenizer
from .configs import UNET_TINY


def write_tiny_sdxl(folder: Path, prediction_type: str = "epsilon") -> Path:
    """Write a tiny SDXL pipeline (two CLIP text encoders, ``text_time`` conditioning)."""
    torch.manual_seed(0)
    folder = Path(folder)
    vocab = write_clip_tokenizer(folder / "tokenizer")
    write_clip_tokenizer(folder / "tokenizer_2")
    assert UNET_TINY["cross_attention_dim"] == 2 * CLIP_HIDDEN  # the two tiny CLIPs' hidden states
    unet = UNet2DConditionModel(**UNET_TINY)
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
