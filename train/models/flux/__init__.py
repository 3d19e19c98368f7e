"""FLUX.1 [dev] and [schnell]: the registry entries (torch-free), and FLUX.1-dev's measured
figures, from which the estimates of models no GPU has measured yet are scaled (``estimated``).

The maths is ``family.py``, the tiny pipeline ``tiny.py``, the architectures ``configs.py``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ...model_info import ModelInfo, Shape, estimated_from

ORDER = 10  # where its models stand in the lists users see (Cog choices, docs)

_DOUBLE_ATTN = r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_SINGLE_ATTN = r"attn\.(to_q|to_k|to_v)"
# LoRA presets reach only the repeated blocks: LoRA on the Flux embedders and final layer is legal
# (list them by name) but the kohya loaders disagree on it.
FLUX_PRESETS = {
    "attention": rf"(transformer_blocks\.\d+\.{_DOUBLE_ATTN}|single_transformer_blocks\.\d+\.{_SINGLE_ATTN})",
    "attention+mlp": (
        rf"(transformer_blocks\.\d+\.({_DOUBLE_ATTN}|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))"
        rf"|single_transformer_blocks\.\d+\.({_SINGLE_ATTN}|proj_mlp|proj_out))"
    ),
}

# Flux.1: 11.9 B transformer, CLIP-L + T5-XXL (4.9 B). Activations measured with the stock
# diffusers + peft step on an H200 (docs/benchmarks.md, "The stock baseline"): ~7.3 MiB per token.
FLUX_DEV = ModelInfo(
    id="flux-dev",
    family="flux",
    title="FLUX.1 [dev]",
    short_name="FLUX.1-dev",
    base_weights="black-forest-labs/FLUX.1-dev",
    pipeline="FluxPipeline",
    denoiser="transformer",
    hub_tag="flux",
    render_steps=28,
    render_guidance=3.5,
    target_presets=FLUX_PRESETS,
    default_targets="attention+mlp",
    text_tokens=512,
    max_text_tokens=512,
    denoiser_params_b=11.9,
    lora_params_m=65.37,
    kohya_params_m=115.80,
    text_encoder_params_b=4.9,
    activation_bytes=7.3 * 2**20,
    memory_measured=True,
    comfy_naming="kohya",
    lycoris_naming=True,
    kohya_architecture="flux-1-dev/lora",
    kohya_network_module="networks.lora_flux",
    # ComfyUI and Forge map the diffusers file's Flux names (transformer.transformer_blocks.N.attn.to_q)
    # onto their fused weights themselves; the BFL-named copy is on request (export.kohya: on)
    kohya_by_default=False,
    fuse_qkv=True,
    guidance_embed=True,
    step_s={"t4": 20.0, "a40": 4.0, "l40s": 2.4, "a100": 1.6, "h100": 1.0, "cpu": 600.0},
    tiny={"variant": "dev"},
)
FLUX_SCHNELL = replace(
    FLUX_DEV,
    id="flux-schnell",
    title="FLUX.1 [schnell]",
    short_name="FLUX.1-schnell",
    base_weights="black-forest-labs/FLUX.1-schnell",
    render_steps=4,
    render_guidance=0.0,
    text_tokens=256,
    max_text_tokens=256,
    guidance_embed=False,
    kohya_architecture="flux-1-schnell/lora",
    tiny={"variant": "schnell"},
)

MODELS = (FLUX_DEV, FLUX_SCHNELL)

# FLUX.1-dev's transformer at 1024 px: 11.9 B parameters, 3072 wide, 19 double + 38 single blocks,
# 4096 image + 512 text tokens.
FLUX_DEV_SHAPE = Shape(params_b=11.9, width=3072, blocks=19 + 38, tokens=4096 + 512)


def estimated(shape: Shape) -> dict[str, Any]:
    """The memory and speed fields of a model not yet measured, scaled from FLUX.1-dev's."""
    return estimated_from(FLUX_DEV, FLUX_DEV_SHAPE, shape)
