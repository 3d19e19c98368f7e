"""Flux.2 [dev] (and, through train/models/flux2_klein/family.py, [klein]): rectified-flow matching on patchified, batch-normalised latents.

What the pipelines (``Flux2Pipeline``, ``Flux2KleinPipeline``) feed the transformer, and so what
a training step feeds it:

- latents: the VAE's 2x2-patchified latent (4x the channels, half the side), normalised by the
  VAE's batch-norm running statistics, packed to ``(B, h*w, C)`` tokens; position ids
  ``(t=0, h, w, l=0)`` per token (``_prepare_latent_ids``);
- text: the stacked hidden states of three text-encoder layers (Mistral-3: 10, 20, 30; Qwen3:
  9, 18, 27), padded to ``max_sequence_length``, with no attention mask (the pipelines pass
  none); position ids ``(0, 0, 0, l)`` (``_prepare_text_ids``);
- timestep: the noise level sigma in [0, 1] (the pipelines divide the scheduler's 0-1000
  timestep by 1000; the transformer multiplies by 1000 again);
- guidance: [dev] embeds the guidance value (distilled guidance, ``flow.guidance`` while
  training); [klein] has no guidance embedding (the base models use real CFG at inference).

The target is the velocity ``noise - x0`` of the straight path ``x_t = (1 - s) x0 + s noise``.

Reference images (``image=[...]`` in both pipelines' ``__call__``): each reference's VAE latent
(the posterior's mode, ``sample_mode="argmax"``: the mean, which ``Family.encode_controls`` caches
raw), patchified and batch-normalised as the target is (``_encode_vae_image``), packed, and its
tokens joined after the noisy target's (``prepare_image_latents``), with position ids
``(t=10, 20, ..., h, w, 0)``, one time coordinate per reference (``_prepare_image_ids``). The
transformer's prediction for the reference tokens is dropped (the pipelines keep
``noise_pred[:, :latents.size(1)]``), so the loss is on the target tokens only. The text encoders
never see the references (the prompt embedding is the text-to-image one), and the noise-level shift
counts the target tokens only (``image_seq_len = latents.shape[1]``). The pipelines resize a
reference only above 1 MP and crop it to a multiple of 16; training puts each reference into its
own aspect bucket at the training resolution instead (train/cache.py), as large as the target.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline, compute_empirical_mu

from ...spec import TrainingSpec
from ..base import Batch
from ..flow import FlowMatchFamily, Noised
from ..kohya import _entry, _pairs, fuse

# The step count at which BFL's empirical mu (compute_empirical_mu) has its many-step anchor: there
# mu = 0.5 at 256 image tokens and 1.15 at 4096, linear in between and beyond, which is Flux.1's
# resolution shift. Training samples continuous noise levels, so it takes that limit, not the
# few-step schedules' larger shifts (which compensate for coarse Euler steps).
_MANY_STEPS = 200


class Flux2Family(FlowMatchFamily):
    pipeline_cls: Any = Flux2Pipeline
    denoiser_name = "transformer"

    def __init__(self, spec: TrainingSpec, base_dir: Path):
        super().__init__(spec, base_dir)
        self._ids: dict[tuple[Any, ...], torch.Tensor] = {}
        self._bn: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def load_encoders(self, dtype: torch.dtype) -> None:
        try:
            super().load_encoders(dtype)
        except ImportError as exc:  # FLUX.2 [dev]'s tokenizer folder is a PixtralProcessor
            if "torchvision" not in str(exc).lower():
                raise
            raise ImportError(
                f"{self.base_dir}: this Flux.2 checkpoint's tokenizer is a PixtralProcessor, which "
                "transformers builds only with torchvision installed (pip install torchvision)"
            ) from exc

    # -- caching ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device) -> list[dict[str, torch.Tensor]]:
        embeds, _ = self.pipe.encode_prompt(
            prompt=prompts, device=device, max_sequence_length=self.spec.flow.max_sequence_length
        )
        return [{"prompt_embeds": e.cpu()} for e in embeds]

    # -- training --------------------------------------------------------------------------------
    def _bn_stats(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's batch-norm mean and std per patchified channel, kept on the training device
        (the VAE itself goes back to the CPU after caching)."""
        key = (device, dtype)
        if key not in self._bn:
            vae = self.pipe.vae
            mean = vae.bn.running_mean.detach().float().view(1, -1, 1, 1)
            std = torch.sqrt(
                vae.bn.running_var.detach().float().view(1, -1, 1, 1) + vae.config.batch_norm_eps
            )
            self._bn[key] = (mean.to(device, dtype), std.to(device, dtype))
        return self._bn[key]

    def normalise(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents (B, C, H, W) as the transformer sees them: patchified and batch-normalised,
        as the pipeline's ``_encode_vae_image`` does (and undoes before decoding)."""
        x = self.pipeline_cls._patchify_latents(latents)
        mean, std = self._bn_stats(x.device, x.dtype)
        return (x - mean) / std

    def training_latents(self, batch: Batch) -> torch.Tensor:
        return self.normalise(self.sample_latents(batch))  # (B, 4C, h/2, w/2)

    def image_tokens(self, x0: torch.Tensor) -> int:
        return x0.shape[2] * x0.shape[3]  # already patchified; the target's tokens only

    def auto_shift(self, image_seq_len: int) -> float:
        """``auto`` (as the model was trained, as far as published: BFL released no training code):
        logit-normal sigmas shifted by the pipelines' own resolution-dependent mu in its many-step
        limit, ``compute_empirical_mu(image tokens, 200)``: Flux.1's exponential shift (mu 0.5 at
        256 tokens, 1.15 at 4096), which musubi-tuner's ``flux2_shift`` also trains with."""
        return math.exp(compute_empirical_mu(image_seq_len, _MANY_STEPS))

    def _position_ids(self, kind: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The pipeline's 4-axis position ids (one set; the transformer reads the first batch row),
        kept per shape on the device so a step does not copy them from the host."""
        key = (kind, shape, device)
        if key not in self._ids:
            if kind == "image":
                ids = self.pipeline_cls._prepare_latent_ids(torch.empty(1, 1, *shape))[0]
            else:
                ids = self.pipeline_cls._prepare_text_ids(torch.empty(1, *shape, 1))[0]
            self._ids[key] = ids.to(device)
        return self._ids[key]

    def _reference_tokens(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The reference images' tokens (B, N_ref, 4C) and position ids (N_ref, 4) as
        ``prepare_image_latents`` builds them, or None for a text-to-image batch."""
        if not batch.controls:
            return None
        refs = [self.normalise(c) for c in batch.controls]  # (B, 4C, h_k, w_k) each
        key = ("references", tuple(tuple(r.shape[2:]) for r in refs), refs[0].device)
        if key not in self._ids:  # t = 10, 20, ... per reference (_prepare_image_ids)
            self._ids[key] = self.pipeline_cls._prepare_image_ids([r[:1] for r in refs])[0].to(refs[0].device)
        tokens = torch.cat([self.pipeline_cls._pack_latents(r) for r in refs], dim=1)
        return tokens, self._ids[key]

    def predict(self, model: torch.nn.Module, x: Noised, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = x.latents.shape
        embeds = batch.text["prompt_embeds"]
        tokens = self.pipeline_cls._pack_latents(x.latents)  # (B, h*w, 4C)
        img_ids = self._position_ids("image", (h, w), x.latents.device)
        references = self._reference_tokens(batch)
        if references is not None:  # joined after the target's tokens, as the pipelines do
            tokens = torch.cat([tokens, references[0]], dim=1)
            img_ids = torch.cat([img_ids, references[1]], dim=0)
        guidance = None
        if self.denoiser_config().get("guidance_embeds", True):  # the class default
            guidance = torch.full((b,), self.spec.flow.guidance, device=x.latents.device, dtype=torch.float32)
        pred = model(
            hidden_states=tokens.to(embeds.dtype),
            encoder_hidden_states=embeds,
            timestep=x.sigmas.to(embeds.dtype),
            img_ids=img_ids,
            txt_ids=self._position_ids("text", (embeds.shape[1],), x.latents.device),
            guidance=guidance,
            return_dict=False,
        )[0]
        # the target's tokens; the references' predictions are dropped
        return pred[:, : h * w], self.pipeline_cls._pack_latents(x.target)

    def weight_layout(self, weights: torch.Tensor) -> torch.Tensor:
        """Patchified as the latents are (``normalise`` without its batch norm), then packed."""
        return self.pipeline_cls._pack_latents(self.pipeline_cls._patchify_latents(weights))

    def denoiser_config(self) -> dict[str, Any]:
        if not hasattr(self, "_denoiser_config"):
            self._denoiser_config = super().denoiser_config()
        return self._denoiser_config

    # -- validation and export -----------------------------------------------------------------

    def kohya_state_dict(self, state_dict: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
        return flux2_to_kohya(state_dict, alpha)


# -- kohya / ComfyUI naming -------------------------------------------------------------------------
# The BFL module names that sd-scripts / musubi-tuner write for Flux.2 and that diffusers reads back
# (lora_conversion_utils._convert_kohya_flux2_lora_to_diffusers); ComfyUI maps the same names.
_DOUBLE = {
    "attn.to_out.0": "img_attn_proj",
    "attn.to_add_out": "txt_attn_proj",
    "ff.linear_in": "img_mlp_0",
    "ff.linear_out": "img_mlp_2",
    "ff_context.linear_in": "txt_mlp_0",
    "ff_context.linear_out": "txt_mlp_2",
}
_DOUBLE_FUSED = {
    "img_attn_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
}
_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}  # already fused in diffusers
_GLOBAL = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in_in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in_out_layer",
    "proj_out": "final_layer_linear",
}


def flux2_to_kohya(state_dict: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """The peft LoRA in sd-scripts' Flux.2 names. q/k/v become one fused ``qkv`` LoRA (downs
    stacked, ups on the block diagonal: the same update); parts without LoRA get zero blocks."""
    pairs = _pairs(state_dict)
    out: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    blocks = {int(m.split(".")[1]) for m in pairs if m.startswith("transformer_blocks.")}
    singles = {int(m.split(".")[1]) for m in pairs if m.startswith("single_transformer_blocks.")}
    for i in sorted(blocks):
        prefix = f"transformer_blocks.{i}"
        for name, parts in _DOUBLE_FUSED.items():
            paths = [f"{prefix}.{p}" for p in parts]
            present = [pairs[p] for p in paths if p in pairs]
            if not present:
                continue
            (a, b), rank = present[0], present[0][0].shape[0]
            # q, k and v have the same width (heads x head_dim)
            down, up = fuse([pairs.get(p) for p in paths], [b.shape[0]] * 3, a.shape[1], rank)
            out.update(_entry(f"lora_unet_double_blocks_{i}_{name}", down, up, alpha / rank))
            done.update(paths)
        for sub, name in _DOUBLE.items():
            _plain(pairs, f"{prefix}.{sub}", f"lora_unet_double_blocks_{i}_{name}", alpha, out, done)
    for i in sorted(singles):
        for sub, name in _SINGLE.items():
            path = f"single_transformer_blocks.{i}.{sub}"
            _plain(pairs, path, f"lora_unet_single_blocks_{i}_{name}", alpha, out, done)
    for path, name in _GLOBAL.items():
        _plain(pairs, path, f"lora_unet_{name}", alpha, out, done)
    missing = sorted(set(pairs) - done)
    if missing:
        raise ValueError(
            f"no kohya name for LoRA modules {missing[:5]} (diffusers' Flux.2 kohya loader cannot "
            "read them back); export the diffusers format instead"
        )
    return out


def _plain(
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
    path: str,
    name: str,
    alpha: float,
    out: dict[str, torch.Tensor],
    done: set[str],
) -> None:
    if path in pairs:
        a, b = pairs[path]
        out.update(_entry(name, a, b, alpha / a.shape[0]))
        done.add(path)


FAMILY = Flux2Family
