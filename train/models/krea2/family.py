"""Krea 2: flow matching in a single-stream DiT on 2x2-packed latents of the Qwen-Image VAE, with
twelve tapped Qwen3-VL layers as its text.

As ``Krea2Pipeline.__call__`` does it:

- text: the pipeline's ``encode_prompt`` — Qwen-Image's chat template padded *in the middle* to a
  fixed ``flow.max_sequence_length`` block (the assistant suffix after the padding), the hidden
  states of twelve decoder layers stacked per token, ``(L, 12, D)``, and a boolean mask of the real
  tokens. The block is always full length, so the cache keeps it as the pipeline makes it and the
  transformer gets it whole, with its mask;
- latents: the VAE posterior of one frame, normalised per channel with ``latents_mean`` /
  ``latents_std`` (as Qwen-Image's, whose VAE it is), packed 2x2; position ids are the pipeline's
  ``prepare_position_ids``: the text at the origin, each image token at ``(0, row, column)``;
- noise and target: ``x_s = (1 - s) x0 + s noise``, the transformer predicts ``noise - x0`` and its
  ``timestep`` is the sigma itself (the pipeline feeds ``t / 1000``).

``timestep_sampling: auto`` is logit-normal sigmas moved by the shift the pipeline denoises with:
``exp(mu)`` with ``mu`` from the image's token count between the scheduler's ``base_image_seq_len``
and ``max_image_seq_len`` (6400 where unset, as the pipeline reads it), or ``mu = 1.15`` for a
distilled checkpoint (``is_distilled`` in the pipeline's config).

Classifier-free guidance is Krea's own convention, ``cond + g (cond - uncond)``, on whenever the
pipeline's ``guidance_scale`` g is above 0, against the empty negative prompt it defaults to.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.pipelines.krea2.pipeline_krea2 import Krea2Pipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline

from ..base import Batch, Family
from ..flow import Noised
from ..kohya import diffusion_model_lora
from ..qwen_image.family import QwenImageFamily

NEGATIVE_PROMPT = ""  # what the pipeline encodes when guidance is on and no negative prompt is given
DISTILLED_MU = 1.15  # the pipeline's fixed shift for a distilled checkpoint

# The original checkpoint's module names (what ComfyUI and Krea's reference trainer write behind
# ``diffusion_model.``), as diffusers' _convert_non_diffusers_krea2_lora_to_diffusers reads them back.
_ATTN = {"to_q": "wq", "to_k": "wk", "to_v": "wv", "to_out.0": "wo", "to_gate": "gate"}
_FF = {"gate": "gate", "up": "up", "down": "down"}
_STANDALONE = {
    "img_in": "first",
    "final_layer.linear": "last.linear",
    "time_embed.linear_1": "tmlp.0",
    "time_embed.linear_2": "tmlp.2",
    "time_mod_proj": "tproj.1",
    "txt_in.linear_1": "txtmlp.1",
    "txt_in.linear_2": "txtmlp.3",
    "text_fusion.projector": "txtfusion.projector",
}
_BLOCK = re.compile(
    r"(transformer_blocks|text_fusion\.(?:layerwise_blocks|refiner_blocks))\.(\d+)\.(attn|ff)\.(.+)$"
)


def original_name(module: str) -> str:
    """The original checkpoint's name of a diffusers ``Krea2Transformer2DModel`` module."""
    if module in _STANDALONE:
        return _STANDALONE[module]
    m = _BLOCK.match(module)
    names = (_ATTN if m.group(3) == "attn" else _FF) if m else {}
    if m is None or m.group(4) not in names:
        raise ValueError(f"{module}: Krea 2's original checkpoint has no name for this module")
    where = "blocks" if m.group(1) == "transformer_blocks" else m.group(1).replace("text_fusion", "txtfusion")
    return f"{where}.{m.group(2)}.{'attn' if m.group(3) == 'attn' else 'mlp'}.{names[m.group(4)]}"


class Krea2Family(QwenImageFamily):
    """The Qwen-Image VAE's latents (``encode_images``, ``training_latents``, ``weight_layout`` are
    Qwen-Image's); Krea 2's text, transformer call and guidance."""

    pipeline_cls = Krea2Pipeline

    # -- caching ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device) -> list[dict[str, torch.Tensor]]:
        def encode(batch: list[str]) -> list[dict[str, torch.Tensor]]:
            embeds, mask = self.pipe.encode_prompt(
                prompt=batch, device=device, max_sequence_length=self.text_length
            )
            return [
                {"prompt_embeds": e.cpu(), "prompt_embeds_mask": m.cpu()}
                for e, m in zip(embeds, mask, strict=True)
            ]

        return self.encode_keeping_negative(list(prompts), encode, NEGATIVE_PROMPT)

    # -- training --------------------------------------------------------------------------------
    def auto_shift(self, image_seq_len: int) -> float:
        if self.pipe.config.get("is_distilled", False):
            return math.exp(DISTILLED_MU)
        config = self.pipe.scheduler.config
        return math.exp(
            calculate_shift(
                image_seq_len,
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 6400),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.15),
            )
        )

    def predict(self, model: torch.nn.Module, x: Noised, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.latents.shape
        pack = QwenImagePipeline._pack_latents  # Krea 2's 2x2 packing is the same layout
        embeds, mask = batch.text["prompt_embeds"], batch.text["prompt_embeds_mask"]
        pred = model(
            hidden_states=pack(x.latents, b, c, h, w).to(embeds.dtype),
            encoder_hidden_states=embeds,
            timestep=x.sigmas.to(embeds.dtype),
            position_ids=Krea2Pipeline.prepare_position_ids(
                embeds.shape[1], h // 2, w // 2, x.latents.device
            ),
            encoder_attention_mask=mask,
            return_dict=False,
        )[0]
        return pred, pack(x.target, b, c, h, w)

    # -- validation and export -----------------------------------------------------------------
    def render_inputs(self, text: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
        # the negative prompt goes along always: the pipeline uses it only when guidance_scale > 0
        dtype = self.denoiser_dtype
        out = {"prompt_embeds": text["prompt_embeds"][None].to(device, dtype)}
        out["prompt_embeds_mask"] = text["prompt_embeds_mask"][None].to(device)
        if self.negative is not None:
            out["negative_prompt_embeds"] = self.negative["prompt_embeds"][None].to(device, dtype)
            out["negative_prompt_embeds_mask"] = self.negative["prompt_embeds_mask"][None].to(device)
        return out

    # Krea's guidance is the pipeline's guidance_scale, Family's default (not Qwen-Image's true_cfg_scale)
    render_guidance = Family.render_guidance

    @classmethod
    def guidance_kwargs(cls, guidance: float, negative_prompt: str) -> dict[str, Any]:
        return Family.guidance_kwargs(guidance, negative_prompt)

    def kohya_state_dict(self, state_dict: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
        """The original checkpoint's names behind ``diffusion_model.`` (``diffusion_model.blocks.0.attn.wq``),
        which ComfyUI loads and diffusers' reader maps back. That reader keeps only ``lora_A`` /
        ``lora_B`` tensors, so alpha / rank is folded into ``lora_B``."""
        return diffusion_model_lora(state_dict, alpha, original_name)


FAMILY = Krea2Family
