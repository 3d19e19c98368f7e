"""FLUX.3 [klein] and its step-distilled variant: the registry entries (torch-free). Maths and the
modular pipeline's front: ``family.py``; tiny pipelines: ``tiny.py``."""

from __future__ import annotations

from dataclasses import replace

from ...model_info import ModelInfo, Shape
from ..flux import estimated

ORDER = 55

# The blocks every text-to-image token passes: the image's and the text's per-mode blocks and the
# joint single blocks. The reference images' per-mode blocks (``mode_blocks.image_cond``) see no
# token in text-to-image training, so a LoRA there would never learn: the presets leave them out.
_BLOCKS = r"(mode_blocks\.image|txt_mode_blocks|single_transformer_blocks)\.\d+"
_ATTN = r"attn\.(to_q|to_k|to_v|to_out\.0)"
FLUX3_PRESETS = {
    "attention": rf"{_BLOCKS}\.{_ATTN}",
    "attention+mlp": rf"{_BLOCKS}\.({_ATTN}|ff\.(linear_in|linear_out))",
}
PARAMS_B, WIDTH, BLOCKS = 5.54, 3072, 5 + 5 + 28  # 5.538 B counted on the meta device (configs.py)

# FLUX.3 [klein] (diffusers' Flux3Transformer2DModel defaults: 5 per-mode blocks for each of the
# image, reference and text streams, 28 joint single blocks, 24 heads x 128 = 3072 wide, 128 latent
# channels from the Flux.2 VAE patchified 2x2), conditioned on eight hidden states of Qwen3-VL
# (layers 4, 8, ..., 32, stacked: 20480 = 8 x 2560 wide, so the 4B model). Prompts go through the
# chat template and are right-padded to a multiple of 80 tokens (the pipeline takes up to 8192).
# diffusers ships it as a modular pipeline only (Flux3ModularPipeline: 50 steps, CFG 3.5 through its
# ClassifierFreeGuidance guider, a constant scheduler shift 6.93). The Hub repo id is not checked
# here (no Hub access): ``base_weights`` takes any diffusers folder of the model.
FLUX3_KLEIN = ModelInfo(
    id="flux3-klein",
    family="flux3",
    title="FLUX.3 [klein]",
    short_name="FLUX.3-klein",
    base_weights="black-forest-labs/FLUX.3-klein",
    pipeline="Flux3ModularPipeline",
    denoiser="transformer",
    hub_tag="flux3",
    render_steps=50,
    render_guidance=3.5,
    target_presets=FLUX3_PRESETS,
    default_targets="attention+mlp",
    text_tokens=640,  # a whole number of the pipeline's 80-token blocks
    max_text_tokens=8192,
    negative_prompt=True,
    denoiser_params_b=PARAMS_B,
    lora_params_m=35.49,
    kohya_params_m=35.49,
    text_encoder_params_b=4.44,
    comfy_naming="flux3",
    kohya_architecture="flux-3-klein/lora",
    tiny={"distilled": False},
    **estimated(Shape(params_b=PARAMS_B, width=WIDTH, blocks=BLOCKS, tokens=4096 + 640)),
)
# The step-distilled variant: the same transformer plus a flow-map embedding of the time each step
# jumps to (``flow_map``); 16 steps, no classifier-free guidance (Flux3DistilledModularPipeline).
FLUX3_KLEIN_DISTILLED = replace(
    FLUX3_KLEIN,
    id="flux3-klein-distilled",
    title="FLUX.3 [klein] distilled",
    short_name="FLUX.3-klein-distilled",
    base_weights="black-forest-labs/FLUX.3-klein-distilled",
    pipeline="Flux3DistilledModularPipeline",
    render_steps=16,
    render_guidance=1.0,
    negative_prompt=False,
    denoiser_params_b=5.55,  # 5.549 B: the flow-map time embedding adds 10 M
    tiny={"distilled": True},
)

MODELS = (FLUX3_KLEIN, FLUX3_KLEIN_DISTILLED)
