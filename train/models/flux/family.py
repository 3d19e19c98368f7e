"""Flux.1 (dev, schnell): rectified-flow matching on packed latents."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift

from ..spec import TrainingSpec
from .base import Batch, BatchRandom, Family
from .kohya import flux_to_kohya


class FluxFamily(Family):
    pipeline_cls = FluxPipeline
    denoiser_name = "transformer"

    def __init__(self, spec: TrainingSpec, base_dir: Path):
        super().__init__(spec, base_dir)
        self._ids_cache: dict[tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}

    # -- caching ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device) -> list[dict[str, torch.Tensor]]:
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=prompts,
            device=device,
            max_sequence_length=self.spec.flux.max_sequence_length,
        )
        return [
            {"prompt_embeds": e.cpu(), "pooled_prompt_embeds": p.cpu()}
            for e, p in zip(embeds, pooled, strict=True)
        ]

    # -- training --------------------------------------------------------------------------------
    def sample_sigmas(self, rng: BatchRandom, image_seq_len: int) -> torch.Tensor:
        """Noise levels in (0, 1) as the spec's timestep sampling says."""
        opts = self.spec.flux
        if opts.timestep_sampling == "uniform":
            return rng.rand()
        u = torch.sigmoid(rng.randn() * opts.logit_std + opts.logit_mean)
        if opts.timestep_sampling == "logit_normal":
            return u
        if opts.timestep_sampling == "shift":
            return opts.shift * u / (1 + (opts.shift - 1) * u)
        # flux_shift: the resolution-dependent exponential shift the dev pipeline samples with
        cfg = self.pipe.scheduler.config
        if cfg.get("use_dynamic_shifting", False):
            mu = calculate_shift(
                image_seq_len,
                cfg.get("base_image_seq_len", 256),
                cfg.get("max_image_seq_len", 4096),
                cfg.get("base_shift", 0.5),
                cfg.get("max_shift", 1.15),
            )
            return math.exp(mu) / (math.exp(mu) + (1 / u - 1))
        shift = cfg.get("shift", 1.0)
        return shift * u / (1 + (shift - 1) * u)

    def _image_ids(self, rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The pipeline's latent position ids, kept per shape on the device: built on the host
        every step they would cost a synchronising copy each step."""
        key = (rows, cols, device, dtype)
        if key not in self._ids_cache:
            self._ids_cache[key] = FluxPipeline._prepare_latent_image_ids(1, rows, cols, device, dtype)
        return self._ids_cache[key]

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        vae_cfg = self.pipe.vae.config
        x0 = (self.sample_latents(batch) - vae_cfg.shift_factor) * vae_cfg.scaling_factor  # (B, C, h, w)
        b, c, h, w = x0.shape
        noise = batch.rng.randn(c, h, w)
        sigmas = self.sample_sigmas(batch.rng, (h // 2) * (w // 2))
        s = sigmas.view(b, 1, 1, 1)
        noisy = (1.0 - s) * x0 + s * noise  # straight path from data (s=0) to noise (s=1)
        target = noise - x0  # its velocity

        dtype = batch.text["prompt_embeds"].dtype
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w).to(dtype)  # (B, h/2*w/2, 4C)
        img_ids = self._image_ids(h // 2, w // 2, x0.device, dtype)
        txt_ids = torch.zeros(batch.text["prompt_embeds"].shape[1], 3, device=x0.device, dtype=dtype)
        guidance = None
        if self.pipe.transformer.config.guidance_embeds:
            guidance = torch.full((b,), self.spec.flux.guidance, device=x0.device, dtype=torch.float32)
        pred = model(
            hidden_states=packed,
            timestep=sigmas.to(dtype),
            guidance=guidance,
            pooled_projections=batch.text["pooled_prompt_embeds"],
            encoder_hidden_states=batch.text["prompt_embeds"],
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return F.mse_loss(pred.float(), FluxPipeline._pack_latents(target, b, c, h, w).float())

    # -- validation and export -----------------------------------------------------------------

    def kohya_state_dict(self, state_dict: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
        return flux_to_kohya(state_dict, alpha, self.denoiser)


FAMILY = FluxFamily
