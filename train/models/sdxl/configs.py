"""SDXL's UNet as configuration mappings (torch-free): the published full-size one
(stabilityai/stable-diffusion-xl-base-1.0 ``unet/config.json``), which the benchmarks build with
random weights, and the tiny one the tiny writer builds."""

from __future__ import annotations

from typing import Any

UNET: dict[str, Any] = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    use_linear_projection=True,
)
DENOISER_CLASS = "UNet2DConditionModel"
DENOISERS: dict[str, dict[str, Any]] = {"sdxl": UNET}
# Tiny: two levels, the tiny CLIPs' 32-wide hidden states concatenated (64), 8-wide time embeddings.
UNET_TINY: dict[str, Any] = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=(2, 4),
    transformer_layers_per_block=(1, 1),
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32,
    use_linear_projection=True,
    norm_num_groups=32,
)
