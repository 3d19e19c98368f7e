"""HiDream-I1 (Full, Dev, Fast): the registry entries (torch-free). Maths: ``family.py``; tiny
pipelines: ``tiny.py``."""

from __future__ import annotations

from dataclasses import replace

from ...model_info import ModelInfo, Shape
from ..flux import estimated

ORDER = 120

_ATTN = r"attn1\.(to_q|to_k|to_v|to_out)(_t)?"
_BLOCKS = r"(double_stream_blocks|single_stream_blocks)\.\d+\.block"
HIDREAM_PRESETS = {
    "attention": rf"{_BLOCKS}\.{_ATTN}",
    # the MLPs every token passes: the shared expert and the text stream's (not the routed experts)
    "attention+mlp": rf"{_BLOCKS}\.({_ATTN}|ff_i\.shared_experts\.(w1|w2|w3)|ff_t\.(w1|w2|w3))",
}
PARAMS_B, WIDTH, BLOCKS = 17.11, 2560, 48  # 17.106 B counted on the meta device

# HiDream-ai/HiDream-I1-Full: a 17.1 B sparse DiT (16 dual- and 32 single-stream blocks, MoE MLPs:
# a shared expert and 2 of 4 routed ones per token; 20 heads x 128 = 2560 wide). Four text encoders:
# CLIP-L and CLIP-G (pooled), T5-XXL, and Llama-3.1-8B-Instruct, whose every layer's state the
# blocks read — 0.12 + 0.69 + 4.76 + 8.03 = 13.6 B. HiDream-ai's repos leave the (gated) Llama
# out: it loads from meta-llama/Llama-3.1-8B-Instruct (HF_TOKEN) unless the base folder has
# text_encoder_4/. The Flux.1 VAE (16 channels). Prompts: 128 tokens (the pipeline's default for
# T5 and Llama; the CLIPs take up to 218). Full renders 50 steps with CFG 5 (UniPC, flow shift 3).
HIDREAM_I1_FULL = ModelInfo(
    id="hidream-i1-full",
    family="hidream",
    title="HiDream-I1 Full",
    base_weights="HiDream-ai/HiDream-I1-Full",
    pipeline="HiDreamImagePipeline",
    denoiser="transformer",
    hub_tag="hidream",
    render_steps=50,
    render_guidance=5.0,
    target_presets=HIDREAM_PRESETS,
    default_targets="attention+mlp",
    text_tokens=128,
    max_text_tokens=128,
    negative_prompt=True,
    denoiser_params_b=PARAMS_B,
    lora_params_m=42.40,
    kohya_params_m=42.40,
    text_encoder_params_b=13.6,
    vae_params_b=0.08,
    full_finetune="HiDream-I1's 17.1 B-parameter transformer needs ~171 GB for bf16 weights, gradients "
    "and 8-bit AdamW states, more than the largest card's 80 GB",
    comfy_naming="hidream",
    kohya_architecture="hidream-i1/lora",
    # the transformer's max_resolution (128 x 128 latents = 4096 tokens): a larger area would not fit
    # the token grid it pads non-square images to (the pipeline itself renders 1024 x 1024 areas)
    max_resolution=1024,
    tiny={"variant": "full"},
    **estimated(Shape(params_b=PARAMS_B, width=WIDTH, blocks=BLOCKS, tokens=4096 + 128 * 3)),
)
# The guidance-distilled Dev (28 steps) and Fast (16 steps): no CFG; the flow-matching LCM
# scheduler with shift 6 (Dev) and 3 (Fast).
HIDREAM_I1_DEV = replace(
    HIDREAM_I1_FULL,
    id="hidream-i1-dev",
    title="HiDream-I1 Dev",
    short_name="HiDream-I1 Dev",  # replace() would keep Full's
    base_weights="HiDream-ai/HiDream-I1-Dev",
    render_steps=28,
    render_guidance=0.0,
    negative_prompt=False,
    tiny={"variant": "dev"},
)
HIDREAM_I1_FAST = replace(
    HIDREAM_I1_DEV,
    id="hidream-i1-fast",
    title="HiDream-I1 Fast",
    short_name="HiDream-I1 Fast",
    base_weights="HiDream-ai/HiDream-I1-Fast",
    render_steps=16,
    tiny={"variant": "fast"},
)

MODELS = (HIDREAM_I1_FULL, HIDREAM_I1_DEV, HIDREAM_I1_FAST)
