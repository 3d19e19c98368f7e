"""Wan 2.1 text-to-video (1.3B, 14B) and image-to-video (14B), Wan 2.2 TI2V-5B, T2V-A14B and I2V-A14B:
the registry entries (torch-free). Maths: ``family.py``;
tiny pipelines: ``tiny.py``; full-size architectures: ``configs.py``. docs/video.md."""

from __future__ import annotations

from dataclasses import replace

from ...model_info import ModelInfo, Shape
from ..flux import estimated

ORDER = 200  # after the image models

_ATTN = r"(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)"
WAN_PRESETS = {
    "attention": rf"blocks\.\d+\.{_ATTN}",
    "attention+mlp": rf"blocks\.\d+\.({_ATTN}|ffn\.net\.0\.proj|ffn\.net\.2)",
}
# Wan 2.1 I2V's cross-attention reads the first frame's CLIP tokens through its own key and value
# projections (musubi-tuner's k_img / v_img): trained with the rest of the attention
_I2V_ATTN = rf"({_ATTN}|attn2\.(add_k_proj|add_v_proj))"
WAN_I2V_PRESETS = {
    "attention": rf"blocks\.\d+\.{_I2V_ATTN}",
    "attention+mlp": rf"blocks\.\d+\.({_I2V_ATTN}|ffn\.net\.0\.proj|ffn\.net\.2)",
}


def _tokens(resolution: int, frames: int, factor: int = 8) -> int:
    """Sequence tokens of one sample: 1x2x2 patches of the ``factor``x latent, (frames - 1) / 4 + 1
    latent frames, plus the 512 prompt tokens the pipeline always pads to."""
    side = resolution // factor // 2
    return side * side * ((frames - 1) // 4 + 1) + 512


# Wan-AI/Wan2.1-T2V-1.3B-Diffusers: a 1.42 B transformer (30 blocks, 1536 wide), UMT5-XXL's encoder as
# text encoder (5.7 B), the Wan 2.1 causal 3D VAE (8x spatial, 4x temporal, 16 channels, 0.13 B).
# Trained at 480p and 16 fps up to 81 frames; the card renders 50 steps at guidance 5 with a negative
# prompt. The defaults train 33 frames (9 latent frames) at 480 px, a sample a 24 GB card holds.
WAN21_T2V_1_3B = ModelInfo(
    id="wan2.1-t2v-1.3b",
    family="wan",
    title="Wan 2.1 T2V 1.3B",
    short_name="Wan2.1-T2V-1.3B",
    base_weights="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    pipeline="WanPipeline",
    denoiser="transformer",
    hub_tag="wan",
    render_steps=50,
    render_guidance=5.0,
    target_presets=WAN_PRESETS,
    default_targets="attention+mlp",
    text_tokens=512,
    max_text_tokens=512,
    negative_prompt=True,
    denoiser_params_b=1.42,
    lora_params_m=21.87,
    kohya_params_m=21.87,
    text_encoder_params_b=5.68,
    vae_params_b=0.13,
    comfy_naming="musubi",
    kohya_architecture="wan2.1-t2v-1.3b/lora",
    kohya_network_module="networks.lora_wan",
    frame_step=4,
    max_frames=81,
    default_frames=(33,),
    fps=16.0,
    temporal_factor=4,
    default_resolution=480,
    tiny={"shift": 3.0},
    **estimated(Shape(params_b=1.42, width=1536, blocks=30, tokens=_tokens(1024, 33))),
)
# Wan-AI/Wan2.1-T2V-14B-Diffusers: the same pipeline with a 14.3 B transformer (40 blocks, 5120 wide);
# trained at 480p and 720p. A full fine-tune needs ~143 GB for weights, gradients and Adam states.
WAN21_T2V_14B = replace(
    WAN21_T2V_1_3B,
    id="wan2.1-t2v-14b",
    title="Wan 2.1 T2V 14B",
    short_name="Wan2.1-T2V-14B",
    base_weights="Wan-AI/Wan2.1-T2V-14B-Diffusers",
    denoiser_params_b=14.29,
    lora_params_m=76.68,
    kohya_params_m=76.68,
    kohya_architecture="wan2.1-t2v-14b/lora",
    full_finetune="Wan 2.1 14B's 14.3 B-parameter transformer needs ~143 GB for bf16 weights, gradients "
    "and Adam states, more than the largest single card (80 GB); train a LoRA",
    **estimated(Shape(params_b=14.29, width=5120, blocks=40, tokens=_tokens(1024, 33))),
)

# Wan-AI/Wan2.2-TI2V-5B-Diffusers: a 5 B transformer (30 blocks, 3072 wide) on the Wan 2.2 VAE (16x
# spatial, 4x temporal, 48 channels), so a sample has a quarter of Wan 2.1's tokens at equal size;
# the pipeline feeds per-token timesteps (``expand_timesteps``). Trained at 720p and 24 fps up to 121
# frames; its scheduler's flow shift is 5. Trained here in its text-to-video mode (the same
# LoRA renders its image-to-video mode). The full fine-tune fits: 5 B x 10 bytes = 50 GB.
WAN22_TI2V_5B = replace(
    WAN21_T2V_1_3B,
    id="wan2.2-ti2v-5b",
    title="Wan 2.2 TI2V 5B",
    short_name="Wan2.2-TI2V-5B",
    base_weights="Wan-AI/Wan2.2-TI2V-5B-Diffusers",
    denoiser_params_b=5.0,
    lora_params_m=40.30,
    kohya_params_m=40.30,
    vae_params_b=0.7,
    kohya_architecture="wan2.2-ti2v-5b/lora",
    latent_factor=16,
    max_frames=121,
    fps=24.0,
    default_resolution=640,
    tiny={"shift": 5.0, "ti2v": True},
    **estimated(Shape(params_b=5.0, width=3072, blocks=30, tokens=_tokens(1024, 33, 16))),
)

# Wan-AI/Wan2.2-T2V-A14B-Diffusers: two experts of Wan 2.1 14B's architecture, ``transformer`` for the
# high-noise timesteps (t >= 875, the pipeline's ``boundary_ratio``) and ``transformer_2`` for the rest;
# a LoRA is trained for each on the timesteps it serves (docs/video.md). Its figures are one expert's;
# both are held in memory (``experts``). 480p/720p, 16 fps, 81 frames; guidance 4 (high) and 3 (low)
# on the card, the pipeline's default one value for both.
WAN22_T2V_A14B = replace(
    WAN21_T2V_14B,
    id="wan2.2-t2v-a14b",
    title="Wan 2.2 T2V A14B",
    short_name="Wan2.2-T2V-A14B",
    base_weights="Wan-AI/Wan2.2-T2V-A14B-Diffusers",
    render_guidance=4.0,
    kohya_architecture="wan2.2-t2v-a14b/lora",
    experts=2,
    full_finetune="Wan 2.2 A14B's two 14.3 B-parameter experts need ~286 GB for bf16 weights, gradients and "
    "Adam states, more than the largest single card (80 GB); train a LoRA",
    tiny={"shift": 3.0, "experts": True},
)

# Wan-AI/Wan2.1-I2V-14B-480P-Diffusers: Wan 2.1 14B animating a first frame. Its transformer takes the
# noisy latents beside the first frame's latents and mask (36 channels) and attends to the frame's
# 257 CLIP ViT-H/14 tokens (a 0.63 B image encoder, counted with the VAE); trained here on each
# sample's own first frame, as the pipeline conditions (docs/video.md). The 720P repo is the same
# architecture at a flow shift of 5.
WAN21_I2V_14B = replace(
    WAN21_T2V_14B,
    id="wan2.1-i2v-14b",
    title="Wan 2.1 I2V 14B",
    short_name="Wan2.1-I2V-14B-480P",
    base_weights="Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
    pipeline="WanImageToVideoPipeline",
    image_to_video=True,
    target_presets=WAN_I2V_PRESETS,
    denoiser_params_b=16.39,
    lora_params_m=89.78,
    kohya_params_m=89.78,
    vae_params_b=0.76,
    kohya_architecture="wan2.1-i2v-14b/lora",
    full_finetune="Wan 2.1 I2V 14B's 16.4 B-parameter transformer needs ~164 GB for bf16 weights, gradients "
    "and Adam states, more than the largest single card (80 GB); train a LoRA",
    tiny={"shift": 3.0, "i2v": True},
    **estimated(Shape(params_b=16.4, width=5120, blocks=40, tokens=_tokens(1024, 33) + 257)),
)
# Wan-AI/Wan2.2-I2V-A14B-Diffusers: Wan 2.2 A14B's two experts animating a first frame (36 channels in,
# no CLIP tokens), switched at 0.9 of the schedule (its ``boundary_ratio``); a LoRA for each expert.
WAN22_I2V_A14B = replace(
    WAN22_T2V_A14B,
    id="wan2.2-i2v-a14b",
    title="Wan 2.2 I2V A14B",
    short_name="Wan2.2-I2V-A14B",
    base_weights="Wan-AI/Wan2.2-I2V-A14B-Diffusers",
    pipeline="WanImageToVideoPipeline",
    image_to_video=True,
    render_guidance=3.5,
    kohya_architecture="wan2.2-i2v-a14b/lora",
    tiny={"shift": 5.0, "experts": True, "i2v": True},
)

MODELS = (WAN21_T2V_1_3B, WAN21_T2V_14B, WAN21_I2V_14B, WAN22_TI2V_5B, WAN22_T2V_A14B, WAN22_I2V_A14B)
