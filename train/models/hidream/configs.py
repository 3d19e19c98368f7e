"""HiDream-I1's denoiser at full size (torch-free): HiDream-ai/HiDream-I1-Full's
``transformer/config.json`` (Dev and Fast share it): 16 dual-stream + 32 single-stream MoE blocks
(a shared expert and 4 routed, 2 active), 20 heads x 128, T5-XXL's and Llama-3.1-8B's 4096-wide
states, CLIP-L + CLIP-G pooled (2048). ``llama_layers`` (which Llama state each block reads) is left
out: it changes no parameter."""

from __future__ import annotations

from typing import Any

DENOISER_CLASS = "HiDreamImageTransformer2DModel"
TRANSFORMER: dict[str, Any] = dict(
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=16,
    num_single_layers=32,
    attention_head_dim=128,
    num_attention_heads=20,
    caption_channels=[4096, 4096],
    text_emb_dim=2048,
    num_routed_experts=4,
    num_activated_experts=2,
    axes_dims_rope=(64, 32, 32),
    max_resolution=(128, 128),
)
DENOISERS: dict[str, dict[str, Any]] = {
    "hidream-i1-full": TRANSFORMER,
    "hidream-i1-dev": TRANSFORMER,
    "hidream-i1-fast": TRANSFORMER,
}
