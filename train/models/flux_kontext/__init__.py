"""FLUX.1 Kontext [dev]: the registry entry (torch-free). Maths: ``family.py`` (FLUX.1's, with the
control image's tokens in the sequence); tiny pipeline: ``tiny.py``."""

from __future__ import annotations

from dataclasses import replace

from ..flux import FLUX_DEV, FLUX_DEV_SHAPE, estimated

ORDER = 30

# black-forest-labs/FLUX.1-Kontext-dev: FLUX.1-dev's 11.9 B transformer and text encoders, trained
# to edit: the control image's latents join the sequence after the target's (position ids with a
# first coordinate of 1). Model card: 28 steps, guidance 2.5. Activations per token are FLUX.1-dev's
# measured ones; the step time scales with the sequence, which holds twice the image tokens.
FLUX_KONTEXT_DEV = replace(
    FLUX_DEV,
    id="flux1-kontext-dev",
    family="flux_kontext",
    title="FLUX.1 Kontext [dev]",
    short_name="FLUX.1-Kontext-dev",
    base_weights="black-forest-labs/FLUX.1-Kontext-dev",
    pipeline="FluxKontextPipeline",
    render_guidance=2.5,
    kohya_architecture="flux-1-kontext-dev/lora",
    step_s=estimated(replace(FLUX_DEV_SHAPE, tokens=2 * 4096 + 512))["step_s"],
    max_controls=1,
    controls_required=True,
    tiny={"variant": "dev"},
)

MODELS = (FLUX_KONTEXT_DEV,)
