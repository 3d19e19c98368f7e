"""SD3.5's denoisers at full size (torch-free): stabilityai/stable-diffusion-3.5-large and -medium's
``transformer/config.json``. Medium is MMDiT-X: a second image self-attention in blocks 0-12."""

from __future__ import annotations

from typing import Any

DENOISER_CLASS = "SD3Transformer2DModel"
_COMMON: dict[str, Any] = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    attention_head_dim=64,
    joint_attention_dim=4096,
    pooled_projection_dim=2048,
    qk_norm="rms_norm",
)
DENOISERS: dict[str, dict[str, Any]] = {
    "sd3.5-large": {
        **_COMMON,
        "num_layers": 38,
        "num_attention_heads": 38,
        "caption_projection_dim": 2432,
        "pos_embed_max_size": 192,
    },
    "sd3.5-medium": {
        **_COMMON,
        "num_layers": 24,
        "num_attention_heads": 24,
        "caption_projection_dim": 1536,
        "pos_embed_max_size": 384,
        "dual_attention_layers": tuple(range(13)),
    },
}
