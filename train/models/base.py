"""The one small interface between the training loop and a model family.

A family knows how to load its pipeline, encode captions and images once (for the cache),
compute the training loss of a batch of cached inputs, render validation images, and save
or convert its LoRA. The loop never looks inside; Flux and SDXL override only what differs.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..spec import TrainingSpec


class BatchRandom:
    """The random draws of one micro-batch, made for the whole global batch and sliced.

    Every process draws the numbers for all ``global_size`` items from the same generator and
    keeps its own rows ``[start, stop)``: N data-parallel processes then see exactly the noise
    one process with the global batch would, and their generators stay in step.
    """

    def __init__(
        self, generator: torch.Generator, global_size: int, start: int, stop: int, device: torch.device
    ):
        self.generator, self.global_size, self.start, self.stop, self.device = (
            generator,
            global_size,
            start,
            stop,
            device,
        )

    def randn(self, *item_shape: int) -> torch.Tensor:
        g = self.generator
        t = torch.randn((self.global_size, *item_shape), generator=g, device=g.device)
        return t[self.start : self.stop].to(self.device)

    def rand(self) -> torch.Tensor:
        g = self.generator
        return torch.rand(self.global_size, generator=g, device=g.device)[self.start : self.stop].to(
            self.device
        )

    def randint(self, high: int) -> torch.Tensor:
        g = self.generator
        return torch.randint(0, high, (self.global_size,), generator=g, device=g.device)[
            self.start : self.stop
        ].to(self.device)


@dataclass
class Batch:
    """One training batch from the cache; every tensor is on the training device."""

    latent_mean: torch.Tensor  # (B, C, h, w) VAE posterior mean
    latent_std: torch.Tensor  # (B, C, h, w) VAE posterior std
    text: dict[str, torch.Tensor]  # family-specific cached text embeddings, batched
    time_ids: torch.Tensor  # (B, 6) original size, crop top-left, target size (SDXL uses it)
    rng: BatchRandom  # this batch's share of the global batch's random draws
    # Edit models: one tensor per control slot k, (B, C, h_k, w_k), the k-th control image's latents
    # as ``Family.encode_controls`` returned them (the family normalises them itself). Every item of
    # a batch has as many controls, of the same shapes per slot; empty for text-to-image batches.
    controls: list[torch.Tensor] = field(default_factory=list)
    # Output preservation (spec.preservation): the same items' captions with the trigger word replaced
    # by the class word, embedded as ``text``; None when preservation is off
    preserve_text: dict[str, torch.Tensor] | None = None
    # Masked loss: (B, 1, h, w) (or (B, 1, f, h, w)) weights of each latent pixel in [0, 1], from the
    # items' loss masks (ones for an item without one); None when no item of the batch has a mask
    loss_weights: torch.Tensor | None = None


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The mean squared error with each element weighed, normalised by the weights' sum: an all-ones
    weight is the plain mean, and a half-masked image learns its other half at full strength."""
    err = (pred.float() - target.float()).square() * weights
    return err.sum() / weights.sum().clamp_min(1e-8)


def edit_size(width: int, height: int, size: int, multiple: int) -> tuple[int, int]:
    """(width, height) of about ``size`` x ``size`` pixels with the aspect ratio of ``width`` x
    ``height``, each side a multiple of ``multiple`` (at least one multiple)."""
    aspect = width / height
    w = max(multiple, round((size * size * aspect) ** 0.5 / multiple) * multiple)
    h = max(multiple, round((size * size / aspect) ** 0.5 / multiple) * multiple)
    return w, h


@contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """torch's global generators seeded with ``seed`` for one render, and restored after it. Some
    schedulers draw without the pipeline's ``generator`` (FlowMatchLCMScheduler re-noises every
    step from the global generator: HiDream-I1 Dev and Fast); seeded, their renders repeat with
    the seed, and training's own draws are left as they were."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


class Family(ABC):
    pipeline_cls: Any
    denoiser_name: str  # "transformer" | "unet"
    # The text encoder reads the control images too (Qwen-Image-Edit's VL encoder): prompts are then
    # cached per item with ``encode_prompts_with_controls``, not once per distinct caption.
    text_reads_controls: bool = False

    def __init__(self, spec: TrainingSpec, base_dir: Path):
        self.spec = spec
        self.base_dir = Path(base_dir)
        self.pipe: Any = None
        self.negative: dict[str, torch.Tensor] | None = None  # the negative prompt's cached text

    def check_base(self) -> None:
        """The base folder holds this family's denoiser: a base of another model (an SDXL folder for
        flux-dev) fails here naming both, not deep inside loading with a missing config.json."""
        if (self.base_dir / self.denoiser_name / "config.json").is_file():
            return
        from ..weights import WeightsError, pipeline_index

        try:
            index = pipeline_index(self.base_dir)
            declared = json.loads(index.read_text()).get("_class_name") if index else None
        except (OSError, ValueError, AttributeError):
            declared = None
        raise WeightsError(
            f"base_weights: {self.base_dir} is {f'a {declared}' if declared else 'a pipeline'} folder without "
            f"{self.denoiser_name}/, and model {self.spec.model} trains a {self.pipeline_cls.__name__}'s "
            f"{self.denoiser_name}; set model to the base's family or base_weights to a {self.spec.model} pipeline"
        )

    # -- loading -------------------------------------------------------------------------------
    # Loading is staged so the peak is the larger phase, not the sum: the text encoders and the
    # VAE load first (``load_encoders``), the dataset is cached, the text encoders are dropped
    # (``release_text_encoders``), and only then the denoiser loads (``load_denoiser``).
    def load(self, dtype: torch.dtype) -> None:
        """The whole pipeline at once (tests, benchmarks): both stages, encoders kept."""
        self.load_encoders(dtype)
        self.load_denoiser(dtype)

    def load_encoders(self, dtype: torch.dtype) -> None:
        """The pipeline without its denoiser, on the CPU in ``dtype``, frozen."""
        self.pipe = self.pipeline_cls.from_pretrained(
            self.base_dir,
            dtype=dtype,
            **self.components_from_elsewhere(self.base_dir, dtype),
            **dict.fromkeys(self.denoiser_components()),
        )
        self.pipe.set_progress_bar_config(disable=True)
        for name in self.frozen_names():
            getattr(self.pipe, name).requires_grad_(False).eval()
        self.after_load()

    def after_load(self) -> None:  # noqa: B027  (a hook: most families need nothing here)
        """Family set-up once the pipeline's frozen parts are loaded (dtype fixes, schedulers)."""

    def release_text_encoders(self) -> None:
        """Drop the text encoders (every prompt is cached by now); their memory can be reused."""
        for name in self.text_encoder_names():
            setattr(self.pipe, name, None)

    def load_denoiser(self, dtype: torch.dtype) -> None:
        """Add the denoiser to the loaded pipeline (on the CPU, frozen); the other parts are reused."""
        denoisers = self.denoiser_components()
        parts = {k: v for k, v in self.pipe.components.items() if k not in denoisers}
        self.pipe = self.pipeline_cls.from_pretrained(self.base_dir, dtype=dtype, **parts)
        self.pipe.set_progress_bar_config(disable=True)
        for name in denoisers:
            getattr(self.pipe, name).requires_grad_(False)

    def denoiser_components(self) -> list[str]:
        """The pipeline components that load in the second stage (Wan 2.2 A14B: both experts)."""
        return [self.denoiser_name]

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    @property
    def denoiser_dtype(self) -> torch.dtype:
        """The denoiser's weight dtype (diffusers' ``ModelMixin.dtype``; a plain Module has none)."""
        return getattr(self.pipe, self.denoiser_name).dtype

    def frozen_names(self) -> list[str]:
        """The loaded parts that never train: the VAE and the text encoders."""
        return [n for n in ("vae", *self.text_encoder_names()) if getattr(self.pipe, n, None) is not None]

    def text_encoder_names(self) -> list[str]:
        """The pipeline's text encoder components (``text_encoder``, ``text_encoder_2``, ...)."""
        names = self.pipeline_cls._get_signature_keys(self.pipeline_cls)[0] + list(
            getattr(self.pipeline_cls, "_optional_components", [])
        )
        return sorted({n for n in names if n.startswith("text_encoder")})

    def text_encoders(self) -> list[torch.nn.Module]:
        return [m for n in self.text_encoder_names() if (m := getattr(self.pipe, n, None)) is not None]

    # -- caching ---------------------------------------------------------------------------------
    @abstractmethod
    def encode_prompts(self, prompts: list[str], device: torch.device) -> list[dict[str, torch.Tensor]]:
        """One dict of text tensors per prompt (batch dim removed), on the CPU."""

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE posterior (mean, std) of ``pixels`` (B, 3, H, W) in [-1, 1], in fp32."""
        vae = self.pipe.vae
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    @torch.no_grad()
    def encode_controls(self, pixels: torch.Tensor) -> torch.Tensor:
        """Control images (B, 3, H, W) in [-1, 1] -> (B, C, h, w) fp32 latents, as the edit pipelines
        encode their input image: the posterior's mode (``sample_mode="argmax"``), not normalised."""
        return self.encode_images(pixels)[0]

    def encode_conditions(self, frames: list[Any], pixels: torch.Tensor) -> list[torch.Tensor]:
        """What a video sample conditions on besides its caption, from the sample itself (an
        image-to-video model: its first frame), each (1, ...) and cached as the item's controls;
        ``frames``: the sample's frames (PIL), ``pixels`` them as (1, 3, F, H, W) in [-1, 1]."""
        return []

    def encode_prompts_with_controls(
        self, prompts: list[str], controls: list[list[Any]], device: torch.device, *, for_render: bool
    ) -> list[dict[str, torch.Tensor]]:
        """Prompts read together with their control images (``controls[i]``: prompt i's PIL images),
        for families whose text encoder sees the images. ``for_render``: the images are as the user
        gave them (resize them as the pipeline does); else they are at their training bucket."""
        raise NotImplementedError(f"{type(self).__name__}: the text encoder does not read control images")

    def encode_keeping_negative(
        self,
        prompts: list[str],
        encode: Callable[[list[str]], list[dict[str, torch.Tensor]]],
        negative: str = "",
    ) -> list[dict[str, torch.Tensor]]:
        """``encode(prompts)``, the ``negative`` prompt encoded along once and kept as
        ``self.negative``: renders use it (the text encoders are gone by then), exactly as the
        pipeline encodes it itself for classifier-free guidance."""
        batch = prompts + ([] if self.negative is not None or negative in prompts else [negative])
        at = batch.index(negative) if negative in batch else None
        out = encode(list(batch))  # a copy: some pipelines rewrite the prompts in place (chat templates)
        if self.negative is None and at is not None:
            self.negative = out[at]
        return out[: len(prompts)]

    # -- training --------------------------------------------------------------------------------
    @abstractmethod
    def prediction(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(the denoiser's prediction, its training target) for one batch, in the same layout; every
        random number drawn from ``batch.rng`` (so restoring its generator replays the same draws).
        ``model`` is the (wrapped) denoiser."""

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """The scalar training loss of one batch (fp32): the mean squared error of ``prediction``, each
        element weighed by its latent pixel's loss-mask weight when the batch has masks."""
        pred, target = self.prediction(model, batch)
        if batch.loss_weights is None:
            return F.mse_loss(pred.float(), target.float())
        weights = self.weight_layout(batch.loss_weights.expand_as(batch.latent_mean))
        return weighted_mse(pred, target, weights)

    def weight_layout(self, weights: torch.Tensor) -> torch.Tensor:
        """Per-element weights in the cached latents' layout (B, C, h, w) rearranged as ``prediction``
        lays out its target (default: the same layout). A family that patchifies or packs its latents
        into tokens does the same here, and nothing else (no normalisation)."""
        return weights

    def sample_latents(self, batch: Batch) -> torch.Tensor:
        """A latent drawn from the cached VAE posterior, as encoding the image afresh would give."""
        return batch.latent_mean + batch.latent_std * batch.rng.randn(*batch.latent_mean.shape[1:])

    # -- validation and export -----------------------------------------------------------------
    @torch.no_grad()
    def render(
        self,
        text: dict[str, torch.Tensor],
        size: int,
        steps: int,
        guidance: float,
        seed: int,
        device: torch.device,
        controls: list[Any] | None = None,
    ) -> Any:
        """A PIL image from cached prompt embeddings with the current denoiser (a video model: a list
        of frames); ``controls``: the control images (PIL) of an edit render, passed as
        ``control_inputs`` says."""
        pipe = self.render_pipeline()
        with seeded_global_rng(seed):
            out = pipe(
                **self.render_inputs(text, device),
                **self.control_inputs(controls or [], size),
                **self.render_guidance(text, guidance, device),
                **self.render_extra(),
                num_inference_steps=steps,
                generator=torch.Generator(device="cpu").manual_seed(seed),
            )
        return self.render_output(out)

    def render_pipeline(self) -> Any:
        """The pipeline a validation render runs. The prompts come as cached embeddings, so it is
        built without text encoders (they left the device, and the process, after caching)."""
        names = self.pipeline_cls._get_signature_keys(self.pipeline_cls)[0]
        absent = {n: None for n in names if n.startswith(("text_encoder", "tokenizer", "processor"))}
        pipe = self.pipeline_cls(**{**absent, **self.render_components()})
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def rendered_size(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) the pipeline renders when asked for ``width`` x ``height`` (default:
        that size; HiDream's scales every request to its default area)."""
        return width, height

    @classmethod
    def components_from_elsewhere(cls, folder: Path, dtype: torch.dtype) -> dict[str, Any]:
        """Pipeline components the base folder may lack, loaded from their own repos (default: none;
        HiDream's repos leave out the gated Llama text encoder). Training and the run entry pass
        them to ``from_pretrained``."""
        return {}

    @classmethod  # noqa: B027  (a hook: most families need nothing)
    def prepare_run_pipeline(cls, pipe: Any) -> None:
        """Adjust the pipeline the run entry loaded in the run dtype (default: nothing; the video
        families keep their 3D VAE in fp32, as diffusers' examples load it)."""

    @classmethod
    def video_inputs(cls, fps: float) -> dict[str, Any]:
        """A video pipeline's arguments for a render at ``fps`` frames a second besides its frame count
        (LTX-2 conditions on the frame rate; Wan's pipeline takes none)."""
        return {}

    def render_extra(self) -> dict[str, Any]:
        """More pipeline arguments of a validation render (a video model's frame count)."""
        return {}

    def render_output(self, out: Any) -> Any:
        """The render from the pipeline's output: its first image (a video model: its frames, a list)."""
        return out.images[0]

    def render_guidance(
        self, text: dict[str, torch.Tensor], guidance: float, device: torch.device
    ) -> dict[str, Any]:
        """The pipeline's guidance arguments for a validation render of ``text`` (default: its
        ``guidance_scale``; the negative prompt, where one is used, rides in ``render_inputs``)."""
        return {"guidance_scale": guidance}

    @classmethod
    def guidance_kwargs(cls, guidance: float, negative_prompt: str) -> dict[str, Any]:
        """The pipeline arguments of a run-entry render for a guidance scale and a negative prompt
        (the run entry passes a negative prompt only to models whose registry entry uses one)."""
        return {
            "guidance_scale": guidance,
            **({"negative_prompt": negative_prompt} if negative_prompt else {}),
        }

    def render_inputs(self, text: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
        """The pipeline's prompt-embedding arguments for one cached prompt (batch of one)."""
        dtype = self.denoiser_dtype
        return {k: v[None].to(device, dtype if v.is_floating_point() else None) for k, v in text.items()}

    def control_inputs(self, controls: list[Any], size: int) -> dict[str, Any]:
        """The pipeline's size and image arguments for a validation render of about ``size`` x
        ``size`` pixels: square without controls; else the control image (a list for several) and
        an output of the first control's aspect ratio."""
        if not controls:
            return {"height": size, "width": size}
        width, height = edit_size(controls[0].width, controls[0].height, size, self.pixel_multiple())
        return {"height": height, "width": width, **self.run_image_inputs(controls, width, height, 0)}

    @classmethod
    def run_image_inputs(cls, images: list[Any], width: int, height: int, multiple: int) -> dict[str, Any]:
        """The pipeline's image arguments for a render of ``width`` x ``height`` with these input
        images (the image to edit, or the references): ``image``, one or a list."""
        return {"image": images[0] if len(images) == 1 else list(images)}

    def render_components(self) -> dict[str, Any]:
        """The pipeline parts a validation render needs, the text encoders aside."""
        return {"scheduler": self.pipe.scheduler, "vae": self.pipe.vae, self.denoiser_name: self.denoiser}

    def save_lora(self, out_dir: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
        """Write the diffusers/peft-format LoRA with the pipeline's own ``save_lora_weights`` (what
        its ``load_lora_weights`` reads back); returns the file."""
        layers: dict[str, torch.nn.Module | torch.Tensor] = dict(state_dict)  # the type diffusers declares
        self.pipeline_cls.save_lora_weights(
            out_dir,
            safe_serialization=True,
            **{
                f"{self.denoiser_name}_lora_layers": layers,
                f"{self.denoiser_name}_lora_adapter_metadata": metadata,
            },
        )
        return Path(out_dir) / "pytorch_lora_weights.safetensors"

    def companion_files(self, out_dir: Path) -> list[Path]:
        """Diffusers-format LoRA files ``save_lora`` wrote besides its main one (Wan 2.2 A14B: the
        low-noise expert's); they travel with it (kept steps, the delivered files)."""
        return []

    def kohya_companions(
        self, state_dict: dict[str, torch.Tensor], alpha: float
    ) -> dict[str, dict[str, torch.Tensor]]:
        """More kohya/ComfyUI-named files, by file name, besides ``kohya_state_dict``'s (Wan 2.2 A14B:
        the low-noise expert's)."""
        return {}

    def kohya_state_dict(
        self, state_dict: dict[str, torch.Tensor], alpha: float
    ) -> dict[str, torch.Tensor] | None:
        """The LoRA in kohya/ComfyUI naming (``lora_down`` / ``lora_up`` / ``alpha``); None where the
        family has no such convention (its ``ModelInfo.comfy_naming`` is empty)."""
        return None

    def pixel_multiple(self) -> int:
        """Image sides must be multiples of this (VAE factor x latent grid needs); known before the
        denoiser loads, from its config file."""
        return self.pixel_multiple_of(self.pipe.vae_scale_factor, self.denoiser_config())

    def denoiser_config(self) -> dict[str, Any]:
        """The denoiser's ``config.json`` in the base folder (diffusers layout), read without loading it."""
        return json.loads((self.base_dir / self.denoiser_name / "config.json").read_text())

    @classmethod
    def pixel_multiple_of(cls, vae_scale_factor: int, denoiser_config: dict[str, Any]) -> int:
        """The multiple for this family (transformers: VAE factor x 2x2 patches)."""
        return vae_scale_factor * 2
