"""Chroma1-HD: the registry entry (torch-free). Maths: ``family.py``; tiny pipeline: ``tiny.py``."""

from __future__ import annotations

from ...model_info import ModelInfo, Shape
from ..flux import FLUX_PRESETS, estimated

ORDER = 70

# Chroma1-HD (lodestones/Chroma1-HD, the repo diffusers' ChromaPipeline names): FLUX.1-schnell's
# layout (19 double + 38 single blocks, 3072 wide) with the per-block modulation replaced by one
# approximator network; 8.90 B parameters counted from its config. T5-XXL only (4.76 B), masked,
# 512 tokens. Undistilled: real CFG with a negative prompt, no guidance embedding. Model card:
# 40 steps, CFG 3.0. Activations as FLUX.1-dev's (the same blocks and widths).
CHROMA = ModelInfo(
    id="chroma",
    family="chroma",
    title="Chroma1-HD",
    short_name="Chroma1-HD",
    base_weights="lodestones/Chroma1-HD",
    pipeline="ChromaPipeline",
    denoiser="transformer",
    hub_tag="chroma",
    render_steps=40,
    render_guidance=3.0,
    target_presets=FLUX_PRESETS,  # the same block and module names as Flux.1
    default_targets="attention+mlp",
    text_tokens=512,
    max_text_tokens=512,
    negative_prompt=True,
    denoiser_params_b=8.90,
    lora_params_m=65.37,
    kohya_params_m=115.80,
    text_encoder_params_b=4.76,
    full_finetune="Chroma's 8.9 B-parameter transformer needs ~89 GB for bf16 weights, gradients and "
    "8-bit AdamW states, more than an 80 GB card holds",
    comfy_naming="kohya",
    kohya_architecture="chroma/lora",
    kohya_network_module="networks.lora_flux",
    **estimated(Shape(params_b=8.90, width=3072, blocks=19 + 38, tokens=4096 + 512)),
)

MODELS = (CHROMA,)
