"""SDXL: DDPM noise prediction (epsilon or v) with pooled text embeddings and ``add_time_ids``."""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.training_utils import compute_snr

from ..base import Batch, Family, weighted_mse
from ..kohya import sdxl_to_kohya


class SdxlFamily(Family):
    pipeline_cls = StableDiffusionXLPipeline
    denoiser_name = "unet"

    def after_load(self) -> None:
        self.pipe.vae.to(torch.float32)  # the SDXL VAE overflows in half precision
        # from_config returns (scheduler, unused kwargs) only when asked to
        self.noise_scheduler = cast(DDPMScheduler, DDPMScheduler.from_config(self.pipe.scheduler.config))
        wanted = self.spec.sdxl.prediction_type
        self.prediction_type = self.noise_scheduler.config["prediction_type"] if wanted == "auto" else wanted

    @classmethod
    def pixel_multiple_of(cls, vae_scale_factor: int, denoiser_config: dict[str, Any]) -> int:
        # the UNet halves the latent once per level after the first
        return vae_scale_factor * 2 ** (len(denoiser_config["block_out_channels"]) - 1)

    # -- caching ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device) -> list[dict[str, torch.Tensor]]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return [
            {"prompt_embeds": e.cpu(), "pooled_prompt_embeds": p.cpu()}
            for e, p in zip(embeds, pooled, strict=True)
        ]

    # -- training --------------------------------------------------------------------------------
    def prediction(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        pred, target, _ = self._forward(model, batch)
        return pred, target

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        pred, target, t = self._forward(model, batch)
        weights = None if batch.loss_weights is None else batch.loss_weights.expand_as(target)
        if self.spec.sdxl.snr_gamma is None:
            if weights is None:
                return F.mse_loss(pred.float(), target.float())
            return weighted_mse(pred, target, weights)
        # min-SNR-gamma weighting (Hang et al. 2023): caps the weight of low-noise steps
        snr = compute_snr(self.noise_scheduler, t)
        weight = torch.clamp(snr, max=self.spec.sdxl.snr_gamma) / snr
        if self.prediction_type == "v_prediction":
            weight = torch.clamp(snr, max=self.spec.sdxl.snr_gamma) / (snr + 1)
        err = F.mse_loss(pred.float(), target.float(), reduction="none")
        if weights is None:
            per_item = err.mean(dim=(1, 2, 3))
        else:  # each item's masked mean
            per_item = (err * weights).sum(dim=(1, 2, 3)) / weights.sum(dim=(1, 2, 3)).clamp_min(1e-8)
        return (per_item * weight).mean()

    def _forward(
        self, model: torch.nn.Module, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prediction, target, timesteps) of one batch."""
        sched = self.noise_scheduler
        x0 = self.sample_latents(batch) * self.pipe.vae.config.scaling_factor  # (B, 4, h, w)
        noise = batch.rng.randn(*x0.shape[1:])
        if self.spec.sdxl.noise_offset:
            noise = noise + self.spec.sdxl.noise_offset * batch.rng.randn(x0.shape[1], 1, 1)
        # diffusers annotates timesteps as IntTensor; the int64 tensor randint gives is what it indexes with
        t = cast(torch.IntTensor, batch.rng.randint(sched.config["num_train_timesteps"]))
        noisy = sched.add_noise(x0, noise, t)
        target = noise if self.prediction_type == "epsilon" else sched.get_velocity(x0, noise, t)

        dtype = batch.text["prompt_embeds"].dtype
        pred = model(
            noisy.to(dtype),
            t,
            encoder_hidden_states=batch.text["prompt_embeds"],
            added_cond_kwargs={
                "text_embeds": batch.text["pooled_prompt_embeds"],
                "time_ids": batch.time_ids.to(dtype),
            },
            return_dict=False,
        )[0]
        return pred, target, t

    # -- validation and export -----------------------------------------------------------------
    def render_components(self) -> dict[str, Any]:
        return {**super().render_components(), "add_watermarker": False}

    def kohya_state_dict(self, state_dict: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
        return sdxl_to_kohya(state_dict, alpha)


FAMILY = SdxlFamily
