"""Qwen-Image-Edit and Qwen-Image-Edit-2509 ("Edit Plus"): Qwen-Image's objective, conditioned on
control images twice over, as ``QwenImageEditPipeline.__call__`` / ``QwenImageEditPlusPipeline.__call__``
(diffusers 0.42.1 pipelines/qwenimage/pipeline_qwenimage_edit{,_plus}.py) feed the transformer:

- text: Qwen2.5-VL reads the control image(s) with the instruction (the pipeline's
  ``encode_prompt(prompt, image=...)``: its edit template, the 64 system-prompt tokens dropped), so
  every cached text belongs to one item. Edit's VL reads the very image its VAE encodes: the
  training item's control in its bucket, or for a render the control at ~1 MP as ``__call__``
  resizes it. Edit Plus's VL reads each control at ~384x384 (``CONDITION_IMAGE_SIZE``, "Picture 1:
  ..." per image) whatever the output size, so a training item's controls are resized to that area
  too: the VL sees in training what it sees at inference;
- control latents: the VAE posterior's mode of the one-frame video (``sample_mode="argmax"``),
  normalised with the VAE's ``latents_mean`` / ``latents_std``, packed 2x2 and appended after the
  target's tokens; ``img_shapes`` per sample = the target's (1, h/2, w/2), then one per control;
- the noise levels follow the target's token count alone (the pipeline's ``mu`` reads
  ``latents.shape[1]``, without the controls) and the loss is taken on the target tokens only
  (the pipeline keeps ``noise_pred[:, :latents.size(1)]``).

Cached prompts are padded to ``flow.max_sequence_length`` plus the control's image tokens (the
pipeline does not truncate; the cache keeps every caption up to that many tokens) and trimmed per
batch to the longest, as Qwen-Image's are. Validation renders run the stock pipeline with the
control as ``image``; their cached text holds the negative prompt (" ") embedded with the same
control, as ``__call__`` embeds it for ``true_cfg_scale``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import QwenImageEditPipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
    CONDITION_IMAGE_SIZE,
    VAE_IMAGE_SIZE,
    QwenImageEditPlusPipeline,
    calculate_dimensions,
)

from ...families import model_info
from ...spec import TrainingSpec
from ..base import edit_size
from ..qwen_image.family import NEGATIVE_PROMPT, QwenImageFamily, pad_to
from . import tiny as _tiny  # noqa: F401  (the tiny pipelines' processor, see below)

# The tiny pipelines record their processor as train.models.qwen_image_edit.tiny.TinyQwen2VLProcessor;
# diffusers loads a component from a module outside diffusers / transformers only once that module
# is imported, hence the import above.
TEXT_KEYS = ("prompt_embeds", "prompt_embeds_mask")
# template tokens around each image (Plus: "Picture N: " and the vision start / end) and after the
# prompt, rounded up: the padded length only has to hold every item of a batch
_PER_IMAGE_TOKENS, _TAIL_TOKENS = 16, 16


def _mask_of(embeds: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The pipeline's text mask, made whole where it dropped an all-ones one (returned None)."""
    return torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device) if mask is None else mask


class QwenImageEditFamily(QwenImageFamily):
    """Qwen-Image-Edit; Edit Plus is the subclass below (``FAMILIES``). How many controls a sample
    takes is the registry's word."""

    pipeline_cls: Any = QwenImageEditPipeline
    text_reads_controls = True

    def __init__(self, spec: TrainingSpec, base_dir: Path):
        super().__init__(spec, base_dir)
        info = model_info(spec.model)
        assert self.pipeline_cls.__name__ == info.pipeline, (type(self).__name__, info.pipeline)
        self.plus = self.pipeline_cls is QwenImageEditPlusPipeline
        self.max_controls = info.max_controls

    def load_encoders(self, dtype: torch.dtype) -> None:
        try:
            super().load_encoders(dtype)
        except (ImportError, ValueError) as exc:  # the published repos' processor is a Qwen2VLProcessor
            if "torchvision" not in str(exc).lower():
                raise
            raise ImportError(
                f"{self.base_dir}: this checkpoint's processor is a Qwen2VLProcessor, which transformers "
                "loads only with torchvision installed (pip install torchvision)"
            ) from exc

    # -- caching ---------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str], device: torch.device) -> list[dict[str, torch.Tensor]]:
        """No edit prompt exists without its control image: the Edit template holds an image
        placeholder (the pipeline's processor refuses it without an image), and the cache reads
        every prompt with its controls (``text_reads_controls``)."""
        raise NotImplementedError(
            f"{self.spec.model} reads each prompt with its control image: encode_prompts_with_controls"
        )

    @torch.no_grad()
    def encode_prompts_with_controls(
        self, prompts: list[str], controls: list[list[Any]], device: torch.device, *, for_render: bool
    ) -> list[dict[str, torch.Tensor]]:
        """One text dict per prompt, read by the VL with that prompt's controls; ``for_render``
        dicts also hold the negative prompt's (``negative_prompt_embeds`` / ``_mask``)."""
        out = []
        for prompt, images in zip(prompts, controls, strict=True):
            assert 0 < len(images) <= self.max_controls, f"{len(images)} controls for {self.spec.model}"
            seen = self.vl_images(images, for_render)
            item = self._encode_one(prompt, seen, device)
            if for_render:
                negative = self._encode_one(NEGATIVE_PROMPT, seen, device)
                item.update({f"negative_{k}": v for k, v in negative.items()})
            out.append(item)
        return out

    def vl_images(self, images: list[Any], for_render: bool) -> list[Any]:
        """The control images as the pipeline's ``encode_prompt`` gets them: Edit, at ~1 MP for a
        render (``calculate_dimensions(1024 * 1024, ratio)``), else as given (the training bucket);
        Plus, each at ~384x384 (``CONDITION_IMAGE_SIZE``)."""
        if not (self.plus or for_render):
            return list(images)
        area = CONDITION_IMAGE_SIZE if self.plus else VAE_IMAGE_SIZE  # Edit's __call__: 1024 * 1024
        resized = []
        for img in images:
            w, h = calculate_dimensions(area, img.size[0] / img.size[1])  # Edit's: the same sizes
            resized.append(self.pipe.image_processor.resize(img, h, w))
        return resized

    def _encode_one(self, prompt: str, images: list[Any], device: torch.device) -> dict[str, torch.Tensor]:
        length = self.text_length + _TAIL_TOKENS + sum(self._image_tokens(img) for img in images)
        return {k: pad_to(v, length).cpu() for k, v in self.vl_text(prompt, images, device).items()}

    def vl_text(self, prompt: str, images: list[Any], device: torch.device) -> dict[str, torch.Tensor]:
        """The pipeline's ``encode_prompt`` of one prompt read with its images, each tensor without
        its batch axis: the embeddings and their mask."""
        # Edit's pipeline passes its one image itself, Plus's the list
        embeds, mask = self.pipe.encode_prompt(
            prompt=[prompt], image=images if self.plus else images[0], device=device
        )
        return {"prompt_embeds": embeds[0], "prompt_embeds_mask": _mask_of(embeds, mask)[0]}

    def _image_tokens(self, image: Any) -> int:
        """The VL tokens one image takes (its placeholder run as the processor expands it) and the
        template tokens around it."""
        processor = self.pipe.processor.image_processor
        patches = processor.get_number_of_image_patches(image.size[1], image.size[0], {})
        return patches // processor.merge_size**2 + _PER_IMAGE_TOKENS

    @torch.no_grad()
    def encode_controls(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, C, h, w): the posterior's mode of the one-frame video, as
        the pipeline's ``_encode_vae_image`` takes it (normalised later, in the loss)."""
        vae = self.pipe.vae
        dist = vae.encode(pixels.to(vae.device, vae.dtype)[:, :, None]).latent_dist
        return dist.mode()[:, :, 0].float()

    # -- training --------------------------------------------------------------------------------
    # ``loss`` is Qwen-Image's: it appends ``batch.controls`` after the target's tokens.

    # -- validation ------------------------------------------------------------------------------
    def control_inputs(self, controls: list[Any], size: int) -> dict[str, Any]:
        """As the base class's, with the output at the *last* control's aspect ratio: the one Edit
        Plus's ``__call__`` sizes its output by (``image[-1].size``) when given no height / width."""
        assert controls, f"{self.spec.model} renders edit an image: pass its control image(s)"
        last = controls[-1]
        width, height = edit_size(last.width, last.height, size, self.pixel_multiple())
        return {"image": list(controls) if self.plus else controls[0], "height": height, "width": width}

    def negative_text(self, text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """The negative prompt " " read with the render's own control (``for_render`` caches it
        next to the prompt's, as ``__call__`` embeds it)."""
        negative = {k: text[f"negative_{k}"] for k in TEXT_KEYS if f"negative_{k}" in text}
        return negative or None


class QwenImageEditPlusFamily(QwenImageEditFamily):
    """Qwen-Image-Edit-2509: up to three controls, each read by the VL at ~384 x 384."""

    pipeline_cls: Any = QwenImageEditPlusPipeline


FAMILY = QwenImageEditFamily
FAMILIES = {  # train/models/__init__/family.py family_class
    "qwen-image-edit-plus": QwenImageEditPlusFamily,
    "qwen-image-edit-2511": QwenImageEditPlusFamily,
}
