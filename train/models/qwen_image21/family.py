"""Qwen-Image 2.1 (text-to-image): flow matching in a single-stream block-causal DiT over Qwen3-VL
text states and unpatched latents of a 16x RGBA VAE.

As ``QwenImage21Pipeline.__call__`` does it:

- text: the pipeline's ``encode_prompt`` (its raw chat template, the last decoder layer's state
  before the final norm, the system tokens dropped, each prompt unpadded and the batch padded to
  its longest with a mask, none when nothing is padded) — cached, padded and trimmed as Qwen-Image's;
- latents: the VAE posterior of one RGBA frame — the training images are opaque, alpha 1, as the
  pipeline makes an RGB image RGBA — normalised per channel with ``latents_mean`` /
  ``latents_std``, flattened to ``(h w, C)`` tokens (no patches); ``img_shapes`` = (1, h, w);
- ``img_mask`` marks the text encoder's image slots (none in text-to-image) and then one slot per
  2x2 group of target tokens, as the pipeline appends them;
- noise and target: ``x_s = (1 - s) x0 + s noise``, the transformer predicts ``noise - x0`` for
  the target tokens (the last ``h w``), its ``timestep`` is the sigma (the pipeline feeds
  ``t / 1000``).

``timestep_sampling: auto`` is logit-normal sigmas moved by the scheduler's shift at the image's
``h w`` tokens (the pipeline's ``mu`` counts unpatched latents).

Guidance: Qwen's default is none; ``true_cfg_scale`` > 1 with a negative prompt turns CFG on.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import QwenImage21Pipeline

from ..base import Batch
from ..flow import Noised
from ..qwen_image.family import NEGATIVE_PROMPT, QwenImageFamily
from ..qwen_image_edit import tiny as _tiny  # noqa: F401  (the tiny pipeline's processor class)

# The tiny pipeline records its processor as train.models.qwen_image_edit.tiny.TinyQwen2VLProcessor,
# which diffusers loads only from an imported module, hence the import above.

pack = QwenImage21Pipeline._pack_latents  # (B, C, h, w) -> (B, h w, C)


class QwenImage21Family(QwenImageFamily):
    """Qwen-Image's text cache and latent normalisation; 2.1's VAE input, tokens and transformer call."""

    pipeline_cls = QwenImage21Pipeline

    # -- caching ---------------------------------------------------------------------------------
    def pipeline_text(
        self, prompts: list[str], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # 2.1's takes prompts whole (no max_sequence_length) and returns the image slots too: none here
        embeds, mask, _ = self.pipe.encode_prompt(prompt=prompts, device=device)
        return embeds, mask

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        opaque = torch.cat([pixels, torch.ones_like(pixels[:, :1])], dim=1)  # RGBA, alpha 1 in [-1, 1]
        return super().encode_images(opaque)

    # -- training --------------------------------------------------------------------------------
    def image_tokens(self, x0: torch.Tensor) -> int:
        return x0.shape[2] * x0.shape[3]  # unpatched: the pipeline's mu counts every latent pixel

    def predict(self, model: torch.nn.Module, x: Noised, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.latents.shape
        embeds, mask = self.trimmed(batch.text)
        slots = torch.ones(b, embeds.shape[1] + h * w // 4, dtype=torch.bool, device=embeds.device)
        slots[:, : embeds.shape[1]] = False  # no image among the text: text-to-image
        pred = model(
            hidden_states=pack(x.latents, b, c, h, w).to(embeds.dtype),
            timestep=x.sigmas.to(embeds.dtype),
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=mask,
            img_shapes=[[(1, h, w)]] * b,
            img_mask=slots,
            return_dict=False,
        )[0]
        return pred[:, -h * w :], pack(x.target, b, c, h, w)

    def weight_layout(self, weights: torch.Tensor) -> torch.Tensor:
        return pack(weights, *weights.shape)

    # -- validation and export -----------------------------------------------------------------
    def render_components(self) -> dict[str, Any]:
        # the pipeline counts the system tokens it drops with the processor's chat template when it
        # is built, so a render from cached prompts keeps the processor (a tokenizer, no weights)
        return {**super().render_components(), "processor": self.pipe.processor}

    def kohya_state_dict(self, state_dict: dict[str, torch.Tensor], alpha: float) -> None:
        return None  # no ComfyUI naming checked for 2.1 yet: its diffusers file only

    @classmethod
    def guidance_kwargs(cls, guidance: float, negative_prompt: str) -> dict[str, Any]:
        """CFG only above 1, with a negative prompt (the model card's " " if none is given); at 1 no
        negative prompt, which the pipeline would warn about."""
        if guidance <= 1:
            return {"true_cfg_scale": guidance}
        return {"true_cfg_scale": guidance, "negative_prompt": negative_prompt or NEGATIVE_PROMPT}


FAMILY = QwenImage21Family
