"""The training spec: one versioned, torch-free schema shared by the container and the client.

A spec is validated once, at the edge (``parse_spec``), and every problem is reported
together with the field's dotted path and the accepted values. The validated object is
frozen, holds the resolved defaults (learning rate, base weights, target modules, ...)
and is written into the output's ``config.json``.

This module must not import torch: the submit client validates specs on a laptop.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from .dataset_rules import VideoRule
from .families import MODEL_IDS, family_of, model_info

SPEC_VERSION = 2
READABLE_SPEC_VERSIONS = (1, 2)  # version 1 is upgraded on reading (upgrade_v1)

# The model ids come from the family registry (train/families.py, torch-free like this module).
ModelFamily = Literal[MODEL_IDS]  # type: ignore[valid-type]
MODEL_FAMILIES: tuple[str, ...] = MODEL_IDS
DEFAULT_BASE_WEIGHTS: dict[str, str] = {m: model_info(m).base_weights for m in MODEL_IDS}

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


class SpecError(ValueError):
    """A spec that cannot be used. ``problems`` holds one ``"field: message"`` line per issue."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid training spec:\n" + "\n".join(f"  - {p}" for p in problems))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraSpec(_Section):
    type: Literal["lora", "lokr", "loha"] = Field(
        default="lora",
        description="the adapter: lora, or the LyCORIS lokr (Kronecker product) or loha (Hadamard product)",
    )
    rank: int = Field(default=16, ge=1, le=1024, description="LoRA rank r (LoKr: of its second factor)")
    alpha: float | None = Field(
        default=None, gt=0, le=4096, description="LoRA alpha; default: equal to the rank"
    )
    targets: str | list[str] = Field(
        default="default",
        description='target modules: a preset ("default", "attention", "attention+mlp") or module names',
    )
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    factor: int = Field(
        default=16,
        ge=-1,
        le=1024,
        description="lokr: each weight side n splits into factor x n/factor (-1: the split nearest the square root)",
    )

    @field_validator("factor")
    @classmethod
    def _factor(cls, v: int) -> int:
        if v == 0:
            raise ValueError("0 is no factor; use -1 (the split nearest the square root) or 1 and up")
        return v

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, str):
            if v not in ("default", "attention", "attention+mlp"):
                raise ValueError(
                    f'unknown preset {v!r}; use "default", "attention", "attention+mlp" or a list of module names'
                )
            return v
        if not v:
            raise ValueError("the list of target modules is empty")
        bad = [m for m in v if not _MODULE_NAME.match(m)]
        if bad:
            raise ValueError(f"not module names: {bad}")
        return v


class ValidationSpec(_Section):
    prompts: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="prompts rendered at the interval and at the end (the trigger word is added)",
    )
    interval: int = Field(
        default=0, ge=0, description="steps between validation renders; 0 = only at the end"
    )
    num_inference_steps: int | None = Field(
        default=None,
        ge=1,
        le=200,
        description="default: the model's (28 flux-dev, 4 flux-schnell, 30 sdxl, ...)",
    )
    guidance_scale: float | None = Field(
        default=None,
        ge=0,
        le=30,
        description="default: the model's (3.5 flux-dev, 0 flux-schnell, 5 sdxl, ...)",
    )
    resolution: int | None = Field(
        default=None, ge=64, le=4096, description="square render size; default: the first training resolution"
    )
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1, description="default: the training seed")
    holdout: int | float = Field(
        default=0,
        ge=0,
        le=10_000,
        description="images kept out of training for the held-out loss: a count (1, 2, ...) or a "
        "fraction of the dataset (below 1); 0 = none",
    )
    scorer: str | None = Field(
        default=None,
        min_length=1,
        description="a CLIP model (folder, name under weights/, or Hub id) that scores each validation "
        "step's renders: likeness to the training images and agreement with each prompt",
    )
    control_images: list[str] = Field(
        default_factory=list,
        max_length=8,
        description="edit models: the control images each validation prompt is rendered on, by their "
        "names in the dataset (a target's name takes its controls; a control file without a target "
        "is never trained on); default: the controls without a target, else those of the held-out "
        "pairs, else the first pair's. Image-to-video models: the clips (or images) whose first frame "
        "each prompt animates; default: the held-out samples', else the first training clip's",
    )

    @field_validator("holdout")
    @classmethod
    def _holdout(cls, v: int | float) -> int | float:
        if v >= 1 and v != int(v):
            raise ValueError(f"a count of images (1, 2, ...) or a fraction below 1, got {v}")
        return v

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, v: list[str]) -> list[str]:
        for i, p in enumerate(v):
            if not p.strip():
                raise ValueError(f"prompt {i} is empty")
            if len(p) > 2000:
                raise ValueError(f"prompt {i} is longer than 2000 characters")
        return v


class DatasetSpec(_Section):
    """Limits applied while staging an uploaded archive (the defaults suit 100 MiB uploads)."""

    max_files: int = Field(default=20_000, ge=1, le=1_000_000, description="most archive entries accepted")
    max_bytes: int = Field(
        default=8 * 2**30, ge=1, le=256 * 2**30, description="most uncompressed bytes accepted"
    )
    max_image_pixels: int = Field(
        default=80_000_000, ge=4096, le=1_000_000_000, description="largest image (w*h) accepted"
    )
    default_caption: str = Field(default="", max_length=2000, description="caption for images that have none")
    trigger_word_position: Literal["prepend", "append"] = "prepend"
    max_clip_seconds: float = Field(
        default=600.0, gt=0, le=86_400, description="video models: longer clips are skipped (named)"
    )
    max_clip_frames: int = Field(
        default=50_000,
        ge=1,
        le=10_000_000,
        description="video models: a clip listing more frames is refused as unsafe before decoding",
    )


VALIDATION_FRAMES = 17  # the most frames a validation render has by default (4k+1 and 8k+1 alike)


class VideoSpec(_Section):
    """Video models (docs/video.md): how a clip becomes training samples. Image models refuse it."""

    frames: list[int] | None = Field(
        default=None,
        min_length=1,
        max_length=8,
        description="frames per sample (the model's valid counts, e.g. 4k+1 for Wan); several make "
        "frame-count buckets: each clip takes the most it can fill; default: the model's",
    )
    fps: float | None = Field(
        default=None, gt=0, le=120, description="the frame rate samples are drawn at; default: the model's"
    )
    sampling: Literal["start", "random", "uniform"] = Field(
        default="start",
        description="start: consecutive frames from the clip's start; random: from a random place, a new "
        "window each epoch (drawn from the seed); uniform: spread evenly over the whole clip",
    )
    windows: int = Field(
        default=4,
        ge=1,
        le=64,
        description="random: windows drawn per clip and cached; each epoch trains the next one",
    )
    validation_frames: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="frames of a validation render; default: the fewest in frames, at most 17",
    )
    expert: Literal["both", "high_noise", "low_noise"] = Field(
        default="both",
        description="Wan 2.2 A14B: train a LoRA for both experts (each on the timesteps it serves), or "
        "for the high-noise or the low-noise one alone",
    )


class SdxlOptions(_Section):
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = Field(
        default="auto", description="auto: what the base model's scheduler config says"
    )
    snr_gamma: float | None = Field(
        default=None, gt=0, le=100, description="min-SNR loss weighting; None disables it"
    )
    noise_offset: float = Field(default=0.0, ge=0, le=1)


class FlowOptions(_Section):
    """Every flow-matching family (Flux.1, Flux.2, SD3.5, Chroma, Qwen-Image, Z-Image; spec version 1
    had a ``flux`` section for Flux.1: ``upgrade_v1`` maps it here). train/models/flow.py says what
    each sampling means."""

    timestep_sampling: Literal["auto", "logit_normal", "shift", "uniform"] = Field(
        default="auto",
        description="auto: as the family was trained (its module says how; usually logit-normal "
        "sigmas with the base model's scheduler shift, resolution-dependent where the scheduler's is); "
        "shift: logit-normal sigmas with a constant shift",
    )
    shift: float | None = Field(
        default=None,
        gt=0,
        le=20,
        description="timestep shift for auto and shift; default: the family's (auto), the base "
        "model's scheduler config (shift)",
    )
    logit_mean: float = Field(default=0.0, ge=-5, le=5)
    logit_std: float = Field(default=1.0, gt=0, le=5)
    guidance: float = Field(
        default=1.0,
        ge=0,
        le=30,
        description="value fed to a guidance embedding while training, where the model has one",
    )
    max_sequence_length: int | None = Field(
        default=None, ge=1, le=4096, description="prompt tokens; default: the model's"
    )


class SpeedOptions(_Section):
    """Step-speed levers (train/speed.py). All but fp8_base are numerically equivalent to the plain path."""

    attention: Literal["auto", "flash", "efficient", "math", "cudnn"] = Field(
        default="auto", description="SDPA backend on CUDA; auto = flash / memory-efficient, never cuDNN"
    )
    compile: Literal["auto", "off", "blocks"] = Field(
        default="auto",
        description="blocks: torch.compile the repeated blocks; auto: blocks on a GPU for runs of "
        "200+ steps (the warm-up pays for itself), falling back to eager where it cannot compile",
    )
    channels_last: Literal["auto", "on", "off"] = Field(
        default="auto", description="NHWC UNet (SDXL); auto: on CUDA"
    )
    cache_on_device: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="keep cached latents/text on the accelerator; auto: when they fit in 5% of free memory",
    )
    fuse_qkv: Literal["off", "on"] = Field(
        default="off",
        description="LoRA on Flux: q/k/v projections and their LoRA as one matmul each (same numbers)",
    )
    fuse_lora: Literal["off", "on"] = Field(
        default="off",
        description="LoRA: each other LoRA linear computes its base and LoRA down projection as one matmul "
        "(same numbers); layers that run fp8 keep their own path",
    )
    fp8_base: Literal["off", "on"] = Field(
        default="off",
        description="LoRA only: the frozen base's linears in the repeated blocks run fp8 matmuls "
        "(e4m3, per-row scales; Ada/Hopper GPUs); not bit-equal to bf16",
    )


EXPORT_DTYPES = {"bf16": 2, "fp16": 2, "fp32": 4}  # bytes per parameter in the LoRA files


class ExportSpec(_Section):
    """How the trained weights are written."""

    dtype: Literal["bf16", "fp16", "fp32"] = Field(
        default="bf16",
        description="the LoRA files' dtype, the diffusers and the kohya/ComfyUI file alike: bf16 (the "
        "size people share, half of fp32; training keeps fp32 weights), fp16, or fp32",
    )
    kohya: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="the kohya/ComfyUI-named copy beside the diffusers file, where the family has that "
        "convention; auto: written unless ComfyUI reads the diffusers file as it is (FLUX.1: the copy "
        "would be 1.8x the size for no loader that needs it)",
    )

    def writes_kohya(self, model: str) -> bool:
        """Whether the LoRA's kohya/ComfyUI copy is written for ``model``."""
        info = model_info(model)
        if not info.comfy_naming or self.kohya == "off":
            return False
        return self.kohya == "on" or info.kohya_by_default


DEFAULT_CAPTIONER = "Qwen/Qwen2.5-VL-7B-Instruct"
DEFAULT_CAPTION_PROMPT = (
    "Write a caption for this image as one sentence for a text-to-image training set: the subject and "
    "what it looks like, what it does, the setting, the composition, the style and the lighting. Describe "
    "only what is visible; do not begin with 'The image' or 'This image'."
)


class AutocaptionSpec(_Section):
    """Captions written by a vision-language model before caching (train/autocaption.py)."""

    mode: Literal["off", "missing", "all"] = Field(
        default="off",
        description="missing: caption the images without a caption of their own (a written one is never "
        "replaced); all: every image; off",
    )
    captioner: str = Field(
        default=DEFAULT_CAPTIONER,
        min_length=1,
        description="a Qwen2-VL / Qwen2.5-VL chat model: a folder, a name under weights/, or a Hub id",
    )
    prompt: str = Field(default=DEFAULT_CAPTION_PROMPT, min_length=1, max_length=2000)
    prefix: str = Field(default="", max_length=500, description="put before each written caption")
    suffix: str = Field(default="", max_length=500, description="put after each written caption")
    max_new_tokens: int = Field(default=160, ge=8, le=1024, description="the longest caption, in tokens")
    batch_size: int = Field(default=8, ge=1, le=64, description="images captioned together")


class EmaSpec(_Section):
    """An exponential moving average of the trained weights, delivered in place of the last step's."""

    decay: float = Field(
        default=0.0,
        ge=0.0,
        le=0.9999,
        description="0: off. The past's weight in the average, e.g. 0.99 for a few thousand steps; it "
        "warms up as diffusers' EMAModel does: min(decay, (1 + j) / (10 + j)) at the j-th step averaged",
    )
    start_step: int = Field(
        default=0, ge=0, description="the average follows the weights exactly until this step, then averages"
    )

    @property
    def on(self) -> bool:
        return self.decay > 0


class PreservationSpec(_Section):
    """Output preservation: on the class-word prompt, the LoRA is trained toward the base model."""

    class_word: str = Field(
        default="",
        max_length=100,
        description="off when empty. The word for what the trigger word is an instance of (person, dog, "
        "style): each caption with the trigger word replaced by it is a preservation prompt",
    )
    weight: float = Field(
        default=1.0, gt=0, le=100, description="the preservation loss's weight beside the training loss"
    )

    @property
    def on(self) -> bool:
        return bool(self.class_word.strip())


class PublishSpec(_Section):
    """Where finished weights go besides the output archive. Credentials never live in the spec."""

    hub_model_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
    hub_private: bool = True
    s3_bucket: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
    s3_prefix: str = Field(default="", max_length=900)
    s3_endpoint_url: str | None = Field(default=None, pattern=r"^https?://")
    s3_region: str | None = Field(default=None, max_length=64)
    s3_public_base_url: str | None = Field(default=None, pattern=r"^https?://")


class TrainingSpec(_Section):
    spec_version: Literal[2] = SPEC_VERSION
    model: ModelFamily = Field(  # pyright: ignore[reportInvalidTypeForm]  (a Literal built from the registry)
        default="flux-dev", description="model id (docs/families.md)"
    )
    base_weights: str | None = Field(
        default=None,
        min_length=1,
        description="a diffusers folder or a Hub id; default: the family's official repo",
    )
    mode: Literal["lora", "full"] = "lora"
    lora: LoraSpec = LoraSpec()
    steps: int = Field(default=1000, ge=1, le=1_000_000, description="optimizer steps")
    learning_rate: float | None = Field(
        default=None, ge=1e-7, le=10, description="default: 1e-4 (lora), 1e-5 (full), 1.0 (prodigy)"
    )
    lr_scheduler: Literal[LR_SCHEDULERS] = "constant"  # type: ignore[valid-type]
    lr_warmup_steps: int = Field(default=0, ge=0)
    optimizer: Literal["adamw", "adamw8bit", "prodigy"] = "adamw"
    weight_decay: float = Field(default=1e-4, ge=0, le=1)
    batch_size: int = Field(default=1, ge=1, le=64)
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=1024)
    max_grad_norm: float = Field(default=1.0, ge=0, le=1e6, description="gradient clipping; 0 disables it")
    resolutions: list[int] = Field(
        default_factory=lambda: [1024],
        min_length=1,
        max_length=8,
        description='target sizes, e.g. "512,768,1024"',
    )
    trigger_word: str = Field(default="", max_length=100)
    caption_dropout: float = Field(
        default=0.05, ge=0, le=1, description="probability of training a step with an empty caption"
    )
    seed: int = Field(default=42, ge=0, le=2**32 - 1)
    validation: ValidationSpec = ValidationSpec()
    checkpoint_interval: int = Field(
        default=0, ge=0, description="steps between resumable checkpoints; 0 = none"
    )
    resumable: bool = Field(
        default=False,
        description="keep a resumable checkpoint of the last step in the output (resume/), so the job "
        "can be continued with more steps",
    )
    selection: Literal["balanced", "val_loss", "fidelity", "last"] = Field(
        default="balanced",
        description="how the delivered step is chosen among the validation steps (docs/selection.md); "
        "balanced: every available score, a step only when it beats the last one beyond noise",
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto", description="auto: bf16 on a GPU, fp32 on a CPU"
    )
    memory_policy: Literal["auto", "off", "gradient_checkpointing"] = "auto"
    log_every: int = Field(default=1, ge=1, le=10_000, description="steps between progress lines")
    dataset: DatasetSpec = DatasetSpec()
    video: VideoSpec = VideoSpec()
    sdxl: SdxlOptions = SdxlOptions()
    flow: FlowOptions = FlowOptions()
    speed: SpeedOptions = SpeedOptions()
    export: ExportSpec = ExportSpec()
    ema: EmaSpec = EmaSpec()
    autocaption: AutocaptionSpec = AutocaptionSpec()
    preservation: PreservationSpec = PreservationSpec()
    publish: PublishSpec = PublishSpec()

    @field_validator("resolutions", mode="before")
    @classmethod
    def _parse_resolutions(cls, v: Any) -> Any:
        return resolution_list(v)

    @field_validator("resolutions")
    @classmethod
    def _check_resolutions(cls, v: list[int]) -> list[int]:
        bad = [r for r in v if r < 64 or r > 4096 or r % 16]
        if bad:
            raise ValueError(f"each size must be a multiple of 16 between 64 and 4096; bad: {bad}")
        return sorted(set(v))

    @field_validator("trigger_word")
    @classmethod
    def _trigger(cls, v: str) -> str:
        if any(c in v for c in "\r\n\t"):
            raise ValueError("must be a single line")
        return v.strip()

    @model_validator(mode="after")
    def _cross_field(self) -> TrainingSpec:
        problems = _cross_field_problems(self.model_dump())
        if problems:
            raise ValueError("; ".join(msg for _, msg in problems))
        return self

    @model_validator(mode="wrap")
    @classmethod
    def _resolve_defaults(cls, data: Any, handler: Any) -> TrainingSpec:
        """Fill every ``None`` default with its concrete value, so the spec in config.json says what ran."""
        spec = handler(data)
        updates = spec._default_updates()
        return handler({**spec.model_dump(), **updates}) if updates else spec

    def _default_updates(self) -> dict[str, Any]:
        info = model_info(self.model)
        updates: dict[str, Any] = {}
        if self.base_weights is None:
            updates["base_weights"] = info.base_weights
        if self.learning_rate is None:
            updates["learning_rate"] = (
                1.0 if self.optimizer == "prodigy" else (1e-4 if self.mode == "lora" else 1e-5)
            )
        lora = self.lora
        if lora.alpha is None or lora.targets == "default":
            targets = info.default_targets if lora.targets == "default" else lora.targets
            updates["lora"] = {
                **lora.model_dump(),
                "alpha": lora.alpha or float(lora.rank),
                "targets": targets,
            }
        v = self.validation
        if None in (v.num_inference_steps, v.guidance_scale, v.resolution, v.seed):
            updates["validation"] = {
                **v.model_dump(),
                "num_inference_steps": v.num_inference_steps or info.render_steps,
                "guidance_scale": info.render_guidance if v.guidance_scale is None else v.guidance_scale,
                "resolution": v.resolution or self.resolutions[0],
                "seed": self.seed if v.seed is None else v.seed,
            }
        if info.frame_step and None in (self.video.frames, self.video.fps, self.video.validation_frames):
            frames = self.video.frames or list(info.default_frames)
            updates["video"] = {
                **self.video.model_dump(),
                "frames": sorted(set(frames)),
                "fps": self.video.fps or info.fps,
                "validation_frames": self.video.validation_frames or min([*frames, VALIDATION_FRAMES]),
            }
        if info.default_resolution != 1024 and "resolutions" not in self.model_fields_set:
            updates["resolutions"] = [info.default_resolution]
            if "validation" in updates:
                updates["validation"]["resolution"] = v.resolution or info.default_resolution
        section = getattr(self, info.options, None)
        if info.text_tokens and section is not None and getattr(section, "max_sequence_length", 0) is None:
            updates[info.options] = {**section.model_dump(), "max_sequence_length": info.text_tokens}
        return updates

    # -- convenience -------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return family_of(self.model)

    def to_json(self, **kw: Any) -> str:
        return self.model_dump_json(indent=2, **kw)

    def lora_target_modules(self) -> str | list[str]:
        """What peft's ``target_modules`` gets: a preset's regex or the listed module names."""
        t = self.lora.targets
        return model_info(self.model).target_presets[t] if isinstance(t, str) else list(t)

    def video_rule(self) -> VideoRule | None:
        """What this spec's model takes from a clip (``dataset_rules.VideoRule``); None for an image model."""
        info = model_info(self.model)
        if not info.video:
            return None
        v = self.video
        assert v.frames and v.fps, "the spec resolves the video defaults for a video model"
        windows = v.windows if v.sampling == "random" else 1
        return VideoRule(
            self.model, tuple(v.frames), v.fps, v.sampling, windows, self.dataset.max_clip_seconds
        )

    @property
    def model_options(self) -> Any:
        """This model's options section (``flow`` or ``sdxl``), as the registry names it."""
        return getattr(self, model_info(self.model).options)


def _cross_field_problems(d: dict[str, Any]) -> list[tuple[set[str], str]]:
    """Rules that involve more than one field, as (fields read, message) pairs.

    ``d`` may hold unvalidated values, so every read is defensive.
    """
    problems: list[tuple[set[str], str]] = []
    steps, warmup = d.get("steps", 1000), d.get("lr_warmup_steps", 0)
    if isinstance(steps, int) and isinstance(warmup, int) and warmup >= steps:
        problems.append(
            (
                {"steps", "lr_warmup_steps"},
                f"lr_warmup_steps: must be smaller than steps ({steps}), got {warmup}",
            )
        )
    problems += _model_problems(d)
    speed, mode = d.get("speed"), d.get("mode", "lora")
    lora_only = {
        "fp8_base": "a full fine-tune trains the weights fp8 would freeze",
        "fuse_qkv": "it fuses frozen weights",
        "fuse_lora": "it fuses frozen weights",
    }
    for lever, why in lora_only.items():
        if isinstance(speed, dict) and speed.get(lever) == "on" and mode == "full":
            problems.append(({"speed", "mode"}, f"speed.{lever}: on needs mode lora ({why})"))
    ema = d.get("ema")
    if (
        isinstance(ema, dict)
        and isinstance(ema.get("decay"), int | float)
        and ema["decay"] > 0
        and mode == "full"
    ):
        problems.append(
            (
                {"ema", "mode"},
                "ema.decay: needs mode lora (a full fine-tune's average is a second copy of every weight)",
            )
        )
    problems += _preservation_problems(d)
    problems += _autocaption_problems(d)
    problems += _lycoris_problems(d)
    return problems


def _lycoris_problems(d: dict[str, Any]) -> list[tuple[set[str], str]]:
    """LoKr and LoHa train through peft's own layers: the levers that rewrite a LoRA layer (fused
    matmuls, an fp8 base) do not know them, and they have no input dropout."""
    lora = d.get("lora")
    kind = lora.get("type", "lora") if isinstance(lora, dict) else "lora"
    if kind not in ("lokr", "loha"):
        return []
    out: list[tuple[set[str], str]] = []
    if d.get("mode") == "full":
        out.append(({"lora", "mode"}, f"lora.type: {kind} needs mode lora (a full fine-tune has no adapter)"))
    dropout = lora.get("dropout", 0.0) if isinstance(lora, dict) else 0.0
    if isinstance(dropout, int | float) and dropout > 0:
        out.append(
            ({"lora"}, f"lora.dropout: for type lora; {kind} trains without dropout here, got {dropout}")
        )
    speed = d.get("speed")
    for lever in ("fuse_qkv", "fuse_lora", "fp8_base"):
        if isinstance(speed, dict) and speed.get(lever) == "on":
            out.append(
                (
                    {"lora", "speed"},
                    f"speed.{lever}: on rewrites LoRA layers; lora.type {kind} needs it off",
                )
            )
    return out


def _autocaption_problems(d: dict[str, Any]) -> list[tuple[set[str], str]]:
    """The captioner reads still images, and writes descriptions, not instructions."""
    a = d.get("autocaption")
    model = d.get("model", "flux-dev")
    if not isinstance(a, dict) or a.get("mode", "off") == "off" or model not in MODEL_IDS:
        return []
    info = model_info(model)
    if info.video:
        return [
            (
                {"autocaption", "model"},
                f"autocaption.mode: images only for now; {model} trains on clips, which keep their own captions",
            )
        ]
    if info.controls_required:
        return [
            (
                {"autocaption", "model"},
                f"autocaption.mode: {model} trains on pairs whose caption is the edit instruction, which a "
                "captioner cannot read off the result",
            )
        ]
    return []


def _preservation_problems(d: dict[str, Any]) -> list[tuple[set[str], str]]:
    """Output preservation replaces the trigger word, so it needs one; and it is built for models
    whose text encoder reads only the caption."""
    p = d.get("preservation")
    if not isinstance(p, dict) or not str(p.get("class_word", "")).strip():
        return []
    out: list[tuple[set[str], str]] = []
    if not str(d.get("trigger_word", "")).strip():
        out.append(
            ({"preservation", "trigger_word"}, "preservation.class_word: needs a trigger_word to replace")
        )
    model = d.get("model", "flux-dev")
    if model in MODEL_IDS and model_info(model).max_controls:
        out.append(
            (
                {"preservation", "model"},
                f"preservation.class_word: for text-to-image and text-to-video models; {model} takes "
                "control images, and an edit's instruction has no class to preserve",
            )
        )
    speed = d.get("speed")
    for lever in ("fuse_qkv", "fuse_lora"):
        if isinstance(speed, dict) and speed.get(lever) == "on":
            out.append(
                (
                    {"preservation", "speed"},
                    f"preservation.class_word: needs speed.{lever} off (the base "
                    "model's prediction is read with the LoRA switched off, which a fused layer cannot do)",
                )
            )
    if d.get("mode") == "full":
        out.append(
            (
                {"preservation", "mode"},
                "preservation.class_word: needs mode lora (the base model is the LoRA switched off)",
            )
        )
    return out


def resolution_list(v: Any) -> Any:
    """``resolutions`` as a list: an int or a comma-separated string parsed, anything else as given."""
    if isinstance(v, int) and not isinstance(v, bool):
        return [v]
    if isinstance(v, str):
        parts = [p.strip() for p in v.split(",") if p.strip()]
        if not parts or not all(p.isdigit() for p in parts):
            raise ValueError(f'expected comma-separated sizes such as "512,768,1024", got {v!r}')
        return [int(p) for p in parts]
    return v


def _model_problems(d: dict[str, Any]) -> list[tuple[set[str], str]]:
    """What the chosen model refuses: prompt lengths over its encoder's limit, a full fine-tune
    that does not fit the largest card."""
    model = d.get("model", "flux-dev")
    if model not in MODEL_IDS:
        return []  # the field's own check names it
    info, problems = model_info(model), []
    section = d.get(info.options)
    msl = section.get("max_sequence_length") if isinstance(section, dict) else None
    if info.max_text_tokens and isinstance(msl, int) and msl > info.max_text_tokens:
        problems.append(
            (
                {"model", info.options},
                f"{info.options}.max_sequence_length: {info.short_name} accepts at most "
                f"{info.max_text_tokens} tokens, got {msl}",
            )
        )
    try:  # unvalidated: "512,1024", 1024 or a list, as the field's parser takes them
        sizes = resolution_list(d.get("resolutions", []))
    except ValueError:
        sizes = None  # the field's own check names it
    too_big = (
        [r for r in sizes if isinstance(r, int) and r > info.max_resolution]
        if isinstance(sizes, list)
        else []
    )
    if info.max_resolution and too_big:
        problems.append(
            (
                {"model", "resolutions"},
                f"resolutions: {info.short_name} takes at most {info.max_resolution} x {info.max_resolution} "
                f"pixels of area (its transformer's image-token limit); got {', '.join(map(str, too_big))}",
            )
        )
    if d.get("mode") == "full" and info.full_finetune:
        problems.append(
            ({"model", "mode"}, f"mode: full fine-tune of {model} is refused: {info.full_finetune}")
        )
    problems += _video_problems(model, info, d.get("video"), d.get("validation"))
    validation = d.get("validation")
    if (
        isinstance(validation, dict)
        and validation.get("control_images")
        and not (info.takes_controls or info.image_to_video)
    ):
        problems.append(
            (
                {"model", "validation"},
                f"validation.control_images: {model} draws from the prompt alone and takes no control "
                f"images (edit models do: docs/edit.md)",
            )
        )
    return problems


def _video_problems(model: str, info: Any, video: Any, validation: Any) -> list[tuple[set[str], str]]:
    """A video section for an image model; frame counts the video model cannot take."""
    if not isinstance(video, dict):
        return []
    if not info.frame_step:
        given = {
            k: v
            for k, v in video.items()
            if k in VideoSpec.model_fields
            and v != VideoSpec.model_fields[k].get_default(call_default_factory=True)
        }
        if given:
            return [
                (
                    {"model", "video"},
                    f"video: {model} trains on still images; the video section is for video models (docs/video.md)",
                )
            ]
        return []
    problems: list[tuple[set[str], str]] = []
    if video.get("expert", "both") != "both" and info.experts < 2:
        problems.append(
            ({"model", "video"}, f"video.expert: {model} has one denoiser; experts are Wan 2.2 A14B's")
        )
    step, most = info.frame_step, info.max_frames
    counts = [n for n in (video.get("frames") or []) if isinstance(n, int)]
    rendered = video.get("validation_frames")
    for where, values in (
        ("video.frames", counts),
        ("video.validation_frames", [rendered] if isinstance(rendered, int) else []),
    ):
        bad = [n for n in values if n % step != 1 % step or n > most]
        if bad:
            problems.append(
                (
                    {"model", "video"},
                    f"{where}: {info.short_name} takes {step}k+1 frames up to {most} (1, {step + 1}, {2 * step + 1}, ...), got {bad}",
                )
            )
    return problems


def _format_error(err: ErrorDetails) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "spec"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden" and loc == "flux":
        return 'flux: spec version 2 merged this section into "flow" (same fields; docs/spec.md, "Versions")'
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown field (check the spelling; see the spec reference)"
    if err["type"] == "literal_error":
        return f"{loc}: {msg}, got {err.get('input')!r}"
    if "input" in err and repr(err["input"]) not in msg and not isinstance(err["input"], (dict, list)):
        return f"{loc}: {msg} (got {err['input']!r})"
    return f"{loc}: {msg}"


def parse_spec(raw: dict[str, Any] | str | Path | None = None, **overrides: Any) -> TrainingSpec:
    """Validate a spec given as a dict, a JSON string or a path to a JSON file.

    ``overrides`` (e.g. from typed Cog inputs) replace top-level fields; dotted keys such
    as ``"lora.rank"`` reach into sections. Raises ``SpecError`` naming every bad field.
    """
    data = _load_raw(raw)
    for key, value in overrides.items():
        if value is None:
            continue
        target = data
        *parents, leaf = key.split(".")
        for p in parents:
            if not isinstance(target.get(p), dict):
                target[p] = {}
            target = target[p]
        target[leaf] = value
    version = data.get("spec_version", SPEC_VERSION)
    if version not in READABLE_SPEC_VERSIONS:
        raise SpecError(
            [
                f"spec_version: this trainer reads versions {READABLE_SPEC_VERSIONS[0]} to {SPEC_VERSION}, got {version!r}"
            ]
        )
    if version == 1:
        data = upgrade_v1(data)
    try:
        return TrainingSpec.model_validate(data)
    except ValidationError as exc:
        field_errors = [e for e in exc.errors() if e["loc"]]
        problems = [_format_error(e) for e in field_errors]
        bad_fields = {str(e["loc"][0]) for e in field_errors}
        # cross-field rules report too, as long as the fields they read were valid on their own
        problems += [msg for fields, msg in _cross_field_problems(data) if not fields & bad_fields]
        raise SpecError(problems) from None


# spec version 1's ``flux.timestep_sampling`` values and their version-2 ``flow`` names
_V1_FLUX_SAMPLING = {
    "flux_shift": "auto",
    "logit_normal": "logit_normal",
    "shift": "shift",
    "uniform": "uniform",
}
_V1_FLUX_SHIFT = 3.0  # version 1's flux.shift default (used by timestep_sampling "shift" only)
_V1_FLUX_MODELS = ("flux-dev", "flux-schnell", "flux1-kontext-dev")  # the models version 1 read it for


def upgrade_v1(data: dict[str, Any]) -> dict[str, Any]:
    """A version-1 spec in version 2's terms (docs/spec.md, "Versions"): its ``flux`` section (which
    only Flux.1 models read) becomes ``flow``; for other models it was ignored and is dropped.
    What version 1 validated in that section is validated again, under ``flow``."""
    data = {**data, "spec_version": SPEC_VERSION}
    flux = data.pop("flux", None)
    model = data.get("model", "flux-dev")
    if not isinstance(flux, dict) or model not in _V1_FLUX_MODELS:
        return data
    flow = dict(flux)
    sampling = flow.get("timestep_sampling", "flux_shift")
    flow["timestep_sampling"] = _V1_FLUX_SAMPLING.get(sampling, sampling)
    if flow["timestep_sampling"] == "shift":
        flow.setdefault("shift", _V1_FLUX_SHIFT)
    else:
        flow.pop("shift", None)  # version 1 read it for "shift" sampling only
    data["flow"] = flow
    return data


def _load_raw(raw: dict[str, Any] | str | Path | None) -> dict[str, Any]:
    if raw is None:
        return {}
    if isinstance(raw, dict):
        return json.loads(json.dumps(raw))  # deep copy, and rejects non-JSON values early
    if isinstance(raw, Path) or (isinstance(raw, str) and raw.strip() and raw.lstrip()[0] not in '{["'):
        path = Path(raw)
        if not path.is_file():
            raise SpecError(
                [f"spec: no such file {str(path)!r} (pass a JSON object or a path to a .json file)"]
            )
        text = path.read_text(encoding="utf-8-sig")
    else:
        text = raw or "{}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(
            [f"spec: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"]
        ) from None
    if not isinstance(data, dict):
        raise SpecError([f"spec: expected a JSON object, got {type(data).__name__}"])
    return data


def parse_set_items(items: list[str] | None, flag: str = "--set") -> dict[str, Any]:
    """``FIELD=VALUE`` command-line items as overrides for ``parse_spec``. A value is read as JSON
    when it parses (``steps=50``, ``lora.targets=["a"]``) and kept as text otherwise
    (``model=flux-dev``). Raises ``ValueError`` naming the item without an ``=`` (the same parser
    reads other ``NAME=VALUE`` flags, so the message names ``flag`` rather than the spec)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} {item!r}: expected FIELD=VALUE")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def spec_json_schema() -> dict[str, Any]:
    """The JSON schema of the spec (for docs and for clients that build forms)."""
    return TrainingSpec.model_json_schema()
