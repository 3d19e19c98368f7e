"""Qwen-Image's denoiser at full size (torch-free): Qwen/Qwen-Image's ``transformer/config.json``
(60 dual-stream blocks, 24 heads x 128, Qwen2.5-VL's 3584-wide text states); Qwen-Image-2512 and the
Edit models share it."""

from __future__ import annotations

from typing import Any

DENOISER_CLASS = "QwenImageTransformer2DModel"
TRANSFORMER: dict[str, Any] = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=60,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=3584,
    guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
)
DENOISERS: dict[str, dict[str, Any]] = {"qwen-image": TRANSFORMER, "qwen-image-2512": TRANSFORMER}
