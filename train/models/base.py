"""The one small interface between the training loop and a model family.

A family knows how to load its pipeline, encode captions and images once (for the cache),
compute the training loss of a batch of cached inputs, render validation images, and save
or convert its LoRA. The loop never looks inside; Flux and SDXL override only what differs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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


class Family(ABC):
    pipeline_cls: Any
    denoiser_name: str  # "transformer" | "unet"

    def __init__(self, spec: TrainingSpec, base_dir: Path):
        self.spec = spec
        self.base_dir = Path(base_dir)
        self.pipe: Any = None

    # -- loading -------------------------------------------------------------------------------
    def load(self, dtype: torch.dtype) -> None:
        """Load the whole pipeline on the CPU in ``dtype`` (the VAE stays fp32 where it needs to)."""
        self.pipe = self.pipeline_cls.from_pretrained(self.base_dir, dtype=dtype)
        self.pipe.set_progress_bar_config(disable=True)
        for name in self.frozen_names():
            getattr(self.pipe, name).requires_grad_(False).eval()
        self.denoiser.requires_grad_(False)

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    @property
    def denoiser_dtype(self) -> torch.dtype:
        """The denoiser's weight dtype (diffusers' ``ModelMixin.dtype``; a plain Module has none)."""
        return getattr(self.pipe, self.denoiser_name).dtype

    def frozen_names(self) -> list[str]:
        return [
            n for n in ("vae", "text_encoder", "text_encoder_2") if getattr(self.pipe, n, None) is not None
        ]

    def text_encoders(self) -> list[torch.nn.Module]:
        return [
            m
            for m in (getattr(self.pipe, "text_encoder", None), getattr(self.pipe, "text_encoder_2", None))
            if m is not None
        ]

    # -- caching ---------------------------------------------------------------------------------
    @abstractmethod
    def encode_prompts(self, prompts: list[str], device: torch.device) -> list[dict[str, torch.Tensor]]:
        """One dict of text tensors per prompt (batch dim removed), on the CPU."""

    @abstractmethod
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE posterior (mean, std) of ``pixels`` (B, 3, H, W) in [-1, 1]."""

    # -- training --------------------------------------------------------------------------------
    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """The scalar training loss of one batch (fp32). ``model`` is the (wrapped) denoiser."""

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
    ) -> Any:
        """A PIL image from cached prompt embeddings with the current denoiser."""
        # The prompts come as cached embeddings, so the pipeline is built without text encoders
        # (they may have left the device by now).
        pipe = self.pipeline_cls(
            **self.render_components(),
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
        )
        pipe.set_progress_bar_config(disable=True)
        dtype = self.denoiser_dtype
        return pipe(
            prompt_embeds=text["prompt_embeds"][None].to(device, dtype),
            pooled_prompt_embeds=text["pooled_prompt_embeds"][None].to(device, dtype),
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator(device="cpu").manual_seed(seed),
        ).images[0]

    def render_components(self) -> dict[str, Any]:
        """The pipeline parts a validation render needs, the text encoders aside."""
        return {"scheduler": self.pipe.scheduler, "vae": self.pipe.vae, self.denoiser_name: self.denoiser}

    @abstractmethod
    def save_lora(self, out_dir: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
        """Write the diffusers/peft-format LoRA; returns the file."""

    @abstractmethod
    def kohya_state_dict(self, state_dict: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
        """The LoRA in kohya/ComfyUI naming (``lora_down`` / ``lora_up`` / ``alpha``)."""

    def pixel_multiple(self) -> int:
        """Image sides must be multiples of this (VAE factor x latent grid needs)."""
        return 16
