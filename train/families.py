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
    fixed_text_tokens: int = 0  # text tokens in every sequence besides the prompt's (SD3: 77 CLIP tokens)
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
    # edit models (docs/edit.md): control ("before") / reference images the model is conditioned on
    max_controls: int = 0  # the most control images one sample takes (0: a text-to-image model)
    controls_required: bool = False  # trains only on pairs (an edit model); else pairs are optional
    control_min_side: int = 0  # the pipeline refuses smaller control images (0: no limit)
    control_max_aspect: float = 0.0  # ... or longer ones than this side ratio (0: no limit)

    def __post_init__(self) -> None:
        if not self.short_name:
            object.__setattr__(self, "short_name", self.title)

    @property
    def takes_controls(self) -> bool:
        """The model is conditioned on control / reference images (an edit model, or Flux.2)."""
        return self.max_controls > 0

    @property
    def tiny_name(self) -> str:
        """The folder ``python -m train.tiny`` writes this model's tiny pipeline to."""
        return f"tiny-{self.id}"

    def tokens_per_sample(
        self, resolution: int, text_tokens: int | None = None, controls: int | None = None
    ) -> int:
        """Sequence tokens of one square sample (image + prompt, ``text_tokens`` defaulting to the
        model's prompt length, + any fixed text tokens), or latent pixels for a UNet. ``controls``:
        control / reference images in the sequence, each as large as the target (default: one for
        an edit model, none for the others)."""
        side = resolution // self.latent_factor // self.patch
        if self.denoiser != "transformer":
            return side * side
        n_controls = (1 if self.controls_required else 0) if controls is None else controls
        image = side * side * (1 + n_controls)
        return image + (self.text_tokens if text_tokens is None else text_tokens) + self.fixed_text_tokens

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

# FLUX.1 Kontext [dev] (black-forest-labs/FLUX.1-Kontext-dev): FLUX.1-dev's 11.9 B transformer and
# text encoders, trained to edit: the control image's latents join the sequence after the target's
# (position ids with a first coordinate of 1). Model card: 28 steps, guidance 2.5. Step times: the
# sequence holds twice the image tokens.
FLUX_KONTEXT_DEV = replace(
    FLUX_DEV,
    id="flux1-kontext-dev",
    family="flux_kontext",
    title="FLUX.1 Kontext [dev]",
    short_name="FLUX.1-Kontext-dev",
    base_weights="black-forest-labs/FLUX.1-Kontext-dev",
    pipeline="FluxKontextPipeline",
    render_guidance=2.5,
    kohya_architecture="flux-1-kontext-dev/lora",
    step_s={card: round(s * (2 * 4096 + 512) / (4096 + 512), 2) for card, s in FLUX_DEV.step_s.items()},
    max_controls=1,
    controls_required=True,
    tiny={"variant": "dev"},
)
_REGISTERED.append(FLUX_KONTEXT_DEV)

# -- Flux.2 ---------------------------------------------------------------------------------------

_FLUX2_DOUBLE_ATTN = r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
# Flux.2's single blocks have no attention-only linears: to_qkv_mlp_proj (q, k, v and the MLP's
# input) and to_out (attention and MLP outputs) are fused, so "attention" takes them whole.
_FLUX2_SINGLE = r"attn\.(to_qkv_mlp_proj|to_out)"
FLUX2_PRESETS = {
    "attention": rf"(transformer_blocks\.\d+\.{_FLUX2_DOUBLE_ATTN}|single_transformer_blocks\.\d+\.{_FLUX2_SINGLE})",
    "attention+mlp": (
        rf"(transformer_blocks\.\d+\.({_FLUX2_DOUBLE_ATTN}|ff\.(linear_in|linear_out)|ff_context\.(linear_in|linear_out))"
        rf"|single_transformer_blocks\.\d+\.{_FLUX2_SINGLE})"
    ),
}


# Flux2ImageProcessor.check_image_input refuses references under 64 px a side or over 8:1.
_FLUX2_REFERENCE_LIMITS: dict[str, Any] = {"control_min_side": 64, "control_max_aspect": 8.0}


def _flux2_figures(params_b: float, width: int, blocks: int) -> dict[str, Any]:
    """Estimates from FLUX.1-dev's measured figures until a GPU run measures them: activations per
    token scaled by hidden width x blocks (FLUX.1-dev: 3072 x 57); step seconds by parameters x
    tokens, where Flux.2 at 1024 px has FLUX.1's 4096 image + 512 text tokens (16 px per token)."""
    return {
        "activation_bytes": FLUX_DEV.activation_bytes * width * blocks / (3072 * 57),
        "memory_measured": False,
        "step_s": {
            card: round(s * params_b / FLUX_DEV.denoiser_params_b, 2) for card, s in FLUX_DEV.step_s.items()
        },
    }


# FLUX.2 [dev] (black-forest-labs/FLUX.2-dev; diffusers' convert_flux2_to_diffusers config): 8 double +
# 48 single blocks, 48 heads x 128 = 6144 wide, 128 latent channels (the 32-channel VAE, 2x2
# patchified), guidance embedding; 32.2 B parameters (counted from that config). Text encoder
# Mistral-Small-3.2-24B (24 B, hidden states of layers 10/20/30 stacked: 15360 wide), prompts padded
# to 512 tokens (the pipeline's default and BFL's). Model card: 50 steps, guidance 4. Reference
# images (Flux2Pipeline's image=[...]): optional, BFL's editing guide recommends at most 6 for [dev]
# (docs.bfl.ai/guides/prompting_editing_overview; the pipeline itself sets no limit).
FLUX2_DEV = ModelInfo(
    id="flux2-dev",
    family="flux2",
    title="FLUX.2 [dev]",
    short_name="FLUX.2-dev",
    base_weights="black-forest-labs/FLUX.2-dev",
    pipeline="Flux2Pipeline",
    denoiser="transformer",
    hub_tag="flux2",
    render_steps=50,
    render_guidance=4.0,
    target_presets=FLUX2_PRESETS,
    default_targets="attention+mlp",
    text_tokens=512,
    max_text_tokens=512,
    denoiser_params_b=32.2,
    text_encoder_params_b=24.0,
    full_finetune="FLUX.2 [dev]'s 32.2 B-parameter transformer needs ~322 GB for bf16 weights, gradients "
    "and 8-bit AdamW states, far more than an 80 GB card holds",
    comfy_naming="kohya",
    kohya_architecture="Flux.2-dev/lora",
    kohya_network_module="networks.lora_flux_2",
    guidance_embed=True,
    max_controls=6,
    controls_required=False,
    **_FLUX2_REFERENCE_LIMITS,
    tiny={"variant": "dev"},
    **_flux2_figures(32.2, 6144, 8 + 48),
)
_REGISTERED.append(FLUX2_DEV)
# FLUX.2 [klein] 4B (black-forest-labs/FLUX.2-klein-4B, step-distilled): 5 double + 20 single blocks,
# 24 heads x 128 = 3072 wide, no guidance embedding; 3.9 B parameters (counted from the config).
# Text encoder Qwen3-4B (4.0 B; layers 9/18/27 stacked: 7680 wide), 512 prompt tokens. Model card:
# 4 steps, guidance 1 (distilled: no CFG). Klein 4B is Apache-2.0. Reference images: optional, up to 4
# for [klein] 4B and 9B (BFL's editing guide, docs.bfl.ai/guides/prompting_editing_overview).
FLUX2_KLEIN_4B = ModelInfo(
    id="flux2-klein-4b",
    family="flux2_klein",
    title="FLUX.2 [klein] 4B",
    short_name="FLUX.2-klein-4B",
    base_weights="black-forest-labs/FLUX.2-klein-4B",
    pipeline="Flux2KleinPipeline",
    denoiser="transformer",
    hub_tag="flux2",
    render_steps=4,
    render_guidance=1.0,
    target_presets=FLUX2_PRESETS,
    default_targets="attention+mlp",
    text_tokens=512,
    max_text_tokens=512,
    denoiser_params_b=3.9,
    text_encoder_params_b=4.0,
    comfy_naming="kohya",
    kohya_architecture="Flux.2-klein-4b/lora",
    kohya_network_module="networks.lora_flux_2",
    max_controls=4,
    controls_required=False,
    **_FLUX2_REFERENCE_LIMITS,
    tiny={"distilled": True},
    **_flux2_figures(3.9, 3072, 5 + 20),
)
_REGISTERED.append(FLUX2_KLEIN_4B)
# FLUX.2 [klein] 9B (black-forest-labs/FLUX.2-klein-9B, step-distilled): 8 double + 24 single blocks,
# 32 heads x 128 = 4096 wide; 9.1 B parameters. Text encoder Qwen3-8B (8.2 B; 12288 wide stacked).
FLUX2_KLEIN_9B = replace(
    FLUX2_KLEIN_4B,
    id="flux2-klein-9b",
    title="FLUX.2 [klein] 9B",
    short_name="FLUX.2-klein-9B",
    base_weights="black-forest-labs/FLUX.2-klein-9B",
    denoiser_params_b=9.1,
    text_encoder_params_b=8.2,
    full_finetune="FLUX.2 [klein] 9B's 9.1 B-parameter transformer needs ~91 GB for bf16 weights, "
    "gradients and 8-bit AdamW states, more than an 80 GB card holds",
    kohya_architecture="Flux.2-klein-9b/lora",
    tiny={"distilled": True, "double": 2, "single": 2},
    **_flux2_figures(9.1, 4096, 8 + 24),
)
_REGISTERED.append(FLUX2_KLEIN_9B)
# The [klein] base models (undistilled, what BFL recommends for fine-tuning): the same transformers
# and text encoders; model cards: 50 steps, CFG 4 (against the empty prompt).
FLUX2_KLEIN_BASE_4B = replace(
    FLUX2_KLEIN_4B,
    id="flux2-klein-base-4b",
    title="FLUX.2 [klein] Base 4B",
    short_name="FLUX.2-klein-base-4B",
    base_weights="black-forest-labs/FLUX.2-klein-base-4B",
    render_steps=50,
    render_guidance=4.0,
    tiny={"distilled": False},
)
_REGISTERED.append(FLUX2_KLEIN_BASE_4B)
FLUX2_KLEIN_BASE_9B = replace(
    FLUX2_KLEIN_9B,
    id="flux2-klein-base-9b",
    title="FLUX.2 [klein] Base 9B",
    short_name="FLUX.2-klein-base-9B",
    base_weights="black-forest-labs/FLUX.2-klein-base-9B",
    render_steps=50,
    render_guidance=4.0,
    tiny={"distilled": False, "double": 2, "single": 2},
)
_REGISTERED.append(FLUX2_KLEIN_BASE_9B)

# -- SD3.5 and Chroma -----------------------------------------------------------------------------

_SD3_ATTN = r"(attn|attn2)\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
# MMDiT blocks: the joint attention (image and text projections), SD3.5 Medium's second image
# self-attention (attn2), and both streams' feed-forwards; the last block has no text outputs.
SD3_PRESETS = {
    "attention": rf"transformer_blocks\.\d+\.{_SD3_ATTN}",
    "attention+mlp": rf"transformer_blocks\.\d+\.({_SD3_ATTN}|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))",
}


def _step_s_from_flux_dev(params_b: float, tokens: int) -> dict[str, float]:
    """Per-card step seconds scaled from FLUX.1-dev's measured ones by parameters x sequence tokens
    (FLUX.1-dev: 11.9 B, 4096 image + 512 text tokens at 1024 px); estimates until measured."""
    factor = params_b / FLUX_DEV.denoiser_params_b * tokens / (4096 + FLUX_DEV.text_tokens)
    return {card: round(s * factor, 2) for card, s in FLUX_DEV.step_s.items()}


def _activation_bytes_from_flux_dev(width: int, blocks: int) -> float:
    """FLUX.1-dev's measured 7.3 MiB per token scaled by hidden width x blocks (3072 x 57)."""
    return FLUX_DEV.activation_bytes * width * blocks / (3072 * (19 + 38))


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
    text_encoder_params_b=5.57,
    activation_bytes=_activation_bytes_from_flux_dev(2432, 38),
    memory_measured=False,
    full_finetune="SD3.5 Large's 8.1 B-parameter transformer needs ~81 GB for bf16 weights, gradients "
    "and 8-bit AdamW states, more than an 80 GB card holds",
    step_s=_step_s_from_flux_dev(8.06, 4096 + 77 + 256),
    tiny={"variant": "large"},
)
_REGISTERED.append(SD35_LARGE)
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
    activation_bytes=_activation_bytes_from_flux_dev(1536, 24),
    full_finetune="",
    step_s=_step_s_from_flux_dev(2.24, 4096 + 77 + 256),
    tiny={"variant": "medium"},
)
_REGISTERED.append(SD35_MEDIUM)
# Chroma1-HD (lodestones/Chroma1-HD, the repo diffusers' ChromaPipeline names): FLUX.1-schnell's
# layout (19 double + 38 single blocks, 3072 wide) with the per-block modulation replaced by one
# approximator network; 8.90 B parameters counted from its config. T5-XXL only (4.76 B), masked,
# 512 tokens. Undistilled: real CFG with a negative prompt, no guidance embedding. Model card:
# 40 steps, CFG 3.0. Activations as FLUX.1-dev's (the same blocks and widths).
CHROMA = ModelInfo(
    id="chroma",
    family="chroma",
    title="Chroma1-HD",
    short_name="Chroma1-HD",
    base_weights="lodestones/Chroma1-HD",
    pipeline="ChromaPipeline",
    denoiser="transformer",
    hub_tag="chroma",
    render_steps=40,
    render_guidance=3.0,
    target_presets=FLUX_PRESETS,  # the same block and module names as Flux.1
    default_targets="attention+mlp",
    text_tokens=512,
    max_text_tokens=512,
    negative_prompt=True,
    denoiser_params_b=8.90,
    text_encoder_params_b=4.76,
    activation_bytes=_activation_bytes_from_flux_dev(3072, 19 + 38),
    memory_measured=False,
    full_finetune="Chroma's 8.9 B-parameter transformer needs ~89 GB for bf16 weights, gradients and "
    "8-bit AdamW states, more than an 80 GB card holds",
    comfy_naming="kohya",
    kohya_architecture="chroma/lora",
    kohya_network_module="networks.lora_flux",
    step_s=_step_s_from_flux_dev(8.90, 4096 + 512),
)
_REGISTERED.append(CHROMA)

# -- Qwen-Image and Z-Image -----------------------------------------------------------------------

# Estimates from Flux.1-dev's measured figures (memory_measured=False until a GPU measures them):
# activations per token scale with hidden width x depth (Flux.1: 3072 x (19 + 38) blocks), step
# times with parameters x tokens at 1024 px (Flux.1: 11.9 B x (4096 + 512) tokens).
_FLUX_WIDTH_DEPTH = 3072 * (19 + 38)
_FLUX_PARAMS_TOKENS = 11.9 * (4096 + 512)


def _scaled_step_s(params_b: float, text_tokens: int) -> dict[str, float]:
    factor = params_b * (4096 + text_tokens) / _FLUX_PARAMS_TOKENS
    return {card: round(s * factor, 2) for card, s in FLUX_DEV.step_s.items()}


_QWEN_ATTN = r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
QWEN_IMAGE_PRESETS = {
    "attention": rf"transformer_blocks\.\d+\.{_QWEN_ATTN}",
    "attention+mlp": rf"transformer_blocks\.\d+\.({_QWEN_ATTN}|(img_mlp|txt_mlp)\.net\.(0\.proj|2))",
}
# Qwen/Qwen-Image: a 20.4 B MMDiT (60 dual-stream blocks, 24 heads x 128 = 3072 wide, text width
# 3584), Qwen2.5-VL-7B-Instruct as text encoder (8.3 B with its vision tower, which the pipeline
# loads), the Wan-2.1-style 3D VAE (0.13 B, 8x spatial, 16 channels). Prompts: the pipeline's
# default max_sequence_length is 512, its limit 1024. The model card renders 50 steps with
# true_cfg_scale 4.0 and negative_prompt " ".
QWEN_IMAGE = ModelInfo(
    id="qwen-image",
    family="qwen_image",
    title="Qwen-Image",
    base_weights="Qwen/Qwen-Image",
    pipeline="QwenImagePipeline",
    denoiser="transformer",
    hub_tag="qwen-image",
    render_steps=50,
    render_guidance=4.0,
    target_presets=QWEN_IMAGE_PRESETS,
    default_targets="attention+mlp",
    text_tokens=512,
    max_text_tokens=1024,
    negative_prompt=True,
    denoiser_params_b=20.4,
    text_encoder_params_b=8.3,
    vae_params_b=0.13,
    activation_bytes=7.3 * 2**20 * (3072 * 60) / _FLUX_WIDTH_DEPTH,
    memory_measured=False,
    full_finetune="the 20.4 B-parameter transformer needs ~204 GB for bf16 weights, gradients and "
    "8-bit AdamW states, more than the largest card's 80 GB",
    comfy_naming="kohya",
    kohya_architecture="qwen-image/lora",
    kohya_network_module="networks.lora_qwen_image",
    step_s=_scaled_step_s(20.4, 512),
)
_REGISTERED.append(QWEN_IMAGE)
# Qwen/Qwen-Image-Edit: Qwen-Image's transformer and VAE trained to edit; the control image enters
# twice: its VAE latents join the sequence after the target's, and Qwen2.5-VL reads it with the
# instruction (so the text embeddings depend on the control image). Model card: 50 steps,
# true_cfg_scale 4.0, negative prompt " ". The text stream carries the VL's image tokens too: the
# pipeline reads its control at ~1 MP (1036 x 1036 for the VL: 37 x 37 = 1369 tokens), plus the
# vision start / end and the template's 5 tokens after the prompt.
QWEN_IMAGE_EDIT = replace(
    QWEN_IMAGE,
    id="qwen-image-edit",
    family="qwen_image_edit",
    title="Qwen-Image-Edit",
    base_weights="Qwen/Qwen-Image-Edit",
    pipeline="QwenImageEditPipeline",
    kohya_architecture="qwen-image-edit/lora",
    fixed_text_tokens=1369 + 2 + 5,
    step_s=_scaled_step_s(20.4, 512 + 1376 + 4096),
    max_controls=1,
    controls_required=True,
)
_REGISTERED.append(QWEN_IMAGE_EDIT)
# Qwen/Qwen-Image-Edit-2509 ("Edit Plus"): the same architecture, up to three control images (each
# read by Qwen2.5-VL at ~384x384 and VAE-encoded at ~1 MP), QwenImageEditPlusPipeline. Text tokens
# besides the prompt, for one control: 14 x 14 = 196 image tokens, "Picture 1: " and the vision
# start / end (7), the template's 5 after the prompt.
QWEN_IMAGE_EDIT_PLUS = replace(
    QWEN_IMAGE_EDIT,
    id="qwen-image-edit-plus",
    title="Qwen-Image-Edit-2509",
    base_weights="Qwen/Qwen-Image-Edit-2509",
    pipeline="QwenImageEditPlusPipeline",
    kohya_architecture="qwen-image-edit-plus/lora",
    fixed_text_tokens=196 + 7 + 5,
    step_s=_scaled_step_s(20.4, 512 + 208 + 4096),
    max_controls=3,
    tiny={"plus": True},
)
_REGISTERED.append(QWEN_IMAGE_EDIT_PLUS)

_Z_ATTN = r"attention\.(to_q|to_k|to_v|to_out\.0)"
_Z_BLOCKS = r"(layers|noise_refiner|context_refiner)\.\d+"
Z_IMAGE_PRESETS = {
    "attention": rf"{_Z_BLOCKS}\.{_Z_ATTN}",
    "attention+mlp": rf"{_Z_BLOCKS}\.({_Z_ATTN}|feed_forward\.(w1|w2|w3))",
}
# Tongyi-MAI/Z-Image-Turbo: a 6.15 B single-stream DiT (3840 wide, 30 blocks + 2 noise-refiner
# blocks over the image tokens + 2 context-refiner blocks over the text), Qwen3-4B as text
# encoder (4.0 B), the Flux.1 VAE (0.08 B, 8x, 16 channels). Prompts: the pipeline's default is
# 512 tokens; the transformer's text RoPE axis has 1024 positions and the image starts after the
# caption padded to a multiple of 32, so at most 992. Turbo: guidance 0 (distilled, no CFG) and
# 8 steps (the card's "9 steps = 8 forwards" predates diffusers' default sigmas, which make N
# steps N forwards). The full fine-tune fits: 6.15 B x 10 bytes = 62 GB.
Z_IMAGE_TURBO = ModelInfo(
    id="z-image-turbo",
    family="z_image",
    title="Z-Image-Turbo",
    base_weights="Tongyi-MAI/Z-Image-Turbo",
    pipeline="ZImagePipeline",
    denoiser="transformer",
    hub_tag="z-image",
    render_steps=8,
    render_guidance=0.0,
    target_presets=Z_IMAGE_PRESETS,
    default_targets="attention+mlp",
    text_tokens=512,
    max_text_tokens=992,
    negative_prompt=False,
    denoiser_params_b=6.15,
    text_encoder_params_b=4.0,
    vae_params_b=0.08,
    activation_bytes=7.3 * 2**20 * (3840 * (30 + 2)) / _FLUX_WIDTH_DEPTH,
    memory_measured=False,
    comfy_naming="kohya",
    kohya_architecture="z-image-turbo/lora",
    kohya_network_module="networks.lora_zimage",
    step_s=_scaled_step_s(6.15, 512),
    tiny={"shift": 3.0},  # the repo's scheduler: fixed shift 3, no dynamic shifting
)
_REGISTERED.append(Z_IMAGE_TURBO)
# Tongyi-MAI/Z-Image: the undistilled base of the same architecture; the card renders 50 steps
# with CFG 4 and a negative prompt; its scheduler has a fixed shift of 6.
Z_IMAGE = replace(
    Z_IMAGE_TURBO,
    id="z-image",
    title="Z-Image",
    base_weights="Tongyi-MAI/Z-Image",
    render_steps=50,
    render_guidance=4.0,
    negative_prompt=True,
    kohya_architecture="z-image/lora",
    tiny={"shift": 6.0},
)
_REGISTERED.append(Z_IMAGE)

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
