"""Rendering with trained weights: the torch side of the Cog run entry (predict.py).

Replicate runs a training's destination version as this image with ``COG_WEIGHTS`` set to the
training's output; ``InferenceSession`` is what predict.py's ``setup(weights)`` builds from it:

- the trained weights (``train.trained``), read once; their ``config.json`` says the family,
  the base model and the trigger word;
- one base pipeline kept loaded (a full fine-tune's ``model/`` replaces the base);
- LoRA adapters loaded once each and switched by name: a second prediction with the same
  LoRA loads nothing, another LoRA (``lora_weights``, ``extra_lora``) loads only its adapter.

On the trainer's own version (no COG_WEIGHTS) it renders the base model of
``ADVANCED_TRAINER_RUN_MODEL`` (default ``flux-dev``; its weights ``ADVANCED_TRAINER_RUN_BASE``,
default the family's official repo), or whatever ``lora_weights`` is for.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .families import model_info
from .published import NeedsHubToken, PublishedModelError, fetch_published
from .spec import DEFAULT_BASE_WEIGHTS, MODEL_FAMILIES, family_of
from .trained import LOW_NOISE_FILE, Trained, TrainedWeightsError, fetch_trained, shown
from .weights import WeightsError, pipeline_index, prepare_weights_from_env

# torch, diffusers and the model families are imported where first used: importing this module
# stays torch-free (its tables are checked against predict.py's literal choices without torch).

# Sizes near one megapixel per aspect ratio, sides multiples of 64 (what Flux and SDXL were trained on).
ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "16:9": (1344, 768),
    "21:9": (1536, 640),
    "3:2": (1216, 832),
    "2:3": (832, 1216),
    "4:5": (896, 1088),
    "5:4": (1088, 896),
    "3:4": (896, 1152),
    "4:3": (1152, 896),
    "9:16": (768, 1344),
    "9:21": (640, 1536),
}
# Video models render at their training class, 480p (Wan: 832x480), sides multiples of 16; the
# same ratios near 0.4 megapixels.
VIDEO_ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1": (624, 624),
    "16:9": (832, 480),
    "21:9": (960, 416),
    "3:2": (768, 512),
    "2:3": (512, 768),
    "4:5": (560, 704),
    "5:4": (704, 560),
    "3:4": (544, 720),
    "4:3": (720, 544),
    "9:16": (480, 832),
    "9:21": (416, 960),
}
MATCH_INPUT = "match_input_image"  # the input image's aspect ratio (1:1 without one)
OUTPUT_FORMATS = ("webp", "jpg", "png")
VIDEO_FORMATS = ("mp4", "webp")  # H.264 in MP4, or an animated WebP (lossless at output_quality 100)
MAX_EXTRA_ADAPTERS = 4  # LoRAs other than the trained one kept loaded (least recently used go first)


class InputError(ValueError):
    """A prediction input that cannot be used; the message names it."""


@dataclass(frozen=True)
class RenderRequest:
    prompt: str
    negative_prompt: str = ""
    aspect_ratio: str = MATCH_INPUT
    input_images: tuple[str, ...] = ()  # edit models / references: input_image, then input_images
    width: int | None = None
    height: int | None = None
    num_outputs: int = 1
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    lora_scale: float = 1.0
    lora_weights: str | None = None
    extra_lora: str | None = None
    extra_lora_scale: float = 1.0
    output_format: str = "webp"
    output_quality: int = 90
    hf_token: str | None = None
    step: int | None = None  # a kept validation step of the trained weights (None: the chosen one)
    # video models (docs/video.md)
    num_frames: int | None = None  # default: the model's
    fps: float | None = None  # of the written video; default: the model's
    video_format: str = "mp4"


RUN_DTYPES = ("auto", "bf16", "fp16", "fp32")


def _device_and_dtype():
    """CUDA in bf16 when there is a GPU, else the CPU in fp32. ``ADVANCED_TRAINER_RUN_DTYPE``
    (bf16, fp16, fp32) overrides the dtype: on a CPU, bf16 renders on the GPU's dtype path."""
    import torch

    choice = (os.environ.get("ADVANCED_TRAINER_RUN_DTYPE") or "auto").strip().lower()
    if choice not in RUN_DTYPES:
        raise InputError(f"ADVANCED_TRAINER_RUN_DTYPE: {choice!r} is not one of {', '.join(RUN_DTYPES)}")
    cuda = torch.cuda.is_available()
    if choice == "auto":
        choice = "bf16" if cuda else "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[choice]
    return torch.device("cuda" if cuda else "cpu"), dtype


class Renderer:
    """One base pipeline, kept loaded, with LoRA adapters loaded by name and switched per render."""

    def __init__(self, log: Callable[[str], None] = print):
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()  # one line per load in the logs is enough
        self.log = log
        self.device, self.dtype = _device_and_dtype()
        self.pipe: Any = None
        self.model: str | None = None
        self.base_key: str | None = None
        self.adapters: OrderedDict[str, str] = OrderedDict()  # LoRA file -> adapter name, oldest first
        self.pinned: set[str] = set()  # adapters never evicted (the trained one)
        self.loads = {"base": 0, "adapter": 0}  # counters: what a prediction had to load
        self._named = 0
        # LoRA files that load into the pipeline's second transformer (Wan 2.2 A14B's low-noise expert)
        self.into_second: set[str] = set()

    def ensure_base(self, model: str, folder: Path) -> None:
        """Load ``folder`` as ``model``'s pipeline unless it is the one loaded."""
        from .models import family_class

        key = f"{model}:{Path(folder).resolve()}"
        if key == self.base_key:
            return
        if self.pipe is not None:
            self.log(f"render: switching the base model to {model} ({folder})")
        self.pipe = self.base_key = None
        self.adapters.clear()
        self.pinned.clear()
        self._named = 0
        started = time.monotonic()
        cls = family_class(model)
        pipe = cls.pipeline_cls.from_pretrained(
            folder, dtype=self.dtype, **cls.components_from_elsewhere(Path(folder), self.dtype)
        )
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)
        cls.prepare_run_pipeline(self.pipe)
        self.model, self.base_key = model, key
        self.loads["base"] += 1
        self.log(
            f"render: loaded {model} from {folder} in {time.monotonic() - started:.1f}s on {self.device} "
            f"in {str(self.dtype).removeprefix('torch.')}"
        )

    def _adapter(self, lora_file: Path, pin: bool) -> str:
        path = str(Path(lora_file).resolve())
        if path in self.adapters:
            self.adapters.move_to_end(path)
            return self.adapters[path]
        self._named += 1
        name = f"lora_{self._named}"
        second = {"load_into_transformer_2": True} if path in self.into_second else {}
        try:
            if not self._load_lycoris(Path(path), name):
                self.pipe.load_lora_weights(
                    str(Path(path).parent), weight_name=Path(path).name, adapter_name=name, **second
                )
        except Exception as exc:  # wrong family, damaged file, incompatible targets
            why = " ".join(str(exc).split())[:400]
            raise InputError(
                f"the LoRA {Path(path).name} does not fit {self.model}: {type(exc).__name__}: {why}"
            ) from None
        self.adapters[path] = name
        self.log(f"render: loaded LoRA {Path(path).name} as adapter {name}")
        if pin:
            self.pinned.add(name)
        self.loads["adapter"] += 1
        self._evict()
        return name

    def _load_lycoris(self, path: Path, name: str) -> bool:
        """A LoKr / LoHa file (ours, or another trainer's LyCORIS naming) as the peft adapter ``name``
        of the denoiser; False for a plain LoRA. diffusers' pipelines read no LoHa, and LoKr only for
        some families, so these go through train/lycoris.py for every family."""
        from safetensors import safe_open

        from . import lycoris
        from .families import model_info

        with safe_open(str(path), framework="pt") as f:
            if lycoris.adapter_kind(f.keys()) is None:
                return False
            state = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata()
        assert self.model is not None, "ensure_base runs first"
        component = "transformer_2" if str(path) in self.into_second else model_info(self.model).denoiser
        kind = lycoris.load_adapter(getattr(self.pipe, component), state, name, metadata)
        self.log(f"render: {path.name} is a LyCORIS {kind} adapter")
        return True

    def _evict(self) -> None:
        extra = [p for p, n in self.adapters.items() if n not in self.pinned]
        for path in extra[:-MAX_EXTRA_ADAPTERS] if len(extra) > MAX_EXTRA_ADAPTERS else []:
            self.pipe.delete_adapters([self.adapters.pop(path)])

    def use_loras(self, loras: list[tuple[Path, float, bool]]) -> None:
        """Activate exactly these (file, scale, pinned) LoRAs; none disables every loaded one."""
        names = [self._adapter(path, pin) for path, _, pin in loras]
        if not names:
            if self.adapters:
                self.pipe.disable_lora()
            return
        self.pipe.enable_lora()
        self.pipe.set_adapters(names, adapter_weights=[scale for _, scale, _ in loras])

    def pixel_multiple(self) -> int:
        from .models import family_class

        cls = family_class(self.model or "flux-dev")
        denoiser = getattr(self.pipe, cls.denoiser_name)
        # a video pipeline names its spatial factor apart from its temporal one
        factor = (
            getattr(self.pipe, "vae_scale_factor", None)
            or getattr(self.pipe, "vae_scale_factor_spatial", None)
            or self.pipe.vae_spatial_compression_ratio  # LTX-2's name for it
        )
        return cls.pixel_multiple_of(factor, dict(denoiser.config))

    def render(
        self,
        prompt: str,
        negative_prompt: str,
        width: int,
        height: int,
        steps: int,
        guidance: float,
        seeds: list[int],
        max_sequence_length: int | None,
        images: list[Any] | None = None,
        num_frames: int | None = None,
        fps: float | None = None,
    ) -> list[Any]:
        """The images (PIL), or for a video model the videos: each (its PIL frames, its soundtrack as
        ((channels, n) floats, sample rate) where the model makes one (LTX-2), else None)."""
        import torch

        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        from .models import family_class

        info = model_info(self.model or "flux-dev")
        per_prompt = (
            {"num_videos_per_prompt": len(seeds)} if info.video else {"num_images_per_prompt": len(seeds)}
        )
        kw: dict[str, Any] = dict(
            prompt=prompt,
            height=height,
            width=width,
            num_inference_steps=steps,
            **per_prompt,
            generator=generators,
            # how the family's pipeline takes guidance (Qwen-Image: true_cfg_scale, not guidance_scale)
            **family_class(info.id).guidance_kwargs(
                guidance, negative_prompt if info.negative_prompt else ""
            ),
        )
        if max_sequence_length and info.max_text_tokens:
            kw["max_sequence_length"] = max_sequence_length
        if images:  # the image to edit, or the references, as the family's pipeline takes them
            kw.update(family_class(info.id).run_image_inputs(images, width, height, self.pixel_multiple()))
        if info.video:
            kw.update(num_frames=num_frames, output_type="pil")
            kw.update(family_class(info.id).video_inputs(fps or info.fps))
        from .models.base import seeded_global_rng

        with torch.inference_mode(), seeded_global_rng(seeds[0]):
            out = self.pipe(**kw)
        if not info.video:
            return list(out.images)
        sound = getattr(out, "audio", None)
        rate = getattr(getattr(self.pipe, "vocoder", None), "config", {}).get("output_sampling_rate")
        return [
            (list(v), (sound[i].float().cpu().numpy(), int(rate)) if sound is not None and rate else None)
            for i, v in enumerate(out.frames)
        ]


def _env_model() -> tuple[str, str]:
    model = os.environ.get("ADVANCED_TRAINER_RUN_MODEL") or "flux-dev"
    if model not in MODEL_FAMILIES:
        raise InputError(f"ADVANCED_TRAINER_RUN_MODEL: {model!r} is not one of {', '.join(MODEL_FAMILIES)}")
    return model, os.environ.get("ADVANCED_TRAINER_RUN_BASE") or DEFAULT_BASE_WEIGHTS[model]


def locate_base(ref: str | Path) -> Path:
    """A base pipeline folder: a path, or a name / Hub id found (or fetched) the way setup() finds bases."""
    p = Path(ref).expanduser()
    if p.is_dir() and pipeline_index(p) is not None:
        return p
    try:
        return prepare_weights_from_env(required=[str(ref)]).path(str(ref))
    except (WeightsError, KeyError) as exc:
        raise InputError(f"base model {ref}: {exc}") from None


class InferenceSession:
    """The run entry's state: trained weights (COG_WEIGHTS), the renderer and the LoRA cache."""

    def __init__(
        self, weights: str | None, *, log: Callable[[str], None] = print, cache_dir: Path | None = None
    ):
        self.log = log
        self.cache_dir = Path(
            cache_dir
            or os.environ.get("ADVANCED_TRAINER_LORA_CACHE")
            or Path(tempfile.gettempdir()) / "advanced-trainer-loras"
        )
        self.default_model, self.default_base = _env_model()
        self.renderer = Renderer(log=log)
        self.sources: dict[str, Trained] = {}
        self.bases: dict[str, Path] = {}
        self.trained: Trained | None = None
        self.phases: dict[str, float] = {}  # setup's phases, seconds: in the log, for cold-boot figures
        started = time.monotonic()
        try:
            self._setup(weights)
        finally:
            total = time.monotonic() - started
            parts = ", ".join(f"{k} {v:.1f} s" for k, v in self.phases.items())
            log(f"setup: {total:.1f} s" + (f" ({parts})" if parts else ""))

    @contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.monotonic() - started

    def _setup(self, weights: str | None) -> None:
        log = self.log
        if weights:
            try:
                with self._phase("trained weights"):
                    self.trained = fetch_trained(
                        str(weights),
                        self.cache_dir,
                        field="COG_WEIGHTS",
                        allow_local=True,
                        default_model=self.default_model,
                    )
            except TrainedWeightsError as exc:
                raise TrainedWeightsError(
                    f"{exc} (COG_WEIGHTS must be a training's output: the URL or path of "
                    f"its output.zip, or a .safetensors LoRA)"
                ) from None
            log(
                f"setup: trained weights: {self.trained.describe()}"
                + (f"; trigger word: {self.trained.trigger_word!r}" if self.trained.trigger_word else "")
            )
            if self.trained.published:
                try:
                    with self._phase("published model"):
                        self.trained = self._fetched(self.trained, None)
                except NeedsHubToken as exc:  # a private repo: the first prediction with hf_token fetches it
                    log(f"setup: {exc}; the first prediction that has it fetches the model")
                    return
                except PublishedModelError as exc:
                    raise TrainedWeightsError(
                        f"COG_WEIGHTS: cannot fetch the published model: {exc}"
                    ) from None
            model, base = self._base_for(self.trained)
            with self._phase("base weights"):
                folder = self._locate(base)  # a missing base fails setup, naming it
            with self._phase("load"):
                self.renderer.ensure_base(model, folder)
                if self.trained.lora_file:
                    self.renderer.use_loras(self._lora_files(self.trained, self.trained.lora_file, 1.0, True))
        else:
            log(
                f"setup: no trained weights (the trainer's own version): renders {self.default_model} "
                f"({self.default_base}) or the LoRA passed as lora_weights"
            )
            try:
                with self._phase("base weights"):
                    folder = self._locate(self.default_base)
                with self._phase("load"):
                    self.renderer.ensure_base(self.default_model, folder)
            except InputError as exc:  # it may still render another family's lora_weights
                log(f"setup: warning: the default base is not available yet: {exc}")

    # -- which base, which LoRAs ----------------------------------------------------------------
    def _locate(self, ref: str | Path) -> Path:
        key = str(ref)
        if key not in self.bases:
            self.bases[key] = locate_base(ref)
        return self.bases[key]

    def _source(self, value: str, field: str, hf_token: str | None) -> Trained:
        if value not in self.sources:
            try:
                self.sources[value] = fetch_trained(
                    value, self.cache_dir, field=field, hf_token=hf_token, default_model=self.default_model
                )
            except TrainedWeightsError as exc:
                raise InputError(str(exc)) from None
        if self.sources[value].published:
            self.sources[value] = self._fetched_for(self.sources[value], hf_token, field)
        return self.sources[value]

    def _fetched(self, trained: Trained, hf_token: str | None) -> Trained:
        """``trained`` with its published full fine-tune fetched (train/published.py)."""
        assert trained.published is not None
        folder = fetch_published(trained.published, self.cache_dir, hf_token=hf_token, log=self.log)
        return replace(trained, model_dir=folder, published=None)

    def _fetched_for(self, trained: Trained, hf_token: str | None, field: str) -> Trained:
        """``_fetched`` for a prediction: what goes wrong is an InputError naming the input."""
        try:
            return self._fetched(trained, hf_token)
        except NeedsHubToken as exc:
            raise InputError(str(exc)) from None
        except PublishedModelError as exc:
            raise InputError(f"{field}: cannot fetch the published model: {exc}") from None

    def _base_for(self, primary: Trained | None) -> tuple[str, str | Path]:
        """(model, base) for a render whose main weights are ``primary`` (None: the plain base)."""
        trained = self.trained
        model = (
            (primary.model if primary and primary.model else None)
            or (trained.model if trained else None)
            or self.default_model
        )
        fam = family_of(model)
        if trained and trained.family == fam:
            if trained.model_dir:
                return trained.model or model, trained.model_dir
            if trained.base_weights:
                return trained.model or model, trained.base_weights
        if primary and primary.model_dir:
            return model, primary.model_dir
        if primary and primary.base_weights:
            return model, primary.base_weights
        if family_of(self.default_model) == fam:
            return self.default_model, self.default_base
        return model, DEFAULT_BASE_WEIGHTS[model]

    def _lora_files(
        self, trained: Trained, lora: Path, scale: float, pin: bool
    ) -> list[tuple[Path, float, bool]]:
        """``lora`` as (file, scale, pinned), with the LoRA that goes with it: Wan 2.2 A14B's low-noise
        expert's beside the high-noise one's loads into the second transformer, and so does a run
        that trained that expert alone (config.json's ``video.expert``)."""
        out = [(lora, scale, pin)]
        spec = (trained.config or {}).get("spec") or {}
        if (spec.get("video") or {}).get("expert") == "low_noise":
            self.renderer.into_second.add(str(lora.resolve()))
        companion = lora.parent / LOW_NOISE_FILE
        if companion.is_file() and lora.name != LOW_NOISE_FILE:
            self.renderer.into_second.add(str(companion.resolve()))
            out.append((companion, scale, pin))
        return out

    def _plan(
        self, req: RenderRequest
    ) -> tuple[str, str | Path, list[tuple[Path, float, bool]], Trained | None]:
        primary = (
            self._source(req.lora_weights, "lora_weights", req.hf_token) if req.lora_weights else self.trained
        )
        model, base = self._base_for(primary)
        loras: list[tuple[Path, float, bool]] = []
        if req.step is not None and not (primary and primary.lora_file):
            raise InputError("step: there are no trained LoRA weights to pick a step of")
        if primary and primary.lora_file:
            try:
                lora = primary.lora_for_step(req.step)
            except TrainedWeightsError as exc:
                raise InputError(str(exc)) from None
            assert lora is not None
            # the delivered LoRA stays loaded; other steps are evicted like any other LoRA
            pin = primary is self.trained and lora == primary.lora_file
            loras += self._lora_files(primary, lora, req.lora_scale, pin)
        if req.extra_lora:
            extra = self._source(req.extra_lora, "extra_lora", req.hf_token)
            if extra.lora_file is None:
                raise InputError(f"extra_lora: {shown(req.extra_lora)} is a full fine-tune, not a LoRA")
            if extra.family and extra.family != family_of(model):
                raise InputError(
                    f"extra_lora: {shown(req.extra_lora)} is for {extra.model}, but this render uses {model}"
                )
            loras.append((extra.lora_file, req.extra_lora_scale, False))
        return model, base, loras, primary

    # -- one prediction ---------------------------------------------------------------------------
    def size(self, req: RenderRequest, first_image: Any = None, video: bool = False) -> tuple[int, int]:
        ratios = VIDEO_ASPECT_RATIOS if video else ASPECT_RATIOS
        if req.aspect_ratio == "custom":
            w, h = req.width or ratios["1:1"][0], req.height or ratios["1:1"][1]
        elif req.aspect_ratio == MATCH_INPUT:
            w, h = ratios["16:9" if video and first_image is None else "1:1"]
            if first_image is not None:  # the same area at the input image's aspect ratio
                w = round((w * h * first_image.width / first_image.height) ** 0.5)
                h = round(w * first_image.height / first_image.width)
        elif req.aspect_ratio in ratios:
            w, h = ratios[req.aspect_ratio]
        else:
            raise InputError(
                f"aspect_ratio: {req.aspect_ratio!r} is not one of "
                f"{', '.join([MATCH_INPUT, *ASPECT_RATIOS, 'custom'])}"
            )
        m = self.renderer.pixel_multiple()
        fw, fh = max(m, w // m * m), max(m, h // m * m)
        if (fw, fh) != (w, h):
            self.log(f"render: {w}x{h} rounded down to {fw}x{fh} (sides must be multiples of {m})")
        return fw, fh

    def predict(self, req: RenderRequest, out_dir: Path) -> list[Path]:
        if not req.prompt.strip():
            raise InputError("prompt: empty")
        if req.output_format not in OUTPUT_FORMATS:
            raise InputError(
                f"output_format: {req.output_format!r} is not one of {', '.join(OUTPUT_FORMATS)}"
            )
        if not 1 <= req.num_outputs <= 4:
            raise InputError(f"num_outputs: must be 1 to 4, got {req.num_outputs}")
        if req.video_format not in VIDEO_FORMATS:
            raise InputError(f"video_format: {req.video_format!r} is not one of {', '.join(VIDEO_FORMATS)}")
        if self.trained is not None and self.trained.published:  # a private repo, not fetched at setup
            self.trained = self._fetched_for(self.trained, req.hf_token, "COG_WEIGHTS")
        model, base, loras, primary = self._plan(req)
        self.renderer.ensure_base(model, self._locate(base))
        self.renderer.use_loras(loras)
        info = model_info(model)
        steps = req.num_inference_steps or info.render_steps
        guidance = info.render_guidance if req.guidance_scale is None else req.guidance_scale
        seed = req.seed if req.seed is not None else random.SystemRandom().randrange(2**32 - 4)
        seeds = [seed + i for i in range(req.num_outputs)]
        images = input_images(req, info)
        frames = video_frames(req, info)
        width, height = self.size(req, images[0] if images else None, info.video)
        msl = None
        if info.max_text_tokens:  # the prompt length the weights were trained with
            spec = (primary.config or {}).get("spec", {}) if primary else {}
            msl = (spec.get(info.options) or {}).get("max_sequence_length") or info.text_tokens
        if req.negative_prompt and not info.negative_prompt:
            self.log(f"render: note: {info.title} does not use negative_prompt; it was ignored")
        trigger = primary.trigger_word if primary else ""
        if trigger and trigger.lower() not in req.prompt.lower():
            self.log(f"render: note: the trigger word {trigger!r} is not in the prompt")
        what = " + ".join(f"{Path(p).name}×{s:g}" for p, s, _ in loras) or "no LoRA"
        clip = f" x {frames} frames" if frames else ""
        self.log(
            f"render: {model}, {what}, {width}x{height}{clip}, {steps} steps, guidance {guidance:g}, "
            f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
        )
        started = time.monotonic()
        fps = req.fps or info.fps
        images = self.renderer.render(
            req.prompt, req.negative_prompt, width, height, steps, guidance, seeds, msl, images, frames, fps
        )
        what = "video(s)" if info.video else "image(s)"
        self.log(f"render: {len(images)} {what} in {time.monotonic() - started:.1f}s")
        if info.video and req.video_format != "mp4" and any(sound for _, sound in images):
            self.log(
                f"render: note: {info.title}'s soundtrack is kept in mp4 only; video_format {req.video_format} is silent"
            )
        if info.video:
            return save_videos(images, out_dir, req.video_format, fps, req.output_quality)
        return save_images(images, out_dir, req.output_format, req.output_quality)


def input_images(req: RenderRequest, info: Any) -> list[Any]:
    """The request's input images, checked against what the model takes, as 8-bit RGB (EXIF
    rotation applied, the dataset's pixel cap); InputError naming the input otherwise."""
    from .data import UnsafeArchiveError, load_rgb
    from .dataset_rules import DEFAULT_MAX_IMAGE_PIXELS, PairRule, control_shape_reason

    given = list(req.input_images)
    if info.image_to_video and not given:
        raise InputError(f"input_image: {info.title} animates an image: give the first frame as input_image")
    if info.controls_required and not given:
        raise InputError(f"input_image: {info.title} edits an image: give the image to edit as input_image")
    if given and not info.run_images:
        raise InputError(
            f"input_image: {info.title} draws from the prompt alone and takes no input image "
            f"(edit models take one: see docs/edit.md; image-to-video models: docs/video.md)"
        )
    if len(given) > info.run_images:
        raise InputError(
            f"input_images: {len(given)} images given, {info.title} takes at most {info.run_images}"
        )
    images = []
    for i, ref in enumerate(given):
        name = "input_image" if i == 0 else f"input_images[{i - 1}]"
        try:
            images.append(load_rgb(Path(ref), DEFAULT_MAX_IMAGE_PIXELS))
        except (OSError, ValueError, SyntaxError) as exc:  # UnsafeArchiveError is a ValueError
            what = "is too large" if isinstance(exc, UnsafeArchiveError) else "cannot be read as an image"
            raise InputError(f"{name}: {Path(ref).name} {what} ({exc})") from None
        why = control_shape_reason(PairRule.of(info.id, info), images[-1].width, images[-1].height)
        if why:
            raise InputError(f"{name}: {Path(ref).name} {why}")
    return images


def video_frames(req: RenderRequest, info: Any) -> int | None:
    """The frames of a video model's render (default: the most the model was trained on); None for
    an image model, which refuses ``num_frames``."""
    if not info.video:
        if req.num_frames is not None:
            raise InputError(f"num_frames: {info.title} renders images, not videos")
        return None
    n = info.max_frames if req.num_frames is None else req.num_frames
    if n % info.frame_step != 1 % info.frame_step or not 1 <= n <= info.max_frames:
        raise InputError(
            f"num_frames: {info.title} renders {info.frame_step}k+1 frames up to {info.max_frames} "
            f"(1, {info.frame_step + 1}, {2 * info.frame_step + 1}, ...), got {n}"
        )
    return n


def save_videos(
    videos: list[tuple[list[Any], Any]], out_dir: Path, fmt: str, fps: float, quality: int
) -> list[Path]:
    """Write ``out-N.mp4`` (H.264; ``quality`` 90 is x264's crf 16, 100 crf 12; with its soundtrack
    in AAC where the model made one) or ``out-N.webp`` (animated, silent; lossless at quality 100)
    files into a fresh ``out_dir``. ``videos``: (frames, soundtrack or None) each."""
    from .clips import write_clip

    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    paths = []
    for i, (frames, sound) in enumerate(videos):
        path = out_dir / f"out-{i}.{fmt}"
        if fmt == "mp4":
            crf = min(51, 12 + round((100 - quality) * 0.4))  # 90 -> crf 16
            write_clip(path, frames, fps, crf=crf, audio=sound)
        else:
            frames[0].save(
                path,
                format="WEBP",
                save_all=True,
                append_images=frames[1:],
                duration=round(1000 / fps),
                loop=0,
                lossless=quality >= 100,
                quality=quality,
            )
        paths.append(path)
    return paths


def save_images(images: list[Any], out_dir: Path, fmt: str, quality: int) -> list[Path]:
    """Write ``out-N.<fmt>`` files into a fresh ``out_dir``."""
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    paths = []
    for i, img in enumerate(images):
        path = out_dir / f"out-{i}.{fmt}"
        if fmt == "png":
            img.save(path, format="PNG")
        elif fmt == "jpg":
            img.convert("RGB").save(path, format="JPEG", quality=quality)
        else:
            img.save(path, format="WEBP", quality=quality)
        paths.append(path)
    return paths
