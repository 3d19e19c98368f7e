"""The family registry: every model id the trainer knows, and the facts the rest of the code needs.

One ``ModelInfo`` per model id (``flux-dev``, ``sdxl``, ...). It is plain data and torch-free, so
the spec (validated on a laptop), the client's estimates, the memory table and the Cog entries all
read the same figures. The maths of a family — loading, prompt encoding, noise and target, loss,
rendering, LoRA naming — lives in ``train/models/<family>.py`` (class ``FAMILY``); its tiny random
pipeline in ``train/tiny/<family>.py`` (function ``write``). Nothing else names a family: code that
needs to know something about one asks its ``ModelInfo``. See docs/families.md, "How to add a family".
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

GB = 1e9


@dataclass(frozen=True)
class ModelInfo:
    id: str  # what users write in ``spec.model``
    family: str  # the maths module: train/models/<family>.py and train/tiny/<family>.py
    title: str  # for people: "FLUX.1 [dev]"
    base_weights: str  # the official diffusers repo on the Hub
    pipeline: str  # the diffusers pipeline class (model card, loading)
    denoiser: str  # the pipeline component that is trained: "transformer" | "unet"
    hub_tag: str  # the Hub tag of the base family, for the model card
    render_steps: int  # validation and run-entry defaults
    render_guidance: float
    target_presets: dict[str, str]  # LoRA presets "attention" / "attention+mlp" as full-name regexes
    default_targets: str  # the preset "default" means
    # text
    text_tokens: int = 0  # prompt tokens the encoder gets by default (0: the tokenizer's own length)
    max_text_tokens: int = 0  # most the model accepts (0: fixed by the tokenizer)
    negative_prompt: bool = False  # the pipeline uses a negative prompt at inference
    # memory (docs/memory.md); figures in parameters (billions) and bytes
    denoiser_params_b: float = 0.0
    text_encoder_params_b: float = 0.0
    vae_params_b: float = 0.1
    activation_bytes: float = (
        0.0  # per sequence token (or latent pixel for a UNet), per sample, no checkpointing
    )
    memory_measured: bool = False  # activation_bytes measured on a GPU (else estimated)
    latent_factor: int = 8  # pixels per latent side
    patch: int = 2  # latent pixels per token side (1 for a UNet: it counts latent pixels)
    # what the family supports
    full_finetune: str = ""  # "" when a full fine-tune fits an 80 GB card, else why not
    comfy_naming: str = ""  # the kohya/ComfyUI convention written next to the diffusers file ("" none)
    kohya_architecture: str = ""  # modelspec.architecture of that file
    kohya_network_module: str = "networks.lora"  # its ss_network_module (what sd-scripts trained it with)
    channels_last: bool = False  # the denoiser has convolutions worth NHWC
    fuse_qkv: bool = False  # train/fused.py knows this denoiser's attention layout
    guidance_embed: bool = False  # the denoiser takes a guidance value (distilled guidance)
    # single-GPU seconds per optimizer step at 1024 px, batch 1, LoRA, per card (client estimates)
    step_s: dict[str, float] = field(default_factory=dict)
    tiny: dict[str, Any] = field(default_factory=dict)  # keyword arguments of train/tiny/<family>.py write()
    options: str = "flow"  # the spec section of its training options: "flux", "sdxl" or "flow"
    short_name: str = ""  # the name its makers use in prose ("FLUX.1-schnell"); default: the title

    def __post_init__(self) -> None:
        if not self.short_name:
            object.__setattr__(self, "short_name", self.title)

    @property
    def tiny_name(self) -> str:
        """The folder ``python -m train.tiny`` writes this model's tiny pipeline to."""
        return f"tiny-{self.id}"

    def tokens_per_sample(self, resolution: int) -> int:
        """Sequence tokens of one square sample (image + text), or latent pixels for a UNet."""
        side = resolution // self.latent_factor // self.patch
        return side * side + (self.text_tokens if self.denoiser == "transformer" else 0)

    def weight_bytes(self, bytes_per_param: float = 2.0) -> dict[str, int]:
        """Bytes of each phase's weights at ``bytes_per_param`` (bf16: 2, fp8: 1)."""
        return {
            "text_encoders": int(self.text_encoder_params_b * GB * bytes_per_param),
            "denoiser": int(self.denoiser_params_b * GB * bytes_per_param),
            "vae": int(self.vae_params_b * GB * 2),
        }


_FLUX_DOUBLE_ATTN = r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_FLUX_SINGLE_ATTN = r"attn\.(to_q|to_k|to_v)"
# LoRA presets reach only the repeated blocks: LoRA on the Flux embedders and final layer is legal
# (list them by name) but the kohya loaders disagree on it.
FLUX_PRESETS = {
    "attention": rf"(transformer_blocks\.\d+\.{_FLUX_DOUBLE_ATTN}|single_transformer_blocks\.\d+\.{_FLUX_SINGLE_ATTN})",
    "attention+mlp": (
        rf"(transformer_blocks\.\d+\.({_FLUX_DOUBLE_ATTN}|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))"
        rf"|single_transformer_blocks\.\d+\.({_FLUX_SINGLE_ATTN}|proj_mlp|proj_out))"
    ),
}
SDXL_PRESETS = {
    "attention": r".*transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",
    "attention+mlp": r".*transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))",
}

# Flux.1: 11.9 B transformer, CLIP-L + T5-XXL (4.9 B). Activations measured with the stock
# diffusers + peft step on an H200 (shared/reference/gpu-baseline.md): ~7.3 MiB per token.
FLUX_DEV = ModelInfo(
    id="flux-dev",
    family="flux",
    options="flux",
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
    text_encoder_params_b=4.9,
    activation_bytes=7.3 * 2**20,
    memory_measured=True,
    comfy_naming="kohya",
    kohya_architecture="flux-1-dev/lora",
    kohya_network_module="networks.lora_flux",
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
SDXL = ModelInfo(
    id="sdxl",
    family="sdxl",
    options="sdxl",
    title="Stable Diffusion XL 1.0",
    base_weights="stabilityai/stable-diffusion-xl-base-1.0",
    pipeline="StableDiffusionXLPipeline",
    denoiser="unet",
    hub_tag="stable-diffusion-xl",
    render_steps=30,
    render_guidance=5.0,
    target_presets=SDXL_PRESETS,
    default_targets="attention",
    negative_prompt=True,
    denoiser_params_b=2.6,
    text_encoder_params_b=0.8,
    activation_bytes=0.46 * 2**20,
    memory_measured=True,
    patch=1,
    comfy_naming="kohya",
    kohya_architecture="stable-diffusion-xl-v1-base/lora",
    channels_last=True,
    step_s={"t4": 3.0, "a40": 0.9, "l40s": 0.55, "a100": 0.4, "h100": 0.28, "cpu": 120.0},
)

_REGISTERED: list[ModelInfo] = [FLUX_DEV, FLUX_SCHNELL, SDXL]

# -- Flux.2 ---------------------------------------------------------------------------------------

# -- SD3.5 and Chroma -----------------------------------------------------------------------------

# -- Qwen-Image and Z-Image -----------------------------------------------------------------------

# The order is the order users see (Cog choices, docs): the order of registration above.
MODELS: dict[str, ModelInfo] = {m.id: m for m in _REGISTERED}
MODEL_IDS: tuple[str, ...] = tuple(MODELS)


def model_info(model: str) -> ModelInfo:
    """The registry entry of ``model``; a ``KeyError`` naming the known ids otherwise."""
    try:
        return MODELS[model]
    except KeyError:
        raise KeyError(f"unknown model {model!r}; known: {', '.join(MODEL_IDS)}") from None


def family_of(model: str) -> str:
    """The family (maths module) of a model id: ``flux-dev`` -> ``flux``."""
    return model_info(model).family
