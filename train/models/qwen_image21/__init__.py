"""Qwen-Image 2.1: the registry entry (torch-free). Maths: ``family.py``; tiny pipeline: ``tiny.py``."""

from __future__ import annotations

from dataclasses import replace

from ...model_info import ModelInfo, Shape
from ..flux import estimated

ORDER = 85  # after Qwen-Image, before its edit models

_ATTN = r"attn\.(to_q|to_k|to_v|to_out\.0)"
QWEN_IMAGE21_PRESETS = {
    "attention": rf"transformer_blocks\.\d+\.{_ATTN}",
    "attention+mlp": rf"transformer_blocks\.\d+\.({_ATTN}|img_mlp\.(gate_layer|proj|out))",
}
PARAMS_B, WIDTH, BLOCKS = 7.12, 4096, 32  # 7.115 B counted on the meta device

# Qwen/Qwen-Image-2.1: a 7.1 B single-stream, block-causal DiT (32 blocks, 32 heads x 128 = 4096
# wide) over one interleaved sequence of Qwen3-VL-8B's text states (8.8 B with its vision tower) and
# unpatched latents of a 16x RGBA VAE (64 channels); a token stands for 16 x 16 pixels. Prompts go
# in whole (the pipeline has no length limit); training caches them up to
# flow.max_sequence_length. diffusers' documentation gives Qwen's defaults: 40 steps, no guidance
# (CFG with a negative prompt and true_cfg_scale > 1 is optional). Qwen Research License: research
# and evaluation only.
QWEN_IMAGE_21 = ModelInfo(
    id="qwen-image-2.1",
    family="qwen_image21",
    title="Qwen-Image 2.1",
    base_weights="Qwen/Qwen-Image-2.1",
    pipeline="QwenImage21Pipeline",
    denoiser="transformer",
    hub_tag="qwen-image",
    render_steps=40,
    render_guidance=1.0,
    target_presets=QWEN_IMAGE21_PRESETS,
    default_targets="attention+mlp",
    text_tokens=512,
    denoiser_params_b=PARAMS_B,
    lora_params_m=41.94,
    text_encoder_params_b=8.8,
    vae_params_b=0.2,
    latent_factor=16,
    patch=1,
    **estimated(Shape(params_b=PARAMS_B, width=WIDTH, blocks=BLOCKS, tokens=4096 + 512)),
)

# The same weights and pipeline, image-conditioned (``QwenImage21Pipeline(image=...)``): an edit
# model trained on before/after pairs. Qwen3-VL reads each condition image with the instruction (at
# the output's area: ~1024 tokens at 1024 px, 16 px patches merged 2x2), and its latents go before
# the target's in the sequence. The pipeline takes any number of condition images; 3 here, as
# Qwen-Image-Edit-2509.
QWEN_IMAGE_21_EDIT = replace(
    QWEN_IMAGE_21,
    id="qwen-image-2.1-edit",
    title="Qwen-Image 2.1 (edit)",
    short_name="Qwen-Image 2.1",
    max_controls=3,
    controls_required=True,
    fixed_text_tokens=1024 + 8,
    **estimated(Shape(params_b=PARAMS_B, width=WIDTH, blocks=BLOCKS, tokens=2 * 4096 + 1024 + 512)),
)

MODELS = (QWEN_IMAGE_21, QWEN_IMAGE_21_EDIT)
