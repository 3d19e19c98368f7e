"""Stable Diffusion 3.5 Large and Medium: the registry entries (torch-free). Maths: ``family.py``;
tiny pipelines: ``tiny.py``."""

from __future__ import annotations

from dataclasses import replace

from ...model_info import ModelInfo, Shape
from ..flux import estimated

ORDER = 60

_ATTN = r"(attn|attn2)\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
# MMDiT blocks: the joint attention (image and text projections), SD3.5 Medium's second image
# self-attention (attn2), and both streams' feed-forwards; the last block has no text outputs.
SD3_PRESETS = {
    "attention": rf"transformer_blocks\.\d+\.{_ATTN}",
    "attention+mlp": rf"transformer_blocks\.\d+\.({_ATTN}|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))",
}
_TOKENS_1024 = 4096 + 77 + 256  # image + CLIP + default T5 tokens at 1024 px

# SD3.5 Large (stabilityai/stable-diffusion-3.5-large, transformer/config.json): 38 MMDiT blocks,
# 38 heads x 64 = 2432 wide, 2x2 patches of a 16-channel VAE; 8.06 B parameters (counted from that
# config). Text: CLIP-L (0.12 B) + CLIP-G (0.69 B) + T5-XXL encoder (4.76 B). The sequence is
# 77 CLIP + 256 T5 (default; 512 at most) text tokens + the image tokens; text_tokens counts the
# T5 part (what max_sequence_length sets). Model card: 28 steps, CFG 3.5.
SD35_LARGE = ModelInfo(
    id="sd3.5-large",
    family="sd3",
    title="Stable Diffusion 3.5 Large",
    short_name="SD3.5-Large",
    base_weights="stabilityai/stable-diffusion-3.5-large",
    pipeline="StableDiffusion3Pipeline",
    denoiser="transformer",
    hub_tag="sd3",
    render_steps=28,
    render_guidance=3.5,
    target_presets=SD3_PRESETS,
    default_targets="attention+mlp",
    text_tokens=256,
    max_text_tokens=512,
    fixed_text_tokens=77,  # the CLIP-L/G embeddings joined to the T5 ones
    negative_prompt=True,
    denoiser_params_b=8.06,
    lora_params_m=52.76,
    text_encoder_params_b=5.57,
    full_finetune="SD3.5 Large's 8.1 B-parameter transformer needs ~81 GB for bf16 weights, gradients "
    "and 8-bit AdamW states, more than an 80 GB card holds",
    tiny={"variant": "large"},
    **estimated(Shape(params_b=8.06, width=2432, blocks=38, tokens=_TOKENS_1024)),
)
# SD3.5 Medium (stabilityai/stable-diffusion-3.5-medium): MMDiT-X, 24 blocks, 24 heads x 64 = 1536
# wide, blocks 0-12 with a second image self-attention (dual_attention_layers), qk RMS norm;
# 2.24 B parameters counted from its config (the card's "2.5 B" counts more than the transformer).
# Same text encoders and sequence as Large. Model card: 40 steps, CFG 4.5.
SD35_MEDIUM = replace(
    SD35_LARGE,
    id="sd3.5-medium",
    title="Stable Diffusion 3.5 Medium",
    short_name="SD3.5-Medium",
    base_weights="stabilityai/stable-diffusion-3.5-medium",
    render_steps=40,
    render_guidance=4.5,
    denoiser_params_b=2.24,
    lora_params_m=23.49,
    full_finetune="",
    tiny={"variant": "medium"},
    **estimated(Shape(params_b=2.24, width=1536, blocks=24, tokens=_TOKENS_1024)),
)

MODELS = (SD35_LARGE, SD35_MEDIUM)
