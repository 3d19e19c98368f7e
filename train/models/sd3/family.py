"""Stable Diffusion 3.5 (Large, Medium): rectified-flow matching on unpacked latents.

What the pipeline (``StableDiffusion3Pipeline.__call__``) feeds the transformer, and so what
training feeds it:

- ``hidden_states``: the latent ``(vae_latent - shift_factor) * scaling_factor`` as is, (B, 16, h, w);
  the transformer cuts its own 2x2 patches and adds its cropped sin-cos position embedding;
- ``timestep``: sigma x ``num_train_timesteps`` (the scheduler's timesteps, 0..1000);
- ``encoder_hidden_states``: CLIP-L and CLIP-G penultimate hidden states concatenated on the
  feature axis, zero-padded to the T5 width, followed by the T5 tokens (77 + max_sequence_length);
  no attention mask (SD3 attends to the padding);
- ``pooled_projections``: the two CLIP pooled (projected) outputs concatenated.

The target is the velocity ``noise - x0`` of the straight path ``x_s = (1 - s) x0 + s noise``.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import StableDiffusion3Pipeline

from ..base import Batch
from ..flow import FlowMatchFamily, Noised


class Sd3Family(FlowMatchFamily):
    pipeline_cls = StableDiffusion3Pipeline
    denoiser_name = "transformer"

    @classmethod
    def pixel_multiple_of(cls, vae_scale_factor: int, denoiser_config: dict[str, Any]) -> int:
        return vae_scale_factor * int(denoiser_config.get("patch_size", 2))

    # -- caching ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device) -> list[dict[str, torch.Tensor]]:
        def encode(batch: list[str]) -> list[dict[str, torch.Tensor]]:
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=batch,
                prompt_2=None,  # None: the same prompt for every encoder
                prompt_3=None,
                device=device,
                do_classifier_free_guidance=False,
                max_sequence_length=self.spec.flow.max_sequence_length,
            )
            return [
                {"prompt_embeds": e.cpu(), "pooled_prompt_embeds": p.cpu()}
                for e, p in zip(embeds, pooled, strict=True)
            ]

        return self.encode_keeping_negative(prompts, encode)

    # -- training --------------------------------------------------------------------------------
    # ``auto`` noise levels are how SD3 was trained (Esser et al. 2024, "Scaling Rectified Flow
    # Transformers", sec. 3.1 and 5.3.2; diffusers' train_dreambooth_lora_sd3.py): logit-normal u
    # (mean 0, std 1) moved by the base model's scheduler shift (3.0 for SD3.5, the shift SD3 was
    # trained and samples with at 1024 px).
    def image_tokens(self, x0: torch.Tensor) -> int:
        patch = int(self.pipe.transformer.config.patch_size)
        return (x0.shape[2] // patch) * (x0.shape[3] // patch)

    def predict(self, model: torch.nn.Module, x: Noised, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = batch.text["prompt_embeds"].dtype
        timesteps = x.sigmas * self.pipe.scheduler.config.num_train_timesteps  # as the pipeline's, fp32
        pred = model(
            hidden_states=x.latents.to(dtype),  # (B, 16, h, w): the transformer cuts its own patches
            timestep=timesteps,
            encoder_hidden_states=batch.text["prompt_embeds"],
            pooled_projections=batch.text["pooled_prompt_embeds"],
            return_dict=False,
        )[0]
        return pred, x.target

    # -- validation and export -----------------------------------------------------------------
    def render_inputs(self, text: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
        inputs = super().render_inputs(text, device)
        assert self.negative is not None, "encode_prompts keeps the empty prompt for the negative"
        neg = super().render_inputs(self.negative, device)
        inputs["negative_prompt_embeds"] = neg["prompt_embeds"]
        inputs["negative_pooled_prompt_embeds"] = neg["pooled_prompt_embeds"]
        return inputs


FAMILY = Sd3Family
