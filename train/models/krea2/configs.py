"""Krea 2's denoiser at full size (torch-free): ``Krea2Transformer2DModel``'s defaults, which are
Krea 2's published architecture (28 blocks, 48 heads x 128, 12 key-value heads, a 16384-wide SwiGLU,
twelve tapped 2560-wide Qwen3-VL-4B states fused by 2 + 2 text blocks)."""

from __future__ import annotations

from typing import Any

DENOISER_CLASS = "Krea2Transformer2DModel"
TRANSFORMER: dict[str, Any] = dict(
    in_channels=64,
    num_layers=28,
    attention_head_dim=128,
    num_attention_heads=48,
    num_key_value_heads=12,
    intermediate_size=16384,
    timestep_embed_dim=256,
    text_hidden_dim=2560,
    num_text_layers=12,
    text_num_attention_heads=20,
    text_num_key_value_heads=20,
    text_intermediate_size=6912,
    num_layerwise_text_blocks=2,
    num_refiner_text_blocks=2,
    axes_dims_rope=(32, 48, 48),
    rope_theta=1000.0,
)
DENOISERS: dict[str, dict[str, Any]] = {"krea2": TRANSFORMER}
