"""Z-Image (turbo and base): flow matching in the single-stream S3-DiT, Qwen3 text.

As ``ZImagePipeline.__call__`` does it:

- text: the pipeline's ``encode_prompt`` (Qwen3's chat template, the second-to-last hidden state,
  only the tokens the attention mask keeps: one variable-length tensor per prompt). The cache pads
  each to ``flow.max_sequence_length`` and keeps the mask; the loss hands the transformer the
  unpadded tensors, as the pipeline does (it pads them to multiples of 32 itself);
- latents: the KL VAE's posterior, ``(z - shift_factor) * scaling_factor``, one frame each
  (``(C, 1, h, w)``, a list per batch) — the transformer patchifies 2x2 itself;
- the convention is flipped: the transformer's time is ``1 - sigma`` (the pipeline feeds
  ``(1000 - t) / 1000``) and its output is the negated velocity, ``x0 - noise`` (the pipeline
  steps with ``-output``). With ``x_s = (1 - s) x0 + s noise`` the loss is that output against
  ``x0 - noise``.

``timestep_sampling: auto`` is logit-normal sigmas moved by the base model's scheduler shift
(fixed: ``use_dynamic_shifting`` is off in both repos, so the pipeline's resolution ``mu`` has no
effect and every size denoises with ``shift``), the noise levels the pipeline renders at.

Classifier-free guidance (base) is the pipeline's ``guidance_scale`` against the empty negative
prompt it defaults to; turbo renders with guidance 0 (distilled, no CFG).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline

from ..base import Batch
from ..flow import FlowMatchFamily, Noised
from ..kohya import sdxl_to_kohya
from ..qwen_image.family import pad_to

NEGATIVE_PROMPT = ""  # what the pipeline encodes when CFG is on and no negative prompt is given


class ZImageFamily(FlowMatchFamily):
    pipeline_cls = ZImagePipeline
    denoiser_name = "transformer"

    # -- caching ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device) -> list[dict[str, torch.Tensor]]:
        length = self.spec.flow.max_sequence_length
        assert length is not None, "the spec resolves flow.max_sequence_length from the registry"

        def encode(batch: list[str]) -> list[dict[str, torch.Tensor]]:
            embeds, _ = self.pipe.encode_prompt(
                prompt=batch, device=device, do_classifier_free_guidance=False, max_sequence_length=length
            )
            # each (tokens kept by the mask, D): padded, with the mask that keeps them
            return [
                {"prompt_embeds": pad_to(e, length).cpu(), "prompt_mask": torch.arange(length) < e.shape[0]}
                for e in embeds
            ]

        return self.encode_keeping_negative(list(prompts), encode, NEGATIVE_PROMPT)

    # -- training --------------------------------------------------------------------------------
    @staticmethod
    def caption_list(text: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The cached prompts as the pipeline's ``encode_prompt`` returns them: unpadded, one each."""
        return [e[m] for e, m in zip(text["prompt_embeds"], text["prompt_mask"], strict=True)]

    def predict(self, model: torch.nn.Module, x: Noised, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = batch.text["prompt_embeds"].dtype
        out = model(
            list(x.latents.to(dtype).unsqueeze(2).unbind(dim=0)),  # (C, 1 frame, h, w) each
            1.0 - x.sigmas.float(),  # the transformer's time runs from noise (0) to data (1)
            self.caption_list(batch.text),
            return_dict=False,
        )[0]
        return -torch.stack(out).squeeze(2), x.target  # it predicts the negated velocity, x0 - noise

    # -- validation and export -----------------------------------------------------------------
    def render_inputs(self, text: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
        # the negative prompt goes along always: the pipeline uses it only when guidance_scale > 0
        dtype = self.denoiser_dtype
        out = {
            "prompt_embeds": [
                e.to(device, dtype) for e in self.caption_list({k: v[None] for k, v in text.items()})
            ]
        }
        if self.negative is not None:
            negative = {k: v[None] for k, v in self.negative.items()}
            out["negative_prompt_embeds"] = [e.to(device, dtype) for e in self.caption_list(negative)]
        return out

    def kohya_state_dict(self, state_dict: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
        # musubi-tuner's Z-Image LoRA names: ``lora_unet_`` + the diffusers module path with ``_``
        # for ``.`` (``lora_unet_layers_0_attention_to_q``); diffusers reads them back with
        # _convert_non_diffusers_z_image_lora_to_diffusers. The SDXL writer makes exactly that name.
        return sdxl_to_kohya(state_dict, alpha)


FAMILY = ZImageFamily
