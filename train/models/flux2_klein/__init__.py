"""FLUX.2 [klein] 4B and 9B, step-distilled and base: the registry entries (torch-free). Maths:
``family.py`` (Flux.2's objective with Qwen3 prompts); tiny pipelines: ``tiny.py``."""

from __future__ import annotations

from dataclasses import replace

from ...model_info import ModelInfo, Shape
from ..flux import estimated
from ..flux2 import FLUX2_PRESETS, REFERENCE_LIMITS

ORDER = 50

# FLUX.2 [klein] 4B (black-forest-labs/FLUX.2-klein-4B, step-distilled): 5 double + 20 single blocks,
# 24 heads x 128 = 3072 wide, no guidance embedding; 3.9 B parameters (counted from the config).
# Text encoder Qwen3-4B (4.0 B; layers 9/18/27 stacked: 7680 wide), 512 prompt tokens. Model card:
# 4 steps, guidance 1 (distilled: no CFG). Klein 4B is Apache-2.0. Reference images: optional, up to 4
# for [klein] 4B and 9B (BFL's editing guide, docs.bfl.ai/guides/prompting_editing_overview).
FLUX2_KLEIN_4B = ModelInfo(
    id="flux2-klein-4b",
    family="flux2_klein",
    title="FLUX.2 [klein] 4B",
    short_name="FLUX.2-klein-4B",
    base_weights="black-forest-labs/FLUX.2-klein-4B",
    pipeline="Flux2KleinPipeline",
    denoiser="transformer",
    hub_tag="flux2",
    render_steps=4,
    render_guidance=1.0,
    target_presets=FLUX2_PRESETS,
    default_targets="attention+mlp",
    text_tokens=512,
    max_text_tokens=512,
    denoiser_params_b=3.88,  # 3.876 B counted on the meta device (the registry said 3.9)
    lora_params_m=24.08,
    kohya_params_m=27.03,
    text_encoder_params_b=4.0,
    comfy_naming="kohya",
    kohya_architecture="Flux.2-klein-4b/lora",
    kohya_network_module="networks.lora_flux_2",
    max_controls=4,
    controls_required=False,
    **REFERENCE_LIMITS,
    tiny={"distilled": True},
    **estimated(Shape(params_b=3.88, width=3072, blocks=5 + 20, tokens=4096 + 512)),
)
# FLUX.2 [klein] 9B (black-forest-labs/FLUX.2-klein-9B, step-distilled): 8 double + 24 single blocks,
# 32 heads x 128 = 4096 wide; 9.1 B parameters. Text encoder Qwen3-8B (8.2 B; 12288 wide stacked).
FLUX2_KLEIN_9B = replace(
    FLUX2_KLEIN_4B,
    id="flux2-klein-9b",
    title="FLUX.2 [klein] 9B",
    short_name="FLUX.2-klein-9B",
    base_weights="black-forest-labs/FLUX.2-klein-9B",
    denoiser_params_b=9.08,  # 9.079 B counted on the meta device (the registry said 9.1)
    lora_params_m=43.52,
    kohya_params_m=49.81,
    text_encoder_params_b=8.2,
    full_finetune="FLUX.2 [klein] 9B's 9.1 B-parameter transformer needs ~91 GB for bf16 weights, "
    "gradients and 8-bit AdamW states, more than an 80 GB card holds",
    kohya_architecture="Flux.2-klein-9b/lora",
    tiny={"distilled": True, "double": 2, "single": 2},
    **estimated(Shape(params_b=9.08, width=4096, blocks=8 + 24, tokens=4096 + 512)),
)
# The [klein] base models (undistilled, what BFL recommends for fine-tuning): the same transformers
# and text encoders; model cards: 50 steps, CFG 4 (against the empty prompt).
FLUX2_KLEIN_BASE_4B = replace(
    FLUX2_KLEIN_4B,
    id="flux2-klein-base-4b",
    title="FLUX.2 [klein] Base 4B",
    short_name="FLUX.2-klein-base-4B",
    base_weights="black-forest-labs/FLUX.2-klein-base-4B",
    render_steps=50,
    render_guidance=4.0,
    tiny={"distilled": False},
)
FLUX2_KLEIN_BASE_9B = replace(
    FLUX2_KLEIN_9B,
    id="flux2-klein-base-9b",
    title="FLUX.2 [klein] Base 9B",
    short_name="FLUX.2-klein-base-9B",
    base_weights="black-forest-labs/FLUX.2-klein-base-9B",
    render_steps=50,
    render_guidance=4.0,
    tiny={"distilled": False, "double": 2, "single": 2},
)

MODELS = (FLUX2_KLEIN_4B, FLUX2_KLEIN_9B, FLUX2_KLEIN_BASE_4B, FLUX2_KLEIN_BASE_9B)
