"""FLUX.1's architectures as configuration mappings (torch-free): the published full-size ones,
which the benchmarks build with random weights and the shape tests build on the meta device, and
the tiny ones the tiny writer builds.

Full size: black-forest-labs/FLUX.1-dev's ``transformer/config.json``, ``text_encoder/config.json``
(CLIP-L), ``text_encoder_2/config.json`` (T5-XXL encoder) and ``vae/config.json``; [schnell] differs
only in ``guidance_embeds=False``.
"""

from __future__ import annotations

from typing import Any

TRANSFORMER: dict[str, Any] = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
DENOISER_CLASS = "FluxTransformer2DModel"  # diffusers' class; full-size configs by model id
DENOISERS: dict[str, dict[str, Any]] = {
    "flux-dev": TRANSFORMER,
    "flux-schnell": {**TRANSFORMER, "guidance_embeds": False},  # FLUX.1-schnell's transformer/config.json
}
T5_XXL: dict[str, Any] = dict(
    d_model=4096,
    d_ff=10240,
    d_kv=64,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    feed_forward_proj="gated-gelu",
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
)
CLIP_L: dict[str, Any] = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    projection_dim=768,
    hidden_act="quick_gelu",
)
VAE: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)

# Tiny: one double and one single block, 2 heads x 16, text widths of the tiny CLIP / T5
# (train/models/tiny_common.py: 32 each), a 4-channel latent packed 2x2 into 16 channels.
TRANSFORMER_TINY: dict[str, Any] = dict(
    patch_size=1,
    in_channels=16,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)
