"""Wan's denoisers at full size (torch-free): the ``transformer/config.json`` of the published
diffusers repos (Wan-AI/Wan2.1-T2V-1.3B-Diffusers, Wan-AI/Wan2.1-T2V-14B-Diffusers,
Wan-AI/Wan2.2-TI2V-5B-Diffusers, and the image-to-video repos named below). Every Wan
transformer has 128-wide heads, 1x2x2 patches, UMT5-XXL's 4096-wide text states and 256 frequency
channels; they differ in width, depth and MLP size."""

from __future__ import annotations

from typing import Any

DENOISER_CLASS = "WanTransformer3DModel"
_COMMON: dict[str, Any] = dict(
    patch_size=(1, 2, 2),
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
T2V_1_3B: dict[str, Any] = {**_COMMON, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30}
T2V_14B: dict[str, Any] = {**_COMMON, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}
# Wan-AI/Wan2.2-TI2V-5B-Diffusers: 48 latent channels in and out (the Wan 2.2 VAE's)
TI2V_5B: dict[str, Any] = {
    **_COMMON,
    "num_attention_heads": 24,
    "ffn_dim": 14336,
    "num_layers": 30,
    "in_channels": 48,
    "out_channels": 48,
}
# Wan-AI/Wan2.1-I2V-14B-480P-Diffusers: 36 channels in (noisy latents, the first frame's 4-channel mask
# and latents) and cross-attention to the first frame's CLIP ViT-H/14 tokens (1280 wide)
I2V_14B: dict[str, Any] = {**T2V_14B, "in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 5120}
# Wan-AI/Wan2.2-I2V-A14B-Diffusers: each expert takes the 36 channels, without CLIP tokens
I2V_A14B: dict[str, Any] = {**T2V_14B, "in_channels": 36}
DENOISERS: dict[str, dict[str, Any]] = {
    "wan2.1-t2v-1.3b": T2V_1_3B,
    "wan2.1-t2v-14b": T2V_14B,
    "wan2.2-ti2v-5b": TI2V_5B,
    "wan2.2-t2v-a14b": T2V_14B,  # each of its two experts (Wan-AI/Wan2.2-T2V-A14B-Diffusers)
    "wan2.1-i2v-14b": I2V_14B,
    "wan2.2-i2v-a14b": I2V_A14B,  # each of its two experts
}
