"""Qwen-Image 2.1's denoiser at full size (torch-free): ``QwenImage21Transformer2DModel``'s defaults,
which are Qwen/Qwen-Image-2.1's (32 single-stream blocks, 32 heads x 128, Qwen3-VL-8B's 4096-wide
states, 64 unpatched latent channels)."""

from __future__ import annotations

from typing import Any

DENOISER_CLASS = "QwenImage21Transformer2DModel"
TRANSFORMER: dict[str, Any] = dict(
    patch_size=1,
    in_channels=64,
    out_channels=64,
    num_layers=32,
    attention_head_dim=128,
    num_attention_heads=32,
    context_in_dim=4096,
    mlp_ratio=3,
    axes_dims_rope=(16, 56, 56),
    causal_condition=True,
)
DENOISERS: dict[str, dict[str, Any]] = {"qwen-image-2.1": TRANSFORMER, "qwen-image-2.1-edit": TRANSFORMER}
