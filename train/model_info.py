"""What the trainer knows about one model id (``ModelInfo``), and how figures not yet measured are
derived from a measured model's (``Shape``, ``estimated_from``).

Plain data, torch-free: the spec (validated on a laptop), the client's estimates, the memory table
and the Cog entries read it. Each family folder (``train/models/<family>/__init__.py``) defines its
entries; ``train/families.py`` collects them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GB = 1e9


@dataclass(frozen=True)
class ModelInfo:
    id: str  # what users write in ``spec.model``
    family: str  # its folder: train/models/<family>/ (maths in family.py, tiny writer in tiny.py)
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
    # memory (docs/memory.md); figures in parameters (billions) and bytes. The parameter counts are
    # the full-size published architectures', counted on the meta device (train/models/meta.py;
    # tests/test_shapes.py holds these figures to that count).
    denoiser_params_b: float = 0.0
    lora_params_m: float = 0.0  # the default LoRA (rank 16, default targets): the diffusers file, millions
    kohya_params_m: float = 0.0  # its kohya/ComfyUI copy (fused modules carry zero blocks), millions
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
    # export.kohya "auto" writes that copy; False where ComfyUI and Forge read the diffusers file as
    # it is and the copy would only add bytes (FLUX.1: its fused q/k/v names make it 1.8x the size)
    kohya_by_default: bool = True
    # LoKr / LoHa: ComfyUI and Forge map LyCORIS's own names (``lycoris_`` + the diffusers module path
    # with dots as underscores) for this model (Flux, SD / SDXL), so the kohya copy is written in them
    lycoris_naming: bool = False
    kohya_architecture: str = ""  # modelspec.architecture of that file
    kohya_network_module: str = "networks.lora"  # its ss_network_module (what sd-scripts trained it with)
    channels_last: bool = False  # the denoiser has convolutions worth NHWC
    fuse_qkv: bool = False  # train/fused.py knows this denoiser's attention layout
    guidance_embed: bool = False  # the denoiser takes a guidance value (distilled guidance)
    # single-GPU seconds per optimizer step at 1024 px, batch 1, LoRA, per card (client estimates)
    step_s: dict[str, float] = field(default_factory=dict)
    tiny: dict[str, Any] = field(default_factory=dict)  # keyword arguments of its tiny.py write()
    options: str = "flow"  # the spec section of its training options: "flow" (flow matching) or "sdxl"
    short_name: str = ""  # the name its makers use in prose ("FLUX.1-schnell"); default: the title
    # edit models (docs/edit.md): control ("before") / reference images the model is conditioned on
    max_controls: int = 0  # the most control images one sample takes (0: a text-to-image model)
    controls_required: bool = False  # trains only on pairs (an edit model); else pairs are optional
    control_min_side: int = 0  # the pipeline refuses smaller control images (0: no limit)
    control_max_aspect: float = 0.0  # ... or longer ones than this side ratio (0: no limit)
    # video models (docs/video.md): a sample's frame count is frame_step * k + 1 (0: an image model)
    frame_step: int = 0
    max_frames: int = 0  # the most frames a sample may have
    default_frames: tuple[int, ...] = ()  # the spec's video.frames default
    fps: float = 0.0  # the frame rate the model was trained at (samples are drawn at it by default)
    temporal_factor: int = 1  # frames per latent frame (after the first)
    default_resolution: int = 1024  # the spec's resolutions default
    max_resolution: int = 0  # the largest resolution (square area) the denoiser takes (0: no limit)
    # image-to-video (Wan I2V): trained with each sample's first frame as its condition, rendered
    # from an input image (the run entry requires one); not an edit model, its dataset is plain clips
    image_to_video: bool = False
    # denoisers that train side by side (Wan 2.2 A14B: a high- and a low-noise expert); the parameter
    # and LoRA counts above are one expert's
    experts: int = 1

    def __post_init__(self) -> None:
        if not self.short_name:
            object.__setattr__(self, "short_name", self.title)

    @property
    def takes_controls(self) -> bool:
        """The model is conditioned on control / reference images (an edit model, or Flux.2)."""
        return self.max_controls > 0

    @property
    def run_images(self) -> int:
        """The most input images the run entry takes (an edit model's controls; I2V: the first frame)."""
        return max(self.max_controls, 1 if self.image_to_video else 0)

    @property
    def run_image_required(self) -> bool:
        """The run entry refuses a render without an input image (an edit model, an I2V model)."""
        return self.controls_required or self.image_to_video

    @property
    def video(self) -> bool:
        """A video model: trains on clips (and images as one-frame clips), renders videos."""
        return self.frame_step > 0

    @property
    def tiny_name(self) -> str:
        """The folder ``python -m train.tiny`` writes this model's tiny pipeline to."""
        return f"tiny-{self.id}"

    def tokens_per_sample(
        self,
        resolution: int,
        text_tokens: int | None = None,
        controls: int | None = None,
        frames: int | None = None,
    ) -> int:
        """Sequence tokens of one square sample (image + prompt, ``text_tokens`` defaulting to the
        model's prompt length, + any fixed text tokens), or latent pixels for a UNet. ``controls``:
        control / reference images in the sequence, each as large as the target (default: one for
        an edit model, none for the others). ``frames``: a video model's sample (default: the most
        of its default frame counts), whose tokens are one frame's times its latent frames."""
        side = resolution // self.latent_factor // self.patch
        if self.denoiser != "transformer":
            return side * side
        n_controls = (1 if self.controls_required else 0) if controls is None else controls
        image = side * side * (1 + n_controls) * self.latent_frames(frames)
        return image + (self.text_tokens if text_tokens is None else text_tokens) + self.fixed_text_tokens

    def latent_frames(self, frames: int | None = None) -> int:
        """Latent frames of a ``frames``-frame sample (default: the most of the model's default frame
        counts); 1 for an image model."""
        if not self.video:
            return 1
        n = frames if frames is not None else max(self.default_frames)
        return (n - 1) // self.temporal_factor + 1

    def weight_bytes(self, bytes_per_param: float = 2.0) -> dict[str, int]:
        """Bytes of each phase's weights at ``bytes_per_param`` (bf16: 2, fp8: 1)."""
        return {
            "text_encoders": int(self.text_encoder_params_b * GB * bytes_per_param),
            "denoiser": int(self.denoiser_params_b * self.experts * GB * bytes_per_param),
            "vae": int(self.vae_params_b * GB * 2),
        }


@dataclass(frozen=True)
class Shape:
    """What an estimate scales by: the denoiser's parameters (billions), its hidden width x repeated
    blocks (activations per token), and the sequence tokens of one 1024 px sample (step time)."""

    params_b: float
    width: int
    blocks: int
    tokens: int


def estimated_from(reference: ModelInfo, reference_shape: Shape, shape: Shape) -> dict[str, Any]:
    """``ModelInfo`` fields for a model whose memory and speed no GPU has measured yet, scaled from a
    measured ``reference``: activations per token by width x blocks, step seconds by parameters x
    tokens. The one place such a figure is derived; each model passes its own ``shape``."""
    assert reference.memory_measured, f"{reference.id}: scale from a measured model"
    work = shape.params_b / reference_shape.params_b * shape.tokens / reference_shape.tokens
    return {
        "activation_bytes": reference.activation_bytes
        * shape.width
        * shape.blocks
        / (reference_shape.width * reference_shape.blocks),
        "memory_measured": False,
        "step_s": {card: round(s * work, 2) for card, s in reference.step_s.items()},
    }
