"""FLUX.3 [klein]'s denoisers at full size (torch-free): ``Flux3Transformer2DModel``'s defaults,
which diffusers documents as the model's; the distilled variant adds the flow-map time embedding."""

from __future__ import annotations

from typing import Any

DENOISER_CLASS = "Flux3Transformer2DModel"
TRANSFORMER: dict[str, Any] = dict(
    in_channels=128,
    cond_in_channels=128,
    num_layers=5,
    num_single_layers=28,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=20480,
    timestep_channels=256,
    mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32),
)
DENOISERS: dict[str, dict[str, Any]] = {
    "flux3-klein": TRANSFORMER,
    "flux3-klein-distilled": {**TRANSFORMER, "flow_map": True},
}
