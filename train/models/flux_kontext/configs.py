"""FLUX.1 Kontext [dev]'s denoiser at full size (torch-free): black-forest-labs/FLUX.1-Kontext-dev's
``transformer/config.json`` is FLUX.1-dev's (the control image enters as more tokens, not weights)."""

from __future__ import annotations

from typing import Any

from ..flux.configs import TRANSFORMER

DENOISER_CLASS = "FluxTransformer2DModel"
DENOISERS: dict[str, dict[str, Any]] = {"flux1-kontext-dev": TRANSFORMER}
