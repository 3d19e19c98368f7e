"""Stable Diffusion XL: the registry entry (torch-free). Maths: ``family.py``; tiny pipeline:
``tiny.py``; the UNet's architectures: ``configs.py``."""

from __future__ import annotations

from ...model_info import ModelInfo

ORDER = 20

SDXL_PRESETS = {
    "attention": r".*transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",
    "attention+mlp": r".*transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))",
}

SDXL = ModelInfo(
    id="sdxl",
    family="sdxl",
    options="sdxl",
    title="Stable Diffusion XL 1.0",
    base_weights="stabilityai/stable-diffusion-xl-base-1.0",
    pipeline="StableDiffusionXLPipeline",
    denoiser="unet",
    hub_tag="stable-diffusion-xl",
    render_steps=30,
    render_guidance=5.0,
    target_presets=SDXL_PRESETS,
    default_targets="attention",
    negative_prompt=True,
    denoiser_params_b=2.57,  # 2.567 B counted on the meta device (the registry said 2.6)
    lora_params_m=23.22,
    kohya_params_m=23.22,
    text_encoder_params_b=0.8,
    activation_bytes=0.46 * 2**20,
    memory_measured=True,
    patch=1,
    comfy_naming="kohya",
    lycoris_naming=True,
    kohya_architecture="stable-diffusion-xl-v1-base/lora",
    channels_last=True,
    step_s={"t4": 3.0, "a40": 0.9, "l40s": 0.55, "a100": 0.4, "h100": 0.28, "cpu": 120.0},
)

MODELS = (SDXL,)
