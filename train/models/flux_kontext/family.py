"""FLUX.1 Kontext [dev]: Flux.1-dev's rectified flow with the control image's tokens in the sequence.

As ``FluxKontextPipeline.__call__`` feeds the transformer (diffusers 0.42.1,
pipelines/flux/pipeline_flux_kontext.py): the control image's latents — the VAE posterior's mode,
``(z - shift_factor) * scaling_factor`` (``_encode_vae_image``), packed 2x2 — follow the noisy
target's tokens (``torch.cat([latents, image_latents], dim=1)``); their position ids are the
target grid's with a first coordinate of 1 (``image_ids[..., 0] = 1``); the prediction for the
control tokens is dropped (``noise_pred[:, : latents.size(1)]``), so the loss is on the target
tokens only. Everything else — sigmas (the resolution shift counts the target tokens, as the
pipeline's ``image_seq_len``), ``timestep = sigma``, the guidance embedding, the text — is
Flux.1-dev's, so the family is ``FluxFamily`` with a denoiser that also sees the control.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers.pipelines.flux.pipeline_flux_kontext import (
    PREFERRED_KONTEXT_RESOLUTIONS,
    FluxKontextPipeline,
)

from ...buckets import place, resize_and_crop
from ...spec import TrainingSpec
from ..base import Batch
from ..flux.family import FluxFamily

# Kontext was trained at about 1 MP, at these sizes; renders of about that area take the stock path.
_NATIVE_AREAS = [w * h for w, h in PREFERRED_KONTEXT_RESOLUTIONS]


class WithControl(torch.nn.Module):
    """The denoiser called as the Kontext pipeline calls it: the control image's tokens (and their
    position ids) after the target's; it returns the prediction for the target tokens only."""

    def __init__(self, denoiser: torch.nn.Module, tokens: torch.Tensor, ids: torch.Tensor):
        super().__init__()
        self.denoiser, self.tokens, self.ids = denoiser, tokens, ids

    def forward(
        self, hidden_states: torch.Tensor, img_ids: torch.Tensor, **kwargs: Any
    ) -> tuple[torch.Tensor]:
        n_target = hidden_states.shape[1]
        pred = self.denoiser(
            hidden_states=torch.cat([hidden_states, self.tokens], dim=1),  # (B, n_target + n_control, 4C)
            img_ids=torch.cat([img_ids, self.ids], dim=0),  # dim 0: the sequence
            **kwargs,
        )[0]
        return (pred[:, :n_target],)


class FluxKontextFamily(FluxFamily):
    pipeline_cls = FluxKontextPipeline

    def __init__(self, spec: TrainingSpec, base_dir: Path):
        super().__init__(spec, base_dir)
        self._control_ids_cache: dict[tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}

    # -- training --------------------------------------------------------------------------------
    # ``encode_controls`` is the base class's: the posterior mean, which is the mode the pipeline
    # takes (``retrieve_latents(..., sample_mode="argmax")``); the loss normalises it.
    def control_tokens(self, batch: Batch, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed control tokens (B, n, 4C) and their position ids (n, 3), as ``prepare_latents``
        builds ``image_latents`` / ``image_ids``."""
        assert len(batch.controls) == 1, f"FLUX.1 Kontext takes one control image, not {len(batch.controls)}"
        vae_cfg = self.pipe.vae.config
        x = (batch.controls[0] - vae_cfg.shift_factor) * vae_cfg.scaling_factor  # (B, C, h, w)
        b, c, h, w = x.shape
        key = (h // 2, w // 2, x.device, dtype)
        if key not in self._control_ids_cache:  # built once per shape (see FluxFamily._image_ids)
            ids = FluxKontextPipeline._prepare_latent_image_ids(1, h // 2, w // 2, x.device, dtype)
            ids[..., 0] = 1
            self._control_ids_cache[key] = ids
        return FluxKontextPipeline._pack_latents(x, b, c, h, w).to(dtype), self._control_ids_cache[key]

    def prediction(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if not batch.controls:  # the pipeline without an input image: FLUX.1-dev's text-to-image
            return super().prediction(model, batch)
        tokens, ids = self.control_tokens(batch, batch.text["prompt_embeds"].dtype)
        return super().prediction(WithControl(model, tokens, ids), batch)

    # -- validation and export -----------------------------------------------------------------
    def control_inputs(self, controls: list[Any], size: int) -> dict[str, Any]:
        """The pipeline's image arguments for a render of about ``size`` x ``size`` pixels. The output
        always takes the control's own size: Kontext's control ids share the target's grid (1, row,
        col), so a control of another size would be read shifted / scaled against the output.

        At Kontext's native ~1 MP the stock path: the pipeline snaps the control to the nearest of
        ``PREFERRED_KONTEXT_RESOLUTIONS`` (``_auto_resize``, also what diffusers and ComfyUI users get).
        At other sizes (LoRA previews at 512, the tiny tests' 64 px) that snap would blow the control
        up to 1 MP — up to 256x the output's tokens, and not what the LoRA was trained on — so the
        control is resized into its own bucket at ``size`` exactly as the cache places training
        controls, and the pipeline keeps it (``_auto_resize=False``). ``max_area`` is the output's
        area, so the pipeline's own rescaling (``width = sqrt(max_area * aspect)``) keeps that size.
        """
        if not controls:  # a text-only render: the pipeline would otherwise rescale to 1024^2
            return {"height": size, "width": size, "max_area": size * size}
        assert len(controls) == 1, f"FLUX.1 Kontext takes one control image, not {len(controls)}"
        control = controls[0].convert("RGB")
        m = self.pixel_multiple()
        if _native(size * size):
            # the pipeline's own choice (its aspect from the control floored to the multiple)
            aspect = max(m, control.width // m * m) / max(m, control.height // m * m)
            _, width, height = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
            image, auto = control, True
        else:
            placement = place(control.width, control.height, [size], m)[0]
            (width, height), auto = placement.bucket, False
            image = resize_and_crop(control, placement)
        return {
            "image": image,
            "height": height,
            "width": width,
            "max_area": width * height,
            "_auto_resize": auto,
        }

    @classmethod
    def run_image_inputs(cls, images: list[Any], width: int, height: int, multiple: int) -> dict[str, Any]:
        """The run entry's image arguments for a ``width`` x ``height`` render: ``max_area`` is that
        area (the pipeline rescales every render to ``max_area``, 1024^2 unless told); near 1 MP the
        pipeline snaps the image to its preferred size (``_auto_resize``), at other sizes the image
        goes into its own bucket at the render's size, as ``control_inputs`` places it."""
        if len(images) != 1:
            raise ValueError(f"FLUX.1 Kontext takes one input image, not {len(images)}")
        control = images[0].convert("RGB")
        if _native(width * height):
            return {"image": control, "max_area": width * height, "_auto_resize": True}
        placement = place(control.width, control.height, [round((width * height) ** 0.5)], multiple)[0]
        return {
            "image": resize_and_crop(control, placement),
            "max_area": width * height,
            "_auto_resize": False,
        }


def _native(area: int) -> bool:
    """``area`` is about Kontext's native ~1 MP (within 10 % of its preferred sizes)."""
    return min(_NATIVE_AREAS) * 0.9 <= area <= max(_NATIVE_AREAS) * 1.1


FAMILY = FluxKontextFamily
