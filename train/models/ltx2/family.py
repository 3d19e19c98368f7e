"""LTX-2: flow matching in the audio-video transformer, trained on its video stream.

As ``LTX2Pipeline.__call__`` does it (diffusers 0.42.1, pipelines/ltx2/pipeline_ltx2.py):

- text: Gemma 3's hidden states of every layer, the prompt left-padded to 1024 tokens, through the
  text connectors, which return one embedding for the video stream and one for the audio stream
  (their learnable registers fill the padding, so the mask they return is all ones). The cache keeps
  the connectors' outputs; the text encoder and the connectors leave before the denoiser loads, and
  validation renders hand the pipeline its cached outputs through ``CachedConnectors``;
- latents: the video VAE's posterior of the sample's frames, (128, (F - 1) / 8 + 1, H / 32, W / 32),
  normalised per channel ``(z - latents_mean) * scaling_factor / latents_std`` and packed one token
  per latent voxel, with the video RoPE coordinates the pipeline computes (in seconds, at the
  sample's frame rate);
- the transformer's timestep (and ``sigma``) is ``1000 sigma``, and it predicts the velocity
  ``noise - x0`` of ``x_s = (1 - s) x0 + s noise``; ``auto`` noise levels are logit-normal moved by
  the scheduler's resolution-dependent shift at the sample's token count.

Audio. The transformer always runs both streams; the pipeline generates a soundtrack beside the video.
A LoRA here trains the video stream on silent clips the way Lightricks' own trainer trains video
alone: the step runs with ``isolate_modalities=True``, which skips the audio<->video cross-attention,
so the video prediction does not depend on the audio tokens at all (zeros of the length the pipeline
gives the clip's duration). The LoRA's targets are the video stream's attention and MLP; the audio
stream and the cross-modal attention are not trained, and renders keep generating sound
(docs/video.md).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.pipelines.ltx2.pipeline_ltx2 import LTX2Pipeline

from ..base import Batch
from ..flow import FlowMatchFamily, Noised
from ..kohya import diffusion_model_lora

NEGATIVE_PROMPT = ""  # what the pipeline encodes for CFG when no negative prompt is given


class CachedConnectors(torch.nn.Module):
    """Stands in for the text connectors in validation renders: the pipeline hands it the cached
    video and audio embeddings side by side (``render_inputs``) and gets them back apart."""

    def __init__(self, video_width: int, device: torch.device):
        super().__init__()
        self.video_width = video_width
        # the pipeline takes its execution device from its first module in name order: this one
        self.register_buffer("anchor", torch.zeros((), device=device), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.get_buffer("anchor").device

    @property
    def dtype(self) -> torch.dtype:
        return self.get_buffer("anchor").dtype

    def forward(
        self,
        text_encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        padding_side: str = "left",
        **_: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w = self.video_width
        return text_encoder_hidden_states[..., :w], text_encoder_hidden_states[..., w:], attention_mask


class LTX2Family(FlowMatchFamily):
    pipeline_cls = LTX2Pipeline
    denoiser_name = "transformer"

    def after_load(self) -> None:
        self.prepare_run_pipeline(self.pipe)

    @classmethod
    def prepare_run_pipeline(cls, pipe: Any) -> None:
        # the video VAE in fp32, as the Wan family keeps its own: the latents are cached in fp32 either
        # way, and the VAE is small beside the transformer (a bf16 3D convolution is also ~10x slower
        # on a CPU); the pipeline casts latents to the VAE's dtype before decoding
        pipe.vae.to(torch.float32)

    def frozen_names(self) -> list[str]:
        # the connectors are the text side's; the audio VAE and the vocoder decode renders' soundtracks
        extra = [n for n in ("connectors", "audio_vae", "vocoder") if getattr(self.pipe, n, None) is not None]
        return super().frozen_names() + extra

    def release_text_encoders(self) -> None:
        super().release_text_encoders()
        self.pipe.connectors = None  # every prompt's connector outputs are cached

    # -- caching ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device) -> list[dict[str, torch.Tensor]]:
        from ...families import model_info

        tokens = model_info(self.spec.model).text_tokens

        def encode(batch: list[str]) -> list[dict[str, torch.Tensor]]:
            embeds, mask, _, _ = self.pipe.encode_prompt(
                prompt=batch, do_classifier_free_guidance=False, max_sequence_length=tokens, device=device
            )
            side = getattr(self.pipe.tokenizer, "padding_side", "left")
            video, audio, mask = self.pipe.connectors(embeds, mask, padding_side=side)
            return [
                {"video": v.float().cpu(), "audio": a.float().cpu(), "mask": m.cpu()}
                for v, a, m in zip(video, audio, mask, strict=True)
            ]

        return self.encode_keeping_negative(list(prompts), encode, NEGATIVE_PROMPT)

    # -- training --------------------------------------------------------------------------------
    def training_latents(self, batch: Batch) -> torch.Tensor:
        vae = self.pipe.vae
        z = self.sample_latents(batch)
        return self.pipeline_cls._normalize_latents(
            z, vae.latents_mean, vae.latents_std, vae.config.scaling_factor
        )

    def image_tokens(self, x0: torch.Tensor) -> int:
        return x0.shape[2] * x0.shape[3] * x0.shape[4]  # one token per latent voxel

    def frame_rate(self) -> float:
        """The frame rate samples are drawn at, which the video RoPE positions (in seconds) assume."""
        assert self.spec.video.fps is not None, "the spec resolves video.fps for a video model"
        return float(self.spec.video.fps)

    def audio_frames(self, latent_frames: int) -> int:
        """The audio latent length the pipeline gives a clip of this many latent frames (its duration)."""
        pipe = self.pipe
        frames = (latent_frames - 1) * pipe.vae_temporal_compression_ratio + 1
        per_second = (
            pipe.audio_sampling_rate
            / pipe.audio_hop_length
            / float(pipe.audio_vae_temporal_compression_ratio)
        )
        return round(frames / self.frame_rate() * per_second)

    def predict(self, model: torch.nn.Module, x: Noised, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        text = batch.text
        dtype = text["video"].dtype
        b, _, f, h, w = x.latents.shape
        transformer: Any = self.denoiser
        fps = self.frame_rate()
        audio_len = self.audio_frames(f)
        audio_width = transformer.config.audio_in_channels
        timestep = x.sigmas * 1000.0
        device = x.latents.device
        out = model(
            hidden_states=self.pipeline_cls._pack_latents(x.latents).to(dtype),
            # silent: with the modalities isolated the video prediction does not read these at all
            audio_hidden_states=torch.zeros(b, audio_len, audio_width, device=device, dtype=dtype),
            encoder_hidden_states=text["video"],
            audio_encoder_hidden_states=text["audio"],
            timestep=timestep,
            sigma=timestep,
            encoder_attention_mask=text["mask"],
            audio_encoder_attention_mask=text["mask"],
            num_frames=f,
            height=h,
            width=w,
            fps=fps,
            audio_num_frames=audio_len,
            video_coords=transformer.rope.prepare_video_coords(b, f, h, w, device, fps=fps),
            audio_coords=transformer.audio_rope.prepare_audio_coords(b, audio_len, device),
            isolate_modalities=True,
            use_cross_timestep=True,
            return_dict=False,
        )[0]
        return self.pipeline_cls._unpack_latents(out, f, h, w), x.target

    @classmethod
    def pixel_multiple_of(cls, vae_scale_factor: int, denoiser_config: dict[str, Any]) -> int:
        return vae_scale_factor * int(denoiser_config.get("patch_size", 1))

    def pixel_multiple(self) -> int:
        return self.pixel_multiple_of(self.pipe.vae_spatial_compression_ratio, self.denoiser_config())

    # -- validation and export -----------------------------------------------------------------
    @staticmethod
    def _side_by_side(text: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([text["video"], text["audio"]], dim=-1)[None]

    def render_inputs(self, text: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
        # the negative prompt goes along always: the pipeline uses it only when guidance_scale > 1
        dtype = self.denoiser_dtype
        out = {
            "prompt_embeds": self._side_by_side(text).to(device, dtype),
            "prompt_attention_mask": text["mask"][None].to(device),
        }
        if self.negative is not None:
            out["negative_prompt_embeds"] = self._side_by_side(self.negative).to(device, dtype)
            out["negative_prompt_attention_mask"] = self.negative["mask"][None].to(device)
        return out

    def render_components(self) -> dict[str, Any]:
        assert self.negative is not None, "the empty prompt is cached with the captions"
        return {
            "scheduler": self.pipe.scheduler,
            "vae": self.pipe.vae,
            "audio_vae": self.pipe.audio_vae,
            "vocoder": self.pipe.vocoder,
            "transformer": self.denoiser,
            "connectors": CachedConnectors(
                self.negative["video"].shape[-1], next(self.denoiser.parameters()).device
            ),
        }

    def render_extra(self) -> dict[str, Any]:
        return {
            "num_frames": self.spec.video.validation_frames,
            "frame_rate": self.frame_rate(),
            "output_type": "pil",
        }

    def render_output(self, out: Any) -> Any:
        return list(out.frames[0])  # the soundtrack is not kept in validation samples

    @classmethod
    def video_inputs(cls, fps: float) -> dict[str, Any]:
        return {"frame_rate": fps}

    def kohya_state_dict(self, state_dict: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
        """The names ComfyUI and Lightricks' tools use (``diffusion_model.transformer_blocks.0.attn1.to_q``,
        the original checkpoint's, which diffusers' reader maps back). That reader refuses ``.alpha``
        keys, so alpha / rank is folded into ``lora_B``."""
        return diffusion_model_lora(state_dict, alpha)


FAMILY = LTX2Family
