"""HiDream-I1: flow matching in a sparse (MoE) DiT with four text encoders.

As ``HiDreamImagePipeline.__call__`` does it:

- text: the pipeline's ``encode_prompt`` — the two CLIPs' pooled projections (concatenated), T5's
  last state and every Llama layer's state, stacked ``(layers, L, D)`` per prompt, each padded to
  ``flow.max_sequence_length``; the transformer reads the Llama layer its config names per block;
- latents: the KL VAE's ``(z - shift_factor) * scaling_factor``, unpacked — the transformer
  patchifies 2x2 itself (padding a non-square image to its ``max_seq`` tokens with a mask);
- the transformer's ``timesteps`` are ``1000 s`` and its output is the negated velocity (the
  pipeline steps with ``-output``), so the loss compares ``-output`` with ``noise - x0``.
- In training mode diffusers' HiDream transformer routes its experts differentiably (its eval path
  is ``no_grad``) and returns its patches unassembled, ``(B, C, tokens, 4)``; ``predict`` puts them
  back in the image layout the pipeline gets in eval mode.

``timestep_sampling: auto`` is logit-normal sigmas moved by the scheduler's fixed shift (Full:
UniPC's ``flow_shift`` 3; Dev 6 and Fast 3: the LCM scheduler's ``shift``), the noise levels the
pipeline renders at.

Classifier-free guidance (Full) is the pipeline's ``guidance_scale`` (on above 1) against the
empty negative prompt it defaults to; Dev and Fast are distilled and render without it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from diffusers.pipelines.hidream_image.pipeline_hidream_image import HiDreamImagePipeline

from ..base import Batch
from ..flow import FlowMatchFamily, Noised
from ..kohya import diffusion_model_lora

NEGATIVE_PROMPT = ""  # what the pipeline encodes when CFG is on and no negative prompt is given
# Where the Llama text encoder loads from when the base folder lacks text_encoder_4/ (HiDream-ai's
# repos do): a gated repo, fetched with HF_TOKEN, or a folder of that name under weights/.
LLAMA_WEIGHTS = "meta-llama/Llama-3.1-8B-Instruct"
TEXT_KEYS = ("prompt_embeds_t5", "prompt_embeds_llama3", "pooled_prompt_embeds")


def image_layout(out: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """The transformer's training-mode output ``(B, C, tokens, p * p)`` (tokens padded to its
    ``max_seq`` for a non-square image) as the ``(B, C, h, w)`` latent its eval mode returns."""
    b, c = out.shape[:2]
    ph, pw = h // p, w // p
    return out[:, :, : ph * pw].reshape(b, c, ph, pw, p, p).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w)


class HiDreamFamily(FlowMatchFamily):
    pipeline_cls = HiDreamImagePipeline
    denoiser_name = "transformer"

    @classmethod
    def components_from_elsewhere(cls, folder: Path, dtype: torch.dtype) -> dict[str, Any]:
        if (Path(folder) / "text_encoder_4" / "config.json").is_file():
            return {}
        from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

        from ...weights import resolve_model_folder

        llama = resolve_model_folder(LLAMA_WEIGHTS, "text_encoder_4 (HiDream's Llama)")
        return {
            "tokenizer_4": PreTrainedTokenizerFast.from_pretrained(llama),
            "text_encoder_4": LlamaForCausalLM.from_pretrained(
                llama, output_hidden_states=True, output_attentions=True, dtype=dtype
            ),
        }

    # -- caching ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device) -> list[dict[str, torch.Tensor]]:
        def encode(batch: list[str]) -> list[dict[str, torch.Tensor]]:
            t5, _, llama, _, pooled, _ = self.pipe.encode_prompt(
                prompt=batch,
                device=device,
                do_classifier_free_guidance=False,
                max_sequence_length=self.text_length,
            )
            return [
                dict(zip(TEXT_KEYS, (t5[i].cpu(), llama[:, i].cpu(), pooled[i].cpu()), strict=True))
                for i in range(len(batch))
            ]

        return self.encode_keeping_negative(list(prompts), encode, NEGATIVE_PROMPT)

    # -- training --------------------------------------------------------------------------------
    @classmethod
    def pixel_multiple_of(cls, vae_scale_factor: int, denoiser_config: dict[str, Any]) -> int:
        return vae_scale_factor * denoiser_config.get("patch_size", 2)  # the transformer's own patches

    def auto_shift(self, image_seq_len: int) -> float:
        return self.scheduler_fixed_shift()  # both schedulers shift by a fixed amount at every size

    def predict(self, model: torch.nn.Module, x: Noised, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        text = batch.text
        pooled = text["pooled_prompt_embeds"]
        out = model(
            hidden_states=x.latents.to(pooled.dtype),
            timesteps=x.sigmas.float() * 1000,
            encoder_hidden_states_t5=text["prompt_embeds_t5"],
            encoder_hidden_states_llama3=text["prompt_embeds_llama3"].transpose(0, 1),  # (layers, B, L, D)
            pooled_embeds=pooled,
            return_dict=False,
        )[0]
        transformer: Any = self.denoiser
        if transformer.training and not transformer.config.force_inference_output:
            h, w = x.latents.shape[2:]
            out = image_layout(out, h, w, transformer.config.patch_size)
        return -out, x.target  # it predicts the negated velocity

    # -- validation and export -----------------------------------------------------------------
    def rendered_size(self, width: int, height: int) -> tuple[int, int]:
        """The pipeline scales every request to the area of its default size (1024 x 1024 at full
        size), keeping the aspect ratio, in multiples of 16 pixels."""
        vae_scale = self.pipe.vae_scale_factor
        side, division = self.pipe.default_sample_size * vae_scale, vae_scale * 2
        scale = math.sqrt(side * side / (width * height))
        return int(width * scale // division * division), int(height * scale // division * division)

    def _embeds(self, text: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        dtype = self.denoiser_dtype
        return {
            "prompt_embeds_t5": text["prompt_embeds_t5"][None].to(device, dtype),
            "prompt_embeds_llama3": text["prompt_embeds_llama3"][:, None].to(device, dtype),
            "pooled_prompt_embeds": text["pooled_prompt_embeds"][None].to(device, dtype),
        }

    def render_inputs(self, text: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
        # the negative prompt goes along always: the pipeline uses it only when guidance_scale > 1
        out: dict[str, Any] = self._embeds(text, device)
        if self.negative is not None:
            out.update({f"negative_{k}": v for k, v in self._embeds(self.negative, device).items()})
        return out

    def kohya_state_dict(self, state_dict: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
        """ComfyUI's names: the diffusers module path behind ``diffusion_model.``, which diffusers'
        _convert_non_diffusers_hidream_lora_to_diffusers reads back; alpha / rank is folded into
        ``lora_B`` (that reader passes ``.alpha`` keys on as modules)."""
        return diffusion_model_lora(state_dict, alpha)


FAMILY = HiDreamFamily
