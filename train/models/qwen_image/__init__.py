"""Qwen-Image: the registry entry (torch-free). Maths: ``family.py``; tiny pipeline: ``tiny.py``."""

from __future__ import annotations

from dataclasses import replace

from ...model_info import ModelInfo, Shape
from ..flux import estimated

ORDER = 80

_ATTN = r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
QWEN_IMAGE_PRESETS = {
    "attention": rf"transformer_blocks\.\d+\.{_ATTN}",
    "attention+mlp": rf"transformer_blocks\.\d+\.({_ATTN}|(img_mlp|txt_mlp)\.net\.(0\.proj|2))",
}
# The transformer: 20.4 B parameters, 3072 wide, 60 dual-stream blocks (the edit models' too).
PARAMS_B, WIDTH, BLOCKS = 20.43, 3072, 60  # 20.430 B counted on the meta device

# Qwen/Qwen-Image: a 20.4 B MMDiT (60 dual-stream blocks, 24 heads x 128 = 3072 wide, text width
# 3584), Qwen2.5-VL-7B-Instruct as text encoder (8.3 B with its vision tower, which the pipeline
# loads), the Wan-2.1-style 3D VAE (0.13 B, 8x spatial, 16 channels). Prompts: the pipeline's
# default max_sequence_length is 512, its limit 1024. The model card renders 50 steps with
# true_cfg_scale 4.0 and negative_prompt " ".
QWEN_IMAGE = ModelInfo(
    id="qwen-image",
    family="qwen_image",
    title="Qwen-Image",
    base_weights="Qwen/Qwen-Image",
    pipeline="QwenImagePipeline",
    denoiser="transformer",
    hub_tag="qwen-image",
    render_steps=50,
    render_guidance=4.0,
    target_presets=QWEN_IMAGE_PRESETS,
    default_targets="attention+mlp",
    text_tokens=512,
    max_text_tokens=1024,
    negative_prompt=True,
    denoiser_params_b=PARAMS_B,
    lora_params_m=106.17,
    kohya_params_m=106.17,
    text_encoder_params_b=8.3,
    vae_params_b=0.13,
    full_finetune="the 20.4 B-parameter transformer needs ~204 GB for bf16 weights, gradients and "
    "8-bit AdamW states, more than the largest card's 80 GB",
    comfy_naming="kohya",
    kohya_architecture="qwen-image/lora",
    kohya_network_module="networks.lora_qwen_image",
    **estimated(Shape(params_b=PARAMS_B, width=WIDTH, blocks=BLOCKS, tokens=4096 + 512)),
)

# Qwen/Qwen-Image-2512: the December 2025 weights of the same architecture and pipeline (the same
# transformer config, text encoder and VAE); the card renders as Qwen-Image's (50 steps, CFG 4).
QWEN_IMAGE_2512 = replace(
    QWEN_IMAGE, id="qwen-image-2512", title="Qwen-Image-2512", base_weights="Qwen/Qwen-Image-2512"
)

MODELS = (QWEN_IMAGE, QWEN_IMAGE_2512)
