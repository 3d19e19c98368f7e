"""Krea 2: the registry entry (torch-free). Maths: ``family.py``; tiny pipeline: ``tiny.py``."""

from __future__ import annotations

from ...model_info import ModelInfo, Shape
from ..flux import estimated

ORDER = 110

_ATTN = r"attn\.(to_q|to_k|to_v|to_out\.0)"
KREA2_PRESETS = {
    "attention": rf"transformer_blocks\.\d+\.{_ATTN}",
    "attention+mlp": rf"transformer_blocks\.\d+\.({_ATTN}|ff\.(gate|up|down))",
}
PARAMS_B, WIDTH, BLOCKS = 12.82, 6144, 28  # 12.820 B counted on the meta device

# Krea 2 (Raw, the undistilled base Krea publishes for training): a 12.8 B single-stream DiT (28
# blocks, 48 query / 12 key-value heads x 128 = 6144 wide, a gated attention output), whose text is
# twelve hidden states of Qwen3-VL-4B-Instruct (4.4 B with its vision tower, which the pipeline
# loads) fused by a small transformer inside the denoiser; the Qwen-Image VAE (0.13 B, 8x, 16
# channels), 2x2 patches. Prompts: a fixed 512-token block (padded in the middle of the chat
# template). diffusers' documentation renders the base with 28 steps and guidance 4.5 in Krea's own
# convention (``cond + g (cond - uncond)``: on whenever g > 0). The official repos (krea/Krea-2-Raw,
# krea/Krea-2-Turbo) are not in diffusers' layout; the default is a public diffusers conversion of
# Raw, and ``base_weights`` takes any other.
KREA2 = ModelInfo(
    id="krea2",
    family="krea2",
    title="Krea 2",
    base_weights="CalamitousFelicitousness/Krea-2-Base-Diffusers",
    pipeline="Krea2Pipeline",
    denoiser="transformer",
    hub_tag="krea-2",
    render_steps=28,
    render_guidance=4.5,
    target_presets=KREA2_PRESETS,
    default_targets="attention+mlp",
    text_tokens=512,
    max_text_tokens=1024,
    negative_prompt=True,
    denoiser_params_b=PARAMS_B,
    lora_params_m=48.17,
    kohya_params_m=48.17,
    text_encoder_params_b=4.44,
    vae_params_b=0.13,
    full_finetune="Krea 2's 12.8 B-parameter transformer needs ~128 GB for bf16 weights, gradients and "
    "8-bit AdamW states, more than the largest card's 80 GB",
    comfy_naming="krea2",
    kohya_architecture="krea-2/lora",
    **estimated(Shape(params_b=PARAMS_B, width=WIDTH, blocks=BLOCKS, tokens=4096 + 512)),
)

MODELS = (KREA2,)
