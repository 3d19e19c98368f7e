"""Flux.1 (dev, schnell): rectified-flow matching on packed latents."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

from ...spec import TrainingSpec
from ..base import Batch
from ..flow import FlowMatchFamily, Noised
from ..kohya import flux_to_kohya


class FluxFamily(FlowMatchFamily):
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
            max_sequence_length=self.spec.flow.max_sequence_length,
        )
        return [
            {"prompt_embeds": e.cpu(), "pooled_prompt_embeds": p.cpu()}
            for e, p in zip(embeds, pooled, strict=True)
        ]

    # -- training --------------------------------------------------------------------------------
    # ``auto`` noise levels: the resolution-dependent shift the dev pipeline samples with (the
    # scheduler's ``exp(mu)``; schnell's scheduler has a fixed shift), on logit-normal draws.
    def _image_ids(self, rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The pipeline's latent position ids, kept per shape on the device: built on the host
        every step they would cost a synchronising copy each step."""
        key = (rows, cols, device, dtype)
        if key not in self._ids_cache:
            self._ids_cache[key] = FluxPipeline._prepare_latent_image_ids(1, rows, cols, device, dtype)
        return self._ids_cache[key]

    def predict(self, model: torch.nn.Module, x: Noised, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.latents.shape
        dtype = batch.text["prompt_embeds"].dtype
        packed = FluxPipeline._pack_latents(x.latents, b, c, h, w).to(dtype)  # (B, h/2*w/2, 4C)
        guidance = None
        if self.pipe.transformer.config.guidance_embeds:
            guidance = torch.full((b,), self.spec.flow.guidance, device=x.latents.device, dtype=torch.float32)
        pred = model(
            hidden_states=packed,
            timestep=x.sigmas.to(dtype),
            guidance=guidance,
            pooled_projections=batch.text["pooled_prompt_embeds"],
            encoder_hidden_states=batch.text["prompt_embeds"],
            txt_ids=torch.zeros(
                batch.text["prompt_embeds"].shape[1], 3, device=x.latents.device, dtype=dtype
            ),
            img_ids=self._image_ids(h // 2, w // 2, x.latents.device, dtype),
            return_dict=False,
        )[0]
        return pred, FluxPipeline._pack_latents(x.target, b, c, h, w)

    def weight_layout(self, weights: torch.Tensor) -> torch.Tensor:
        return FluxPipeline._pack_latents(weights, *weights.shape)

    # -- validation and export -----------------------------------------------------------------

    def kohya_state_dict(self, state_dict: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
        return flux_to_kohya(state_dict, alpha, self.denoiser)


FAMILY = FluxFamily
