"""Flux.2 [klein] (4B and 9B; step-distilled and base): the Flux.2 objective (train/models/flux2/family.py)
with ``Flux2KleinPipeline``'s Qwen3 prompts and no guidance embedding.

The base (undistilled) models render with real classifier-free guidance against the empty prompt
(the pipeline takes no negative prompt of its own), so validation renders pass that prompt's
cached embedding; the distilled ones (``is_distilled``) ignore it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline

from ...spec import TrainingSpec
from ..flux2.family import Flux2Family


class Flux2KleinFamily(Flux2Family):
    pipeline_cls: Any = Flux2KleinPipeline

    def __init__(self, spec: TrainingSpec, base_dir: Path):
        super().__init__(spec, base_dir)
        self.empty_prompt: torch.Tensor | None = None  # the empty caption's embedding, for CFG renders

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device) -> list[dict[str, torch.Tensor]]:
        out = super().encode_prompts(prompts, device)
        if self.empty_prompt is None:  # the cache encodes "" anyway (caption dropout): keep it then
            empty = out[prompts.index("")] if "" in prompts else super().encode_prompts([""], device)[0]
            self.empty_prompt = empty["prompt_embeds"]
        return out

    def render_inputs(self, text: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
        inputs = super().render_inputs(text, device)
        if self.empty_prompt is not None:  # used only where the pipeline runs CFG
            inputs["negative_prompt_embeds"] = self.empty_prompt[None].to(device, self.denoiser_dtype)
        return inputs

    def render_components(self) -> dict[str, Any]:
        # a pipeline built from parts takes is_distilled as an argument (from_pretrained reads model_index)
        return {
            **super().render_components(),
            "is_distilled": bool(self.pipe.config.get("is_distilled", False)),
        }


FAMILY = Flux2KleinFamily
