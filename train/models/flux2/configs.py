"""FLUX.2 [dev]'s denoiser at full size (torch-free): black-forest-labs/FLUX.2-dev's
``transformer/config.json`` (diffusers' ``convert_flux2_to_diffusers``): 8 double + 48 single blocks,
48 heads x 128, 128 latent channels, the Mistral-3 text states of three layers stacked (15360 wide),
a guidance embedding. Built on the meta device by the shape tests."""

from __future__ import annotations

from typing import Any

DENOISER_CLASS = "Flux2Transformer2DModel"
FLUX2_DEV: dict[str, Any] = dict(
    patch_size=1,
    in_channels=128,
    num_layers=8,
    num_single_layers=48,
    attention_head_dim=128,
    num_attention_heads=48,
    joint_attention_dim=15360,
    timestep_guidance_channels=256,
    mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32),
    rope_theta=2000,
    guidance_embeds=True,
)
DENOISERS: dict[str, dict[str, Any]] = {"flux2-dev": FLUX2_DEV}
