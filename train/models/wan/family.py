"""Wan 2.1 text-to-video and Wan 2.2 TI2V-5B: flow matching in the 3D DiT, UMT5 text, the causal 3D VAE.

As ``WanPipeline.__call__`` does it (diffusers 0.42.1, pipelines/wan/pipeline_wan.py):

- text: the pipeline's ``encode_prompt`` at 512 tokens (its ``__call__`` default; ``encode_prompt``'s
  own is 226): UMT5's last hidden state cut to the prompt's tokens and zero-padded back to 512. The
  transformer gets no attention mask: the zero rows are keys too, as in the pipeline. The cache keeps
  only the prompt's own rows and the step pads them back to 512;
- latents: the VAE's posterior of the sample's frames, (C, (F - 1) / 4 + 1, H / 8, W / 8), normalised
  per channel ``(z - latents_mean) / latents_std`` (the pipeline undoes it before decoding);
- the transformer's timestep is ``1000 sigma`` (the pipeline feeds the integer part), and it predicts
  the velocity ``noise - x0`` of ``x_s = (1 - s) x0 + s noise``, which its UniPC scheduler steps on
  flow sigmas (``prediction_type="flow_prediction"``).

``timestep_sampling: auto`` is logit-normal sigmas moved by the scheduler's ``flow_shift`` (3 in the
480p repos), the noise levels the pipeline renders at. Guidance is classifier-free, against the
empty negative prompt the pipeline defaults to.

A sample is a clip of ``video.frames`` frames (an image: one frame, one latent frame); validation
renders ``video.validation_frames`` frames and returns them as a list of PIL images.

Wan 2.2 TI2V-5B (``expand_timesteps`` in its pipeline config) is the same objective on the Wan 2.2
VAE (16x spatial, 48 channels), with one timestep per token, all equal in its text-to-video mode.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, cast

import torch
from diffusers.pipelines.wan.pipeline_wan import WanPipeline
from diffusers.pipelines.wan.pipeline_wan_i2v import WanImageToVideoPipeline

from ...trained import LOW_NOISE_FILE  # the low-noise expert's LoRA
from ..base import Batch
from ..flow import FlowMatchFamily, Noised
from ..kohya import _entry, _pairs

NEGATIVE_PROMPT = ""  # what the pipeline encodes for CFG when no negative prompt is given
TEXT_TOKENS = 512  # the pipeline pads every prompt to this; Wan 2.1 I2V's attention assumes it

# diffusers' module names in a Wan block -> musubi-tuner's (the original Wan names, "." as "_"), in
# the order and number diffusers' reader (_convert_musubi_wan_lora_to_diffusers) requires: every
# block holds all ten, each with its alpha.
MUSUBI = {
    "attn1.to_q": "self_attn_q",
    "attn1.to_k": "self_attn_k",
    "attn1.to_v": "self_attn_v",
    "attn1.to_out.0": "self_attn_o",
    "attn2.to_q": "cross_attn_q",
    "attn2.to_k": "cross_attn_k",
    "attn2.to_v": "cross_attn_v",
    "attn2.to_out.0": "cross_attn_o",
    "ffn.net.0.proj": "ffn_0",
    "ffn.net.2": "ffn_2",
}
MUSUBI_IMAGE = {"attn2.add_k_proj": "cross_attn_k_img", "attn2.add_v_proj": "cross_attn_v_img"}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def own_tokens(states: torch.Tensor) -> torch.Tensor:
    """A prompt's UMT5 states (512, D) without the zero rows the pipeline pads them with (at least one)."""
    rows = (states != 0).any(dim=-1).nonzero()
    return states[: int(rows.max()) + 1 if rows.numel() else 1]


def text_states(states: torch.Tensor) -> torch.Tensor:
    """(B, L, D) prompt states zero-padded to the 512 rows the pipeline hands the transformer."""
    short = TEXT_TOKENS - states.shape[1]
    return (
        torch.cat([states, states.new_zeros(states.shape[0], short, states.shape[2])], dim=1)
        if short > 0
        else states
    )


class WanFamily(FlowMatchFamily):
    pipeline_cls = WanPipeline
    denoiser_name = "transformer"

    def after_load(self) -> None:
        # diffusers' Wan examples load the VAE in fp32 whatever the transformer's dtype: its 3D
        # convolutions lose detail in bf16. Latents are cached in fp32 either way.
        self.prepare_run_pipeline(self.pipe)

    @classmethod
    def prepare_run_pipeline(cls, pipe: Any) -> None:
        # the VAE (and Wan 2.1 I2V's CLIP image encoder) in fp32, as diffusers' Wan examples load them
        pipe.vae.to(torch.float32)
        if getattr(pipe, "image_encoder", None) is not None:
            pipe.image_encoder.to(torch.float32)

    # -- caching ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device) -> list[dict[str, torch.Tensor]]:
        def encode(batch: list[str]) -> list[dict[str, torch.Tensor]]:
            embeds, _ = self.pipe.encode_prompt(
                prompt=batch,
                do_classifier_free_guidance=False,
                max_sequence_length=TEXT_TOKENS,
                device=device,
            )
            # kept without the zero rows the pipeline pads to 512 (a prompt's own tokens: ~8 MiB less a
            # caption in fp32); the training step and the renders pad them back (``text_states``)
            return [{"prompt_embeds": own_tokens(e).float().cpu()} for e in embeds]

        return self.encode_keeping_negative(list(prompts), encode, NEGATIVE_PROMPT)

    # -- training --------------------------------------------------------------------------------
    def latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's per-channel latent mean and std, shaped to broadcast over (B, C, F, h, w)."""
        cfg = self.pipe.vae.config
        mean = torch.tensor(cfg.latents_mean, device=like.device, dtype=like.dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(cfg.latents_std, device=like.device, dtype=like.dtype).view(1, -1, 1, 1, 1)
        return mean, std

    def training_latents(self, batch: Batch) -> torch.Tensor:
        z = self.sample_latents(batch)
        mean, std = self.latent_stats(z)
        return (z - mean) / std

    def image_tokens(self, x0: torch.Tensor) -> int:
        return x0.shape[2] * (x0.shape[3] // 2) * (x0.shape[4] // 2)

    def auto_shift(self, image_seq_len: int) -> float:
        return self.scheduler_fixed_shift()

    def predict(self, model: torch.nn.Module, x: Noised, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        text = text_states(batch.text["prompt_embeds"])
        timestep = x.sigmas * 1000.0
        if self.pipe.config.get("expand_timesteps", False):
            # Wan 2.2 TI2V: one timestep per 1x2x2 token (the pipeline's text-to-video mode: all equal)
            timestep = timestep[:, None].expand(-1, self.image_tokens(x.latents))
        out = model(
            **self.conditioned(x.latents.to(text.dtype), batch),
            timestep=timestep,
            encoder_hidden_states=text,
            return_dict=False,
        )[0]
        return out, x.target

    def conditioned(self, latents: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """The transformer's image inputs of a step: the noisy latents (text-to-video)."""
        return {"hidden_states": latents}

    def pixel_multiple(self) -> int:
        # the spatial VAE factor x the 2x2 patches (the pipeline refuses sides off multiples of 16)
        return self.pipe.vae_scale_factor_spatial * self.denoiser_config()["patch_size"][-1]

    # -- validation and export -----------------------------------------------------------------
    def render_inputs(self, text: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
        # the negative prompt goes along always: the pipeline uses it only when guidance_scale > 1
        dtype = self.denoiser_dtype
        out = {"prompt_embeds": text_states(text["prompt_embeds"][None]).to(device, dtype)}
        if self.negative is not None:
            out["negative_prompt_embeds"] = text_states(self.negative["prompt_embeds"][None]).to(
                device, dtype
            )
        return out

    def render_extra(self) -> dict[str, Any]:
        return {"num_frames": self.spec.video.validation_frames, "output_type": "pil"}

    def render_output(self, out: Any) -> Any:
        return list(out.frames[0])

    def kohya_state_dict(self, state_dict: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
        """musubi-tuner's names (``lora_unet_blocks_0_self_attn_q``), which ComfyUI loads for Wan and
        diffusers reads back. diffusers' reader wants all ten modules of every block up to the last
        one trained: the modules the LoRA leaves out are written as zero LoRAs of its rank."""
        pairs = _pairs(state_dict)
        names = {**MUSUBI, **(MUSUBI_IMAGE if self.has_image_attention() else {})}
        blocks: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        for module, ab in pairs.items():
            m = _BLOCK.match(module)
            if m is None or m.group(2) not in names:
                raise ValueError(f"{module}: musubi-tuner's Wan naming has no name for this module")
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = ab
        rank = next(iter(pairs.values()))[0].shape[0] if pairs else 1
        out: dict[str, torch.Tensor] = {}
        for i in range(max(blocks, default=-1) + 1):
            for module, name in names.items():
                ab = blocks.get(i, {}).get(module)
                if ab is None:
                    layer = self.lora_base().get_submodule(f"blocks.{i}.{module}")
                    assert isinstance(layer, torch.nn.Linear), f"blocks.{i}.{module}"
                    ab = (
                        torch.zeros(rank, layer.in_features, dtype=torch.float32),
                        torch.zeros(layer.out_features, rank, dtype=torch.float32),
                    )
                out.update(_entry(f"lora_unet_blocks_{i}_{name}", *ab, alpha / ab[0].shape[0]))
        return out

    def lora_base(self) -> torch.nn.Module:
        """The transformer whose ``blocks`` the LoRA names (the experts' share one architecture)."""
        return self.denoiser

    def has_image_attention(self) -> bool:
        """The transformer attends to CLIP image tokens too (Wan 2.1 I2V: ``add_k_proj`` / ``add_v_proj``)."""
        return getattr(self.denoiser.config, "added_kv_proj_dim", None) is not None


FAMILY = WanFamily


# -- Wan 2.2 A14B: two experts ------------------------------------------------------------------

LOW_NOISE_KOHYA_FILE = "lora_kohya_low_noise.safetensors"
EXPERTS = {"high_noise": "high", "low_noise": "low"}  # spec.video.expert -> the Experts attribute


class Experts(torch.nn.Module):
    """Wan 2.2 A14B's two transformers as one trainable module, as its pipeline uses them: ``high``
    (the pipeline's ``transformer``) denoises timesteps at or above ``boundary`` (its config's
    ``boundary_ratio`` x 1000), ``low`` (``transformer_2``) the ones below. Each item of a batch goes
    to the expert of its own timestep. ``trained``: the experts a LoRA is added to."""

    _repeated_blocks = ("WanTransformerBlock",)

    def __init__(
        self, high: torch.nn.Module, low: torch.nn.Module, boundary: float, trained: tuple[str, ...]
    ):
        super().__init__()
        self.high, self.low = high, low
        self.boundary = boundary
        self.trained = trained

    @property
    def config(self) -> Any:
        return self.high.config  # the two share the architecture

    @property
    def dtype(self) -> torch.dtype:
        return next(self.high.parameters()).dtype

    @property
    def peft_config(self) -> Any:  # what peft's state-dict helpers read
        return getattr(self, self.trained[0]).peft_config

    def add_adapter(self, config: Any) -> None:
        for name in self.trained:
            getattr(self, name).add_adapter(config)

    def enable_gradient_checkpointing(self, **kw: Any) -> None:
        for expert in (self.high, self.low):
            cast(Any, expert).enable_gradient_checkpointing(**kw)

    def compile_repeated_blocks(self, **kw: Any) -> None:
        for expert in (self.high, self.low):
            cast(Any, expert).compile_repeated_blocks(**kw)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        **kw: Any,
    ) -> tuple[torch.Tensor]:
        high = timestep >= self.boundary
        parts = {}
        for name, rows in (("high", high), ("low", ~high)):
            if bool(rows.any()):
                expert = getattr(self, name)
                batch = hidden_states.shape[0]
                own = {
                    k: v[rows] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == batch else v
                    for k, v in kw.items()
                }
                parts[name] = (
                    rows,
                    expert(
                        hidden_states=hidden_states[rows],
                        timestep=timestep[rows],
                        encoder_hidden_states=encoder_hidden_states[rows],
                        **own,
                    )[0],
                )
        first = next(iter(parts.values()))[1]
        out = first.new_zeros((hidden_states.shape[0], *first.shape[1:]))
        for rows, value in parts.values():
            out = out.index_put((rows.nonzero(as_tuple=True)[0],), value)
        return (out,)


class WanExpertsFamily(WanFamily):
    """Wan 2.2 A14B: a LoRA for each expert (``video.expert: both``, the default), trained on the
    timesteps that expert serves, or for one alone (``high_noise`` / ``low_noise``: its noise levels
    drawn inside its range). Delivered as two files the stock pipeline loads, the second with
    ``load_lora_weights(..., weight_name=LOW_NOISE_FILE, load_into_transformer_2=True)``."""

    experts: Experts | None = None

    def denoiser_components(self) -> list[str]:
        return ["transformer", "transformer_2"]

    def load_denoiser(self, dtype: torch.dtype) -> None:
        super().load_denoiser(dtype)
        which = self.spec.video.expert
        trained = ("high", "low") if which == "both" else (EXPERTS[which],)
        self.experts = Experts(
            self.pipe.transformer, self.pipe.transformer_2, self.boundary * 1000.0, trained
        )

    @property
    def boundary(self) -> float:
        """The noise level where the pipeline switches experts (its ``boundary_ratio``)."""
        return float(self.pipe.config.boundary_ratio)

    @property
    def denoiser(self) -> torch.nn.Module:
        if self.experts is None:  # the meta-device count builds a pipeline of one transformer
            return getattr(self.pipe, self.denoiser_name)
        return self.experts

    @property
    def denoiser_dtype(self) -> torch.dtype:
        return self.pipe.transformer.dtype

    def lora_base(self) -> torch.nn.Module:
        return self.experts.high if self.experts is not None else self.denoiser

    def sample_sigmas(self, rng: Any, image_seq_len: int) -> torch.Tensor:
        sigmas = super().sample_sigmas(rng, image_seq_len)
        b = self.boundary
        if self.spec.video.expert == "high_noise":
            return b + (1.0 - b) * sigmas
        if self.spec.video.expert == "low_noise":
            return b * sigmas
        return sigmas

    def render_components(self) -> dict[str, Any]:
        assert self.experts is not None
        return {
            "scheduler": self.pipe.scheduler,
            "vae": self.pipe.vae,
            "transformer": self.experts.high,
            "transformer_2": self.experts.low,
            "boundary_ratio": self.boundary,
        }

    @staticmethod
    def _split(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        out: dict[str, dict[str, torch.Tensor]] = {"high": {}, "low": {}}
        for key, value in state_dict.items():
            expert, _, rest = key.partition(".")
            if expert in out:
                out[expert][rest] = value
            else:  # one transformer's LoRA (the meta-device count builds a single expert)
                out["high"][key] = value
        return out

    def save_lora(self, out_dir: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
        """Both experts: the high-noise LoRA as ``pytorch_lora_weights.safetensors``, the low-noise one
        as ``LOW_NOISE_FILE``. One expert: its LoRA as ``pytorch_lora_weights.safetensors`` (config.json's
        ``video.expert`` says which transformer it loads into)."""
        parts = {k: v for k, v in self._split(state_dict).items() if v}
        main = Path(out_dir) / "pytorch_lora_weights.safetensors"
        names = (
            {"high": main.name, "low": LOW_NOISE_FILE} if len(parts) == 2 else {k: main.name for k in parts}
        )
        for expert, weights in parts.items():
            layers: dict[str, torch.nn.Module | torch.Tensor] = dict(weights)
            self.pipeline_cls.save_lora_weights(
                out_dir,
                weight_name=names[expert],
                safe_serialization=True,
                transformer_lora_layers=layers,
                transformer_lora_adapter_metadata=metadata,
            )
        return main

    def companion_files(self, out_dir: Path) -> list[Path]:
        """The low-noise expert's file beside the high-noise one's, when both were trained."""
        low = Path(out_dir) / LOW_NOISE_FILE
        return [low] if low.is_file() else []

    def kohya_state_dict(self, state_dict: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
        parts = self._split(state_dict)
        return super().kohya_state_dict(parts["high"] or parts["low"], alpha)

    def kohya_companions(
        self, state_dict: dict[str, torch.Tensor], alpha: float
    ) -> dict[str, dict[str, torch.Tensor]]:
        """The low-noise expert's musubi-named copy, when both experts were trained."""
        parts = self._split(state_dict)
        if not (parts["high"] and parts["low"]):
            return {}
        return {LOW_NOISE_KOHYA_FILE: super().kohya_state_dict(parts["low"], alpha)}


# -- image-to-video: Wan 2.1 I2V 14B, Wan 2.2 I2V-A14B ---------------------------------------------


class ImageToVideo:
    """Wan's image-to-video objective, as ``WanImageToVideoPipeline`` conditions (pipeline_wan_i2v.py):
    the clip's first frame followed by F - 1 black frames goes through the VAE (the posterior's mode,
    normalised like the latents) and rides beside the noisy latents with a 4-channel mask that marks
    latent frame 0 as given: 36 channels in, 16 out, the velocity of every latent frame. Wan 2.1 I2V
    also attends to the frame's CLIP tokens (the image encoder's penultimate layer), which need the
    text states at exactly 512 rows (its attention splits text from image tokens at 512).

    Both are cached per sample (``encode_conditions``); a sample's first frame is its condition, as
    the pipeline's input image is at inference. The image encoder stays for validation renders, on
    the CPU between them."""

    pipe: Any
    spec: Any

    def frozen_names(self) -> list[str]:
        names = cast(Any, super()).frozen_names()
        return names + (["image_encoder"] if getattr(self.pipe, "image_encoder", None) is not None else [])

    def release_text_encoders(self) -> None:
        cast(Any, super()).release_text_encoders()
        if getattr(self.pipe, "image_encoder", None) is not None:
            self.pipe.image_encoder.to("cpu")  # on the device again only for validation renders

    @torch.no_grad()
    def encode_conditions(self, frames: list[Any], pixels: torch.Tensor) -> list[torch.Tensor]:
        """(mask + first-frame latents) of the sample ``pixels`` (1, 3, F, H, W) in [-1, 1], and (Wan 2.1)
        the CLIP states of its first frame ``frames[0]`` (PIL)."""
        vae = self.pipe.vae
        first = pixels[:, :, :1]
        video = torch.cat([first, first.new_zeros(1, 3, pixels.shape[2] - 1, *first.shape[3:])], dim=2)
        z = vae.encode(video.to(vae.device, vae.dtype)).latent_dist.mode().float()
        mean, std = cast(Any, self).latent_stats(z)
        z = (z - mean) / std
        mask = z.new_zeros(1, self.pipe.vae_scale_factor_temporal, *z.shape[2:])
        mask[:, :, 0] = 1  # latent frame 0 is the given image
        out = [torch.cat([mask, z], dim=1)]
        encoder = getattr(self.pipe, "image_encoder", None)
        if encoder is not None:
            image = self.pipe.image_processor(images=frames[0], return_tensors="pt")
            states = encoder(**image.to(encoder.device), output_hidden_states=True).hidden_states[-2]
            out.append(states.float())
        return out

    def conditioned(self, latents: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        condition = batch.controls[0].to(latents.dtype)
        out = {"hidden_states": torch.cat([latents, condition], dim=1)}
        if len(batch.controls) > 1:
            out["encoder_hidden_states_image"] = batch.controls[1].to(latents.dtype)
        return out

    def render_components(self) -> dict[str, Any]:
        parts = cast(Any, super()).render_components()
        return {
            **parts,
            "image_encoder": self.pipe.image_encoder,
            "image_processor": self.pipe.image_processor,
        }

    def render(self, *args: Any, **kw: Any) -> Any:
        encoder = getattr(self.pipe, "image_encoder", None)
        if encoder is None:
            return cast(Any, super()).render(*args, **kw)
        encoder.to(self.pipe.vae.device)
        try:
            return cast(Any, super()).render(*args, **kw)
        finally:
            encoder.to("cpu")


class WanI2VFamily(ImageToVideo, WanFamily):
    pipeline_cls = WanImageToVideoPipeline


class WanI2VExpertsFamily(ImageToVideo, WanExpertsFamily):
    pipeline_cls = WanImageToVideoPipeline


FAMILIES = {
    "wan2.2-t2v-a14b": WanExpertsFamily,
    "wan2.1-i2v-14b": WanI2VFamily,
    "wan2.2-i2v-a14b": WanI2VExpertsFamily,
}
