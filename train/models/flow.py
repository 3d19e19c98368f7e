"""Rectified-flow matching, the objective every transformer family here trains with.

``FlowMatchFamily.prediction`` is the one copy of the preamble: the latent as the denoiser sees it
(``training_latents``), noise, a noise level per item (``sample_sigmas``), the straight path
``x_s = (1 - s) x0 + s noise`` and its velocity ``noise - x0``. A family says only what differs:
how it normalises latents, how many image tokens the resolution shift counts, and how its pipeline
calls the denoiser (``predict``: packing, position ids, masks, the timestep convention).

Noise levels follow ``spec.flow.timestep_sampling``:

- ``uniform``: ``s ~ U(0, 1)``; ``logit_normal``: ``s = sigmoid(N(logit_mean, logit_std))``;
- ``shift``: logit-normal moved by a constant shift ``s u / (1 + (s - 1) u)`` (SD3 paper, eq. 23):
  ``flow.shift``, else the base model's scheduler config's ``shift``;
- ``auto``: as the family was trained: its draw (``auto_draw``, logit-normal unless the family
  says otherwise) moved by its shift at this many image tokens (``auto_shift``: the scheduler's
  resolution-dependent shift ``exp(mu)`` where it shifts dynamically, else its fixed ``shift``),
  or by ``flow.shift`` when given.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

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


def per_text_length(
    lengths: torch.Tensor, forward: Callable[[torch.Tensor | slice, int], torch.Tensor]
) -> torch.Tensor:
    """``forward(rows, length)`` once per group of batch rows whose prompts have one length, the
    outputs put back in batch order (one call on every row, ``rows`` a plain slice, when they all
    share it). For a denoiser that takes
    no text mask, or reads its layout from the first row (FLUX.3, Qwen-Image 2.1), a prompt
    padded to a longer one's length would be conditioned otherwise than the pipeline conditions
    it, which encodes one prompt at a time."""
    values = lengths.tolist()  # one host sync
    if len(set(values)) == 1:
        return forward(slice(None), int(values[0]))
    order, parts = [], []
    for length in sorted(set(values)):
        rows = [i for i, v in enumerate(values) if v == length]
        order += rows
        parts.append(forward(torch.tensor(rows, device=lengths.device), int(length)))
    out = torch.cat(parts)
    return out[torch.tensor(order, device=out.device).argsort()]


@dataclass(frozen=True)
class Noised:
    """One training step's draw on the straight path: ``latents``, ``x_s = (1 - s) x0 + s noise``
    (B, C, h, w); their noise levels ``sigmas``, ``s`` (B,); and ``target``, the velocity
    ``noise - x0`` (B, C, h, w)."""

    latents: torch.Tensor
    sigmas: torch.Tensor
    target: torch.Tensor


class FlowMatchFamily(Family):
    """A family trained by flow matching; subclasses implement ``predict`` (and the hooks below
    where they differ)."""

    def prediction(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = self.training_latents(batch)  # (B, C, h, w) in the space the denoiser works in
        noise = batch.rng.randn(*x0.shape[1:])
        sigmas = self.sample_sigmas(batch.rng, self.image_tokens(x0))  # (B,) in (0, 1)
        s = sigmas.view(-1, *([1] * (x0.dim() - 1)))  # (B, C, h, w), or (B, C, f, h, w) for video
        noised = Noised((1.0 - s) * x0 + s * noise, sigmas, noise - x0)  # from data (s=0) to noise (s=1)
        return self.predict(model, noised, batch)

    @property
    def text_length(self) -> int:
        """Prompt tokens the cache keeps (``flow.max_sequence_length``, resolved from the registry)."""
        length = self.spec.flow.max_sequence_length
        assert length is not None, "the spec resolves flow.max_sequence_length from the registry"
        return length

    # -- what a family may override ---------------------------------------------------------------
    def training_latents(self, batch: Batch) -> torch.Tensor:
        """A latent drawn from the cached posterior, normalised as the pipeline normalises before
        denoising (default: the KL VAE's ``(z - shift_factor) * scaling_factor``)."""
        cfg = self.pipe.vae.config
        return (self.sample_latents(batch) - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor

    def image_tokens(self, x0: torch.Tensor) -> int:
        """Image tokens of the target, which the resolution-dependent shift counts (default: 2x2
        patches of the latent)."""
        return (x0.shape[2] // 2) * (x0.shape[3] // 2)

    @abstractmethod
    def predict(self, model: torch.nn.Module, x: Noised, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The denoiser's prediction for ``x.latents`` at ``x.sigmas``, called as the pipeline calls
        it, and ``x.target`` in the same layout (packed, trimmed to the target's tokens)."""

    def auto_draw(self, rng: BatchRandom) -> torch.Tensor:
        """The unshifted noise levels ``auto`` starts from (default: logit-normal)."""
        opts = self.spec.flow
        return torch.sigmoid(rng.randn() * opts.logit_std + opts.logit_mean)

    def auto_shift(self, image_seq_len: int) -> float:
        """The shift ``auto`` applies at this many image tokens (default: the scheduler's)."""
        return scheduler_shift(self.pipe.scheduler.config, image_seq_len)

    # -- noise levels -------------------------------------------------------------------------------
    def sample_sigmas(self, rng: BatchRandom, image_seq_len: int) -> torch.Tensor:
        """Noise levels in (0, 1) as ``spec.flow.timestep_sampling`` says (module docstring)."""
        opts = self.spec.flow
        if opts.timestep_sampling == "uniform":
            return rng.rand()
        if opts.timestep_sampling == "auto":
            shift = opts.shift if opts.shift is not None else self.auto_shift(image_seq_len)
            return shifted(self.auto_draw(rng), shift)
        u = torch.sigmoid(rng.randn() * opts.logit_std + opts.logit_mean)
        if opts.timestep_sampling == "logit_normal":
            return u
        shift = opts.shift if opts.shift is not None else self.scheduler_fixed_shift()
        return shifted(u, shift)

    def scheduler_fixed_shift(self) -> float:
        """The base model's scheduler's fixed shift (``shift``; a UniPC flow scheduler's ``flow_shift``)."""
        config = self.pipe.scheduler.config
        return float(config.get("shift", config.get("flow_shift", 1.0)))
