"""LTX-2's denoiser at full size (torch-free): the ``transformer/config.json`` of Lightricks/LTX-2, whose
values are ``LTX2VideoTransformer3DModel``'s defaults in diffusers 0.42.1 with split RoPE (diffusers'
LTX-2 conversion script)."""

from __future__ import annotations

from typing import Any

DENOISER_CLASS = "LTX2VideoTransformer3DModel"
LTX2: dict[str, Any] = {
    "in_channels": 128,
    "out_channels": 128,
    "num_attention_heads": 32,
    "attention_head_dim": 128,
    "cross_attention_dim": 4096,
    "audio_in_channels": 128,
    "audio_out_channels": 128,
    "audio_num_attention_heads": 32,
    "audio_attention_head_dim": 64,
    "audio_cross_attention_dim": 2048,
    "num_layers": 48,
    "caption_channels": 3840,
    "rope_type": "split",
}
DENOISERS: dict[str, dict[str, Any]] = {"ltx-2": LTX2}
