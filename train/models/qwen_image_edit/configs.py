"""Qwen-Image-Edit's denoisers at full size (torch-free): Qwen/Qwen-Image-Edit and -Edit-2509's
``transformer/config.json`` are Qwen-Image's (the controls enter as more tokens, not weights)."""

from __future__ import annotations

from typing import Any

from ..qwen_image.configs import TRANSFORMER

DENOISER_CLASS = "QwenImageTransformer2DModel"
DENOISERS: dict[str, dict[str, Any]] = {
    "qwen-image-edit": TRANSFORMER,
    "qwen-image-edit-plus": TRANSFORMER,
    # -2511: the same sizes; the controls' tokens are modulated at time 0
    "qwen-image-edit-2511": {**TRANSFORMER, "zero_cond_t": True},
}
