"""FLUX.2 [dev]: the registry entry (torch-free), and the Flux.2 LoRA presets and reference-image
limits the [klein] models share. Maths: ``family.py``; tiny pipeline: ``tiny.py``."""

from __future__ import annotations

from typing import Any

from ...model_info import ModelInfo, Shape
from ..flux import estimated

ORDER = 40

_DOUBLE_ATTN = r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
# Flux.2's single blocks have no attention-only linears: to_qkv_mlp_proj (q, k, v and the MLP's
# input) and to_out (attention and MLP outputs) are fused, so "attention" takes them whole.
_SINGLE = r"attn\.(to_qkv_mlp_proj|to_out)"
FLUX2_PRESETS = {
    "attention": rf"(transformer_blocks\.\d+\.{_DOUBLE_ATTN}|single_transformer_blocks\.\d+\.{_SINGLE})",
    "attention+mlp": (
        rf"(transformer_blocks\.\d+\.({_DOUBLE_ATTN}|ff\.(linear_in|linear_out)|ff_context\.(linear_in|linear_out))"
        rf"|single_transformer_blocks\.\d+\.{_SINGLE})"
    ),
}

# Flux2ImageProcessor.check_image_input refuses references under 64 px a side or over 8:1.
REFERENCE_LIMITS: dict[str, Any] = {"control_min_side": 64, "control_max_aspect": 8.0}

# FLUX.2 [dev] (black-forest-labs/FLUX.2-dev; diffusers' convert_flux2_to_diffusers config): 8 double +
# 48 single blocks, 48 heads x 128 = 6144 wide, 128 latent channels (the 32-channel VAE, 2x2
# patchified), guidance embedding; 32.2 B parameters (counted from that config). Text encoder
# Mistral-Small-3.2-24B (24 B, hidden states of layers 10/20/30 stacked: 15360 wide), prompts padded
# to 512 tokens (the pipeline's default and BFL's). At 1024 px a sample is 4096 image + 512 text
# tokens (16 px per token). Model card: 50 steps, guidance 4. Reference images (Flux2Pipeline's
# image=[...]): optional, BFL's editing guide recommends at most 6 for [dev]
# (docs.bfl.ai/guides/prompting_editing_overview; the pipeline itself sets no limit).
FLUX2_DEV = ModelInfo(
    id="flux2-dev",
    family="flux2",
    title="FLUX.2 [dev]",
    short_name="FLUX.2-dev",
    base_weights="black-forest-labs/FLUX.2-dev",
    pipeline="Flux2Pipeline",
    denoiser="transformer",
    hub_tag="flux2",
    render_steps=50,
    render_guidance=4.0,
    target_presets=FLUX2_PRESETS,
    default_targets="attention+mlp",
    text_tokens=512,
    max_text_tokens=512,
    denoiser_params_b=32.2,
    lora_params_m=100.66,
    kohya_params_m=110.10,
    text_encoder_params_b=24.0,
    full_finetune="FLUX.2 [dev]'s 32.2 B-parameter transformer needs ~322 GB for bf16 weights, gradients "
    "and 8-bit AdamW states, far more than an 80 GB card holds",
    comfy_naming="kohya",
    kohya_architecture="Flux.2-dev/lora",
    kohya_network_module="networks.lora_flux_2",
    guidance_embed=True,
    max_controls=6,
    controls_required=False,
    **REFERENCE_LIMITS,
    tiny={"variant": "dev"},
    **estimated(Shape(params_b=32.2, width=6144, blocks=8 + 48, tokens=4096 + 512)),
)

MODELS = (FLUX2_DEV,)
