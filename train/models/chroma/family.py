"""Chroma (Chroma1-HD): rectified-flow matching on packed latents, T5 only, with its text mask.

Chroma is FLUX.1-schnell re-trained with the per-block modulation replaced by one small network
(the "distilled guidance" approximator fed by the timestep alone) and without CLIP. What the
pipeline (``ChromaPipeline.__call__``) feeds the transformer, and so what training feeds it:

- ``hidden_states``: ``(vae_latent - shift_factor) * scaling_factor`` packed into 2x2 patches
  (B, h/2 * w/2, 4C), with Flux's ``img_ids`` (0, row, col) and all-zero ``txt_ids``;
- ``timestep``: sigma in [0, 1] (the pipeline divides the scheduler's timestep by 1000; the
  transformer multiplies it back); no guidance input (the model is undistilled: real CFG);
- ``encoder_hidden_states``: T5 run *with* its attention mask, padded to max_sequence_length;
- ``attention_mask``: the prompt mask that keeps the tokens and the first padding token,
  followed by ones for the image tokens, in the embeddings' dtype — built here exactly as the
  pipeline builds it (``_get_t5_prompt_embeds`` and ``_prepare_attention_mask``).

The target is the velocity ``noise - x0`` of ``x_s = (1 - s) x0 + s noise``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers.pipelines.chroma.pipeline_chroma import ChromaPipeline

from ...spec import TrainingSpec
from ..base import Batch, BatchRandom
from ..flow import FlowMatchFamily, Noised
from ..kohya import flux_to_kohya


def chroma_density_sample(u: torch.Tensor, points: int = 1000) -> torch.Tensor:
    """Map uniform draws ``u`` to Chroma's training distribution of sigmas: the density
    ``2 - 7.7 (x - 0.5)^2`` on [0, 1] (lodestones/flow, ``create_distribution``), by inverse CDF
    on the same 1000-point grid the reference code samples from."""
    x = torch.linspace(0, 1, points, device=u.device)
    pdf = -7.7 * (x - 0.5) ** 2 + 2
    cdf = torch.cumsum(pdf / pdf.sum(), dim=0)
    index = torch.searchsorted(cdf, u.contiguous(), right=True).clamp(max=points - 1)
    return x[index]


class ChromaFamily(FlowMatchFamily):
    pipeline_cls = ChromaPipeline
    denoiser_name = "transformer"

    def __init__(self, spec: TrainingSpec, base_dir: Path):
        super().__init__(spec, base_dir)
        self._mask: torch.Tensor | None = None  # this step's joint attention mask (see load_denoiser)
        self._ids_cache: dict[tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}

    # -- loading -------------------------------------------------------------------------------
    def load_denoiser(self, dtype: torch.dtype) -> None:
        super().load_denoiser(dtype)
        # diffusers 0.42.1 drops ``attention_mask`` when it checkpoints a single-stream block
        # (``_gradient_checkpointing_func(block, hidden_states, temb, image_rotary_emb)``), so a
        # run with gradient checkpointing would train those blocks unmasked while the pipeline
        # renders them masked. This hook puts the step's mask back where the call lacks one.
        for block in getattr(self.denoiser, "single_transformer_blocks", []):
            block.register_forward_pre_hook(self._restore_mask, with_kwargs=True)

    def _restore_mask(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if self._mask is None or len(args) > 3 or "attention_mask" in kwargs:
            return None
        return args, {**kwargs, "attention_mask": self._mask}

    # -- caching ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device) -> list[dict[str, torch.Tensor]]:
        def encode(batch: list[str]) -> list[dict[str, torch.Tensor]]:
            embeds, _, masks, *_ = self.pipe.encode_prompt(
                prompt=batch,
                device=device,
                do_classifier_free_guidance=False,
                max_sequence_length=self.spec.flow.max_sequence_length,
            )
            return [
                {"prompt_embeds": e.cpu(), "prompt_attention_mask": m.cpu()}
                for e, m in zip(embeds, masks, strict=True)
            ]

        return self.encode_keeping_negative(prompts, encode)

    # -- training --------------------------------------------------------------------------------
    def auto_draw(self, rng: BatchRandom) -> torch.Tensor:
        """``auto`` is how Chroma was trained (lodestones/flow, ``train_chroma.py``): sigmas from the
        density ``2 - 7.7 (x - 0.5)^2`` on [0, 1] (a broad bump around 0.5 that keeps both ends),
        then moved by the resolution-dependent exponential shift of Flux that the reference code
        applies (``time_shift(get_lin_function()(h * w), 1, t)``) and that the pipeline samples
        with (``mu`` from the scheduler's base/max shift: the base class's ``auto_shift``)."""
        return chroma_density_sample(rng.rand())

    def _image_ids(self, rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (rows, cols, device, dtype)
        if key not in self._ids_cache:
            self._ids_cache[key] = ChromaPipeline._prepare_latent_image_ids(1, rows, cols, device, dtype)
        return self._ids_cache[key]

    @staticmethod
    def joint_mask(prompt_mask: torch.Tensor, image_tokens: int) -> torch.Tensor:
        """The transformer's mask: the prompt's, then ones for the image tokens (the pipeline's
        ``_prepare_attention_mask``: a bool block concatenated to the float prompt mask)."""
        ones = torch.ones(prompt_mask.shape[0], image_tokens, device=prompt_mask.device, dtype=torch.bool)
        return torch.cat([prompt_mask, ones], dim=1)

    def predict(self, model: torch.nn.Module, x: Noised, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.latents.shape
        embeds = batch.text["prompt_embeds"]
        dtype = embeds.dtype
        packed = ChromaPipeline._pack_latents(x.latents, b, c, h, w).to(dtype)  # (B, h/2*w/2, 4C)
        self._mask = self.joint_mask(batch.text["prompt_attention_mask"].to(dtype), packed.shape[1])
        pred = model(
            hidden_states=packed,
            timestep=x.sigmas.to(dtype),
            encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=x.latents.device, dtype=dtype),
            img_ids=self._image_ids(h // 2, w // 2, x.latents.device, dtype),
            attention_mask=self._mask,
            return_dict=False,
        )[0]
        return pred, ChromaPipeline._pack_latents(x.target, b, c, h, w)

    def weight_layout(self, weights: torch.Tensor) -> torch.Tensor:
        return ChromaPipeline._pack_latents(weights, *weights.shape)

    # -- validation and export -----------------------------------------------------------------
    def render_inputs(self, text: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
        inputs = super().render_inputs(text, device)
        assert self.negative is not None, "encode_prompts keeps the empty prompt for the negative"
        neg = super().render_inputs(self.negative, device)
        inputs["negative_prompt_embeds"] = neg["prompt_embeds"]
        inputs["negative_prompt_attention_mask"] = neg["prompt_attention_mask"]
        return inputs

    def kohya_state_dict(self, state_dict: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
        # Chroma keeps Flux's block layout and names (BFL double_blocks / single_blocks with fused
        # qkv and linear1), which sd-scripts and ComfyUI use for Chroma LoRAs too; diffusers reads
        # them back with the Flux converter (_convert_kohya_flux_lora_to_diffusers).
        return flux_to_kohya(state_dict, alpha, self.denoiser)


FAMILY = ChromaFamily
