"""Z-Image Turbo and base: the registry entries (torch-free). Maths: ``family.py``; tiny pipelines:
``tiny.py``."""

from __future__ import annotations

from dataclasses import replace

from ...model_info import ModelInfo, Shape
from ..flux import estimated

ORDER = 100

_ATTN = r"attention\.(to_q|to_k|to_v|to_out\.0)"
_BLOCKS = r"(layers|noise_refiner|context_refiner)\.\d+"
Z_IMAGE_PRESETS = {
    "attention": rf"{_BLOCKS}\.{_ATTN}",
    "attention+mlp": rf"{_BLOCKS}\.({_ATTN}|feed_forward\.(w1|w2|w3))",
}
# Tongyi-MAI/Z-Image-Turbo: a 6.15 B single-stream DiT (3840 wide, 30 blocks + 2 noise-refiner
# blocks over the image tokens + 2 context-refiner blocks over the text), Qwen3-4B as text
# encoder (4.0 B), the Flux.1 VAE (0.08 B, 8x, 16 channels). Prompts: the pipeline's default is
# 512 tokens; the transformer's text RoPE axis has 1024 positions and the image starts after the
# caption padded to a multiple of 32, so at most 992. Turbo: guidance 0 (distilled, no CFG) and
# 8 steps (the card's "9 steps = 8 forwards" predates diffusers' default sigmas, which make N
# steps N forwards). The full fine-tune fits: 6.15 B x 10 bytes = 62 GB.
Z_IMAGE_TURBO = ModelInfo(
    id="z-image-turbo",
    family="z_image",
    title="Z-Image-Turbo",
    base_weights="Tongyi-MAI/Z-Image-Turbo",
    pipeline="ZImagePipeline",
    denoiser="transformer",
    hub_tag="z-image",
    render_steps=8,
    render_guidance=0.0,
    target_presets=Z_IMAGE_PRESETS,
    default_targets="attention+mlp",
    text_tokens=512,
    max_text_tokens=992,
    negative_prompt=False,
    denoiser_params_b=6.15,
    lora_params_m=39.69,
    kohya_params_m=39.69,
    text_encoder_params_b=4.0,
    vae_params_b=0.08,
    comfy_naming="kohya",
    kohya_architecture="z-image-turbo/lora",
    kohya_network_module="networks.lora_zimage",
    tiny={"shift": 3.0},  # the repo's scheduler: fixed shift 3, no dynamic shifting
    **estimated(Shape(params_b=6.15, width=3840, blocks=30 + 2, tokens=4096 + 512)),
)
# Tongyi-MAI/Z-Image: the undistilled base of the same architecture; the card renders 50 steps
# with CFG 4 and a negative prompt; its scheduler has a fixed shift of 6.
Z_IMAGE = replace(
    Z_IMAGE_TURBO,
    id="z-image",
    title="Z-Image",
    short_name="Z-Image",  # replace() would keep Turbo's
    base_weights="Tongyi-MAI/Z-Image",
    render_steps=50,
    render_guidance=4.0,
    negative_prompt=True,
    kohya_architecture="z-image/lora",
    tiny={"shift": 6.0},
)

MODELS = (Z_IMAGE_TURBO, Z_IMAGE)
