"""Qwen-Image 2.1 (text-to-image): flow matching in a single-stream block-causal DiT over Qwen3-VL
text states and unpatched latents of a 16x RGBA VAE.

As ``QwenImage21Pipeline.__call__`` does it:

- text: the pipeline's ``encode_prompt`` (its raw chat template, the last decoder layer's state
  before the final norm, the system tokens dropped, each prompt unpadded and the batch padded to
  its longest with a mask, none when nothing is padded) — cached as Qwen-Image's. The transformer
  places every row's images after the *first* row's text slots, so a batch of prompts of different
  lengths is not what a render of one prompt sees: training runs each length apart, unpadded
  (``per_text_length``), as a render of one prompt runs;
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

from pathlib import Path
from typing import Any

import torch
from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import QwenImage21Pipeline, calculate_dimensions

from ...spec import TrainingSpec
from ..base import Batch
from ..flow import Noised, per_text_length
from ..qwen_image.family import NEGATIVE_PROMPT, QwenImageFamily
from ..qwen_image_edit import tiny as _tiny  # noqa: F401  (the tiny pipeline's processor class)
from ..qwen_image_edit.family import QwenImageEditFamily, _mask_of

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
        text = batch.text
        # an edit's condition latents, normalised, go before the target's, each with its own grid
        mean, std = self.latent_stats(x.latents.device)
        controls = [(k - mean) / std for k in batch.controls]
        hidden = torch.cat([*(pack(k, b, c, *k.shape[2:]) for k in controls), pack(x.latents, b, c, h, w)], 1)
        shapes = [*((1, *k.shape[2:]) for k in controls), (1, h, w)]
        timestep = x.sigmas.to(text["prompt_embeds"].dtype)

        def forward(rows: torch.Tensor | slice, length: int) -> torch.Tensor:
            embeds = text["prompt_embeds"][rows, :length]
            n = embeds.shape[0]
            # the text's image slots: the condition images' placeholder tokens (an edit), else none
            pads = text.get("image_pad_mask")
            text_slots = (
                pads[rows, :length].bool()
                if pads is not None
                else torch.zeros(n, length, dtype=torch.bool, device=embeds.device)
            )
            return model(
                hidden_states=hidden[rows].to(embeds.dtype),
                timestep=timestep[rows],
                encoder_hidden_states=embeds,
                encoder_hidden_states_mask=None,  # one length per call: nothing padded
                img_shapes=[shapes] * n,
                img_mask=torch.cat([text_slots, text_slots.new_ones(n, h * w // 4)], dim=1),  # + the target's
                return_dict=False,
            )[0][:, -h * w :]  # the target's tokens: the loss is on them

        # the transformer places every row's images after the first row's text slots, so prompts of
        # different lengths run apart, each unpadded, as the pipeline runs one prompt
        pred = per_text_length(text["prompt_embeds_mask"].sum(dim=1), forward)
        return pred, pack(x.target, b, c, h, w)

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


class QwenImage21EditFamily(QwenImageEditFamily, QwenImage21Family):
    """Qwen-Image 2.1 image-conditioned (``qwen-image-2.1-edit``): Qwen-Image-Edit's per-item text
    cache (the VL reads each prompt with its condition images) on 2.1's sequence, where the
    condition latents go *before* the target's and ``img_mask`` marks the images' placeholder
    tokens among the text (``QwenImage21Pipeline.__call__`` with ``image``):

    - the VL reads each condition image as the pipeline gives it: RGBA (opaque, composited over
      white for the VL), at the training bucket in training, and for a render resized to the
      output's area (``output_resolution``, which the run entry and validation set to the render's
      side) as ``__call__`` resizes it;
    - the VAE encodes the same image, opaque RGBA, one frame, the posterior's mode, normalised with
      the VAE's ``latents_mean`` / ``latents_std``;
    - the loss is on the target's tokens (the last ``h w``); the shift counts the target's.

    diffusers 0.42.1's ``__call__`` takes cached embeddings but not their ``image_pad_mask`` (its
    ``encode_prompt`` does, and refuses cached embeddings with condition images without it), so a
    validation render hands the mask to the pipeline's ``encode_prompt``."""

    pipeline_cls = QwenImage21Pipeline

    def __init__(self, spec: TrainingSpec, base_dir: Path):
        super().__init__(spec, base_dir)
        self._pad_masks: dict[int, torch.Tensor] = {}  # id(embeddings) -> their image_pad_mask

    def vl_images(self, images: list[Any], for_render: bool) -> list[Any]:
        """RGBA, and for a render at the output's area (``calculate_dimensions`` of the validation
        side squared), as ``__call__`` prepares them."""
        rgba = [img.convert("RGBA") for img in images]
        if not for_render:
            return rgba
        side = self.spec.validation.resolution
        assert side, "the spec resolves validation.resolution"
        resized = []
        for img in rgba:
            w, h, _ = calculate_dimensions(side * side, img.size[0] / img.size[1])
            resized.append(self.pipe.image_processor.resize(img, width=w, height=h))
        return resized

    def vl_text(self, prompt: str, images: list[Any], device: torch.device) -> dict[str, torch.Tensor]:
        """As Qwen-Image-Edit's, and which text tokens are the images' placeholders (``img_mask``)."""
        embeds, mask, pads = self.pipe.encode_prompt(prompt=[prompt], image=images, device=device)
        return {
            "prompt_embeds": embeds[0],
            "prompt_embeds_mask": _mask_of(embeds, mask)[0],
            "image_pad_mask": pads[0].long(),
        }

    @torch.no_grad()
    def encode_controls(self, pixels: torch.Tensor) -> torch.Tensor:
        opaque = torch.cat([pixels, torch.ones_like(pixels[:, :1])], dim=1)  # RGBA, alpha 1 in [-1, 1]
        return super().encode_controls(opaque)

    # -- validation ------------------------------------------------------------------------------
    def control_inputs(self, controls: list[Any], size: int) -> dict[str, Any]:
        # the output's aspect is the last image's; the images at the side the cache read them at
        return {**super().control_inputs(controls, size), "image": list(controls), "output_resolution": size}

    @classmethod
    def run_image_inputs(cls, images: list[Any], width: int, height: int, multiple: int) -> dict[str, Any]:
        """Every condition image, resized by the pipeline to the output's area (``output_resolution``,
        1024 by default whatever the output size)."""
        return {"image": list(images), "output_resolution": round((width * height) ** 0.5)}

    def render_inputs(self, text: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
        out = super().render_inputs(text, device)
        if "image_pad_mask" in text:
            length = out["prompt_embeds"].shape[1]
            self._pad_masks[id(out["prompt_embeds"])] = (
                text["image_pad_mask"][None, :length].bool().to(device)
            )
        return out

    def negative_text(self, text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        negative = super().negative_text(text)
        if negative is not None and "negative_image_pad_mask" in text:
            negative["image_pad_mask"] = text["negative_image_pad_mask"]
        return negative

    def render_pipeline(self) -> Any:
        pipe = super().render_pipeline()
        encode, pads = pipe.encode_prompt, self._pad_masks

        def encode_prompt(
            *args: Any, prompt_embeds: Any = None, image_pad_mask: Any = None, **kwargs: Any
        ) -> Any:
            if prompt_embeds is not None and image_pad_mask is None:
                image_pad_mask = pads.get(id(prompt_embeds))
            return encode(*args, prompt_embeds=prompt_embeds, image_pad_mask=image_pad_mask, **kwargs)

        pipe.encode_prompt = encode_prompt
        return pipe


FAMILY = QwenImage21Family
FAMILIES = {"qwen-image-2.1-edit": QwenImage21EditFamily}  # train/models/__init__.py family_class
