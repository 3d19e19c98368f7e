"""Qwen-Image: rectified-flow matching on 2x2-packed latents of a video-style VAE, Qwen2.5-VL text.

As ``QwenImagePipeline.__call__`` does it:

- text: the pipeline's ``encode_prompt`` (its system-prompt template, the last hidden state of
  Qwen2.5-VL, the 34 template tokens dropped). The pipeline pads a batch to its longest prompt
  with a mask; the cache pads every prompt to ``flow.max_sequence_length`` and keeps that mask,
  and each step trims the batch back to its longest prompt (no mask when none is padded), so the
  transformer sees exactly what the pipeline gives it;
- latents: the VAE posterior of one frame, normalised per channel with the VAE config's
  ``latents_mean`` / ``latents_std`` (the pipeline undoes exactly that before decoding), packed
  2x2 (``_pack_latents``), RoPE from ``img_shapes`` = (1, h/2, w/2);
- noise and target: ``x_s = (1 - s) x0 + s noise``, the transformer predicts ``noise - x0``, its
  ``timestep`` is the sigma itself (the pipeline feeds ``t / 1000``); no guidance embedding.

``timestep_sampling: auto`` is logit-normal sigmas moved by the resolution-dependent exponential
shift of the base model's scheduler (``use_dynamic_shifting``: ``mu`` from the image's token
count between ``base_image_seq_len`` and ``max_image_seq_len``): the noise levels the pipeline
denoises at for that size, as musubi-tuner's ``qwen_shift`` samples them. The diffusers example
(train_dreambooth_lora_qwen_image.py) samples unshifted sigmas; ``uniform`` / ``logit_normal``
give that.

Classifier-free guidance is the pipeline's ``true_cfg_scale`` with a negative prompt (the model
card's ``" "``); validation renders use it with the spec's guidance scale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline

from ...spec import TrainingSpec
from ..base import Batch
from ..flow import FlowMatchFamily, Noised
from ..kohya import sdxl_to_kohya

NEGATIVE_PROMPT = " "  # the model card's "no negative prompt" (an empty one still enables CFG)


def pad_to(t: torch.Tensor, length: int) -> torch.Tensor:
    """``t`` (L, ...) cut or zero-padded to ``length`` rows."""
    t = t[:length]
    return torch.cat([t, t.new_zeros(length - t.shape[0], *t.shape[1:])]) if t.shape[0] < length else t


class QwenImageFamily(FlowMatchFamily):
    pipeline_cls = QwenImagePipeline
    denoiser_name = "transformer"

    def __init__(self, spec: TrainingSpec, base_dir: Path):
        super().__init__(spec, base_dir)
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- caching ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device) -> list[dict[str, torch.Tensor]]:
        def encode(batch: list[str]) -> list[dict[str, torch.Tensor]]:
            length = self.text_length
            embeds, mask = self.pipeline_text(batch, device)
            if mask is None:  # the pipeline drops an all-ones mask
                mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            return [
                {"prompt_embeds": pad_to(e, length).cpu(), "prompt_embeds_mask": pad_to(m, length).cpu()}
                for e, m in zip(embeds, mask, strict=True)
            ]

        return self.encode_keeping_negative(list(prompts), encode, NEGATIVE_PROMPT)

    def pipeline_text(
        self, prompts: list[str], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The pipeline's ``encode_prompt``: (embeddings, mask or None when nothing is padded)."""
        return self.pipe.encode_prompt(prompt=prompts, device=device, max_sequence_length=self.text_length)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vae = self.pipe.vae
        # the VAE takes video (B, C, frames, H, W): an image is one frame, dropped again here
        dist = vae.encode(pixels.to(vae.device, vae.dtype)[:, :, None]).latent_dist
        return dist.mean[:, :, 0].float(), dist.std[:, :, 0].float()

    # -- training --------------------------------------------------------------------------------
    def latent_stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE config's per-channel mean and std, shaped (1, C, 1, 1), kept per device."""
        if device not in self._stats:
            cfg = self.pipe.vae.config
            self._stats[device] = (
                torch.tensor(cfg.latents_mean, device=device).view(1, -1, 1, 1),
                torch.tensor(cfg.latents_std, device=device).view(1, -1, 1, 1),
            )
        return self._stats[device]

    @staticmethod
    def trimmed(text: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batch's embeddings cut to its longest prompt, and the mask (None when nothing is
        padded), as the pipeline's ``encode_prompt`` returns them for these prompts."""
        embeds, mask = text["prompt_embeds"], text["prompt_embeds_mask"]
        lengths = mask.sum(dim=1)
        longest, shortest = torch.stack([lengths.max(), lengths.min()]).tolist()  # one host sync
        mask = mask[:, :longest]
        return embeds[:, :longest], (None if shortest == longest else mask)

    def training_latents(self, batch: Batch) -> torch.Tensor:
        mean, std = self.latent_stats(batch.latent_mean.device)
        return (self.sample_latents(batch) - mean) / std  # (B, C, h, w)

    # ``image_tokens`` is the base class's: the pipelines' mu reads the target's token count
    # (latents.shape[1]), never the controls'.
    def predict(self, model: torch.nn.Module, x: Noised, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.latents.shape
        mean, std = self.latent_stats(x.latents.device)
        # Edit models: each control's normalised, packed latents follow the target's tokens, each
        # image with its own RoPE grid in ``img_shapes`` (QwenImageEditPipeline.__call__)
        pack = QwenImagePipeline._pack_latents
        controls = [(k - mean) / std for k in batch.controls]  # each (B, C, h_k, w_k)
        hidden = torch.cat(
            [pack(x.latents, b, c, h, w), *(pack(k, b, c, *k.shape[2:]) for k in controls)], dim=1
        )
        shapes = [(1, h // 2, w // 2), *((1, k.shape[2] // 2, k.shape[3] // 2) for k in controls)]
        embeds, mask = self.trimmed(batch.text)
        pred = model(
            hidden_states=hidden.to(embeds.dtype),
            timestep=x.sigmas.to(embeds.dtype),
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=mask,
            img_shapes=[shapes] * b,
            return_dict=False,
        )[0]
        n_target = (h // 2) * (w // 2)  # the loss is on the target's tokens only
        return pred[:, :n_target], pack(x.target, b, c, h, w)

    def weight_layout(self, weights: torch.Tensor) -> torch.Tensor:
        return QwenImagePipeline._pack_latents(weights, *weights.shape)

    # -- validation and export -----------------------------------------------------------------
    def render_inputs(self, text: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
        embeds, mask = self.trimmed({k: v[None] for k, v in text.items()})
        out: dict[str, Any] = {"prompt_embeds": embeds.to(device, self.denoiser_dtype)}
        if mask is not None:
            out["prompt_embeds_mask"] = mask.to(device)
        return out

    def negative_text(self, text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """The negative prompt's cached embeddings for a render of ``text`` (None: no CFG)."""
        return self.negative

    def render_guidance(
        self, text: dict[str, torch.Tensor], guidance: float, device: torch.device
    ) -> dict[str, Any]:
        """The guidance scale as the pipeline's ``true_cfg_scale`` against the cached negative prompt
        (Qwen-Image has no guidance embedding and ignores ``guidance_scale``)."""
        kw: dict[str, Any] = {"true_cfg_scale": guidance}
        negative = self.negative_text(text)
        if guidance > 1 and negative is not None:
            kw.update({f"negative_{k}": v for k, v in self.render_inputs(negative, device).items()})
        return kw

    @classmethod
    def guidance_kwargs(cls, guidance: float, negative_prompt: str) -> dict[str, Any]:
        """This pipeline ignores ``guidance_scale``: its CFG is ``true_cfg_scale`` and runs only with
        a negative prompt, the model card's " " if none is given."""
        return {"true_cfg_scale": guidance, "negative_prompt": negative_prompt or NEGATIVE_PROMPT}

    def kohya_state_dict(self, state_dict: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
        # musubi-tuner's networks.lora_qwen_image names: ``lora_unet_`` + the diffusers module path
        # with ``_`` for ``.`` (ComfyUI loads these; diffusers reads them back with
        # _convert_non_diffusers_qwen_lora_to_diffusers). The SDXL writer makes exactly that name.
        return sdxl_to_kohya(state_dict, alpha)


FAMILY = QwenImageFamily
