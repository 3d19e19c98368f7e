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

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
    StableDiffusion3Pipeline,
    calculate_shift,
)

from ..spec import TrainingSpec
from .base import Batch, BatchRandom, Family


def shifted(u: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow-matching timestep shift ``s u / (1 + (s - 1) u)`` (SD3 paper, eq. 23)."""
    return shift * u / (1 + (shift - 1) * u)


def scheduler_shift(config: Any, image_seq_len: int) -> float:
    """The shift the base model's scheduler samples with at this many image tokens: its fixed
    ``shift``, or ``exp(mu)`` of the resolution-dependent (exponential) shift where dynamic."""
    if config.get("use_dynamic_shifting", False):
        mu = calculate_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        return math.exp(mu)  # exp(mu) / (exp(mu) + 1/u - 1) is the fixed shift exp(mu)
    return float(config.get("shift", 1.0))


class Sd3Family(Family):
    pipeline_cls = StableDiffusion3Pipeline
    denoiser_name = "transformer"

    def __init__(self, spec: TrainingSpec, base_dir: Path):
        super().__init__(spec, base_dir)
        # The empty prompt's embeddings, kept from caching: renders use them as the negative prompt
        # (the text encoders are gone by then) exactly as the pipeline encodes "" itself.
        self.negative: dict[str, torch.Tensor] | None = None

    @classmethod
    def pixel_multiple_of(cls, vae_scale_factor: int, denoiser_config: dict[str, Any]) -> int:
        return vae_scale_factor * int(denoiser_config.get("patch_size", 2))

    # -- caching ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device) -> list[dict[str, torch.Tensor]]:
        extra = [] if self.negative is not None or "" in prompts else [""]
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts + extra,
            prompt_2=None,  # None: the same prompt for every encoder
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.spec.flow.max_sequence_length,
        )
        out = [
            {"prompt_embeds": e.cpu(), "pooled_prompt_embeds": p.cpu()}
            for e, p in zip(embeds, pooled, strict=True)
        ]
        for prompt, text in zip(prompts + extra, out, strict=True):
            if prompt == "" and self.negative is None:
                self.negative = text
        return out[: len(prompts)]

    # -- training --------------------------------------------------------------------------------
    def sample_sigmas(self, rng: BatchRandom, image_seq_len: int) -> torch.Tensor:
        """Noise levels in (0, 1) as ``spec.flow.timestep_sampling`` says.

        ``auto`` is how SD3 was trained (Esser et al. 2024, "Scaling Rectified Flow Transformers",
        sec. 3.1 and 5.3.2; diffusers' train_dreambooth_lora_sd3.py): logit-normal u (mean 0,
        std 1) moved by the timestep shift of the base model's scheduler (3.0 for SD3.5, the
        shift SD3 was trained and samples with at 1024 px) — the same as ``shift``.
        """
        opts = self.spec.flow
        if opts.timestep_sampling == "uniform":
            return rng.rand()
        u = torch.sigmoid(rng.randn() * opts.logit_std + opts.logit_mean)
        if opts.timestep_sampling == "logit_normal":
            return u
        shift = opts.shift or scheduler_shift(self.pipe.scheduler.config, image_seq_len)
        return shifted(u, shift)

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        vae_cfg = self.pipe.vae.config
        latents = self.sample_latents(batch)
        x0 = (latents - (vae_cfg.shift_factor or 0.0)) * vae_cfg.scaling_factor  # (B, 16, h, w)
        b, c, h, w = x0.shape
        noise = batch.rng.randn(c, h, w)
        patch = int(self.pipe.transformer.config.patch_size)
        sigmas = self.sample_sigmas(batch.rng, (h // patch) * (w // patch))
        s = sigmas.view(b, 1, 1, 1)
        noisy = (1.0 - s) * x0 + s * noise  # straight path from data (s=0) to noise (s=1)
        target = noise - x0  # its velocity

        dtype = batch.text["prompt_embeds"].dtype
        timesteps = sigmas * self.pipe.scheduler.config.num_train_timesteps  # as the pipeline's, fp32
        pred = model(
            hidden_states=noisy.to(dtype),
            timestep=timesteps,
            encoder_hidden_states=batch.text["prompt_embeds"],
            pooled_projections=batch.text["pooled_prompt_embeds"],
            return_dict=False,
        )[0]
        return F.mse_loss(pred.float(), target.float())

    # -- validation and export -----------------------------------------------------------------
    def render_inputs(self, text: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
        inputs = super().render_inputs(text, device)
        assert self.negative is not None, "encode_prompts keeps the empty prompt for the negative"
        neg = super().render_inputs(self.negative, device)
        inputs["negative_prompt_embeds"] = neg["prompt_embeds"]
        inputs["negative_pooled_prompt_embeds"] = neg["pooled_prompt_embeds"]
        return inputs


FAMILY = Sd3Family
