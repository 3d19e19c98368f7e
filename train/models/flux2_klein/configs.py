"""FLUX.2 [klein]'s denoisers at full size (torch-free), from black-forest-labs/FLUX.2-klein-4B and
-9B's ``transformer/config.json`` (the base models share them): Flux.2 [dev]'s blocks, fewer and
narrower, no guidance embedding; the text width is three Qwen3 layers stacked (4B: 3 x 2560, 9B:
3 x 4096)."""

from __future__ import annotations

from typing import Any

from ..flux2.configs import FLUX2_DEV

DENOISER_CLASS = "Flux2Transformer2DModel"
KLEIN_4B: dict[str, Any] = {
    **FLUX2_DEV,
    "num_layers": 5,
    "num_single_layers": 20,
    "num_attention_heads": 24,
    "joint_attention_dim": 7680,
    "guidance_embeds": False,
}
KLEIN_9B: dict[str, Any] = {
    **FLUX2_DEV,
    "num_layers": 8,
    "num_single_layers": 24,
    "num_attention_heads": 32,
    "joint_attention_dim": 12288,
    "guidance_embeds": False,
}
DENOISERS: dict[str, dict[str, Any]] = {
    "flux2-klein-4b": KLEIN_4B,
    "flux2-klein-9b": KLEIN_9B,
    "flux2-klein-base-4b": KLEIN_4B,
    "flux2-klein-base-9b": KLEIN_9B,
}
