"""Tiny random Wan pipelines (text- and image-to-video): a character-level T5 tokenizer (``tiny_common``), a UMT5 encoder,
the causal 3D VAE (``AutoencoderKLWan``) with the real 8x spatial and 4x temporal compression and
per-channel latent statistics, a two-block transformer with the real 1x2x2 patches, and the
repos' scheduler (UniPC on flow sigmas with a fixed shift)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel
from diffusers.pipelines.wan.pipeline_wan import WanPipeline
from diffusers.pipelines.wan.pipeline_wan_i2v import WanImageToVideoPipeline
from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)

from ..tiny_common import t5_sizes, write_t5_tokenizer

UMT5_DMODEL = 32  # -> the transformer's text_dim
LATENT_CHANNELS = 4  # 16 in the real VAE
CLIP_WIDTH = 16  # the image encoder's hidden size -> the transformer's image_dim (1280: ViT-H/14)
I2V_CHANNELS = LATENT_CHANNELS + 4 + LATENT_CHANNELS  # noisy latents, the first-frame mask, its latents


def tiny_wan22_vae(z: int = 8) -> AutoencoderKLWan:
    """The Wan 2.2 VAE's layout: residual blocks over 2x2-patchified pixels (12 channels), 16x
    spatial and 4x temporal compression."""
    return AutoencoderKLWan(
        base_dim=8,
        decoder_base_dim=8,
        z_dim=z,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        is_residual=True,
        patch_size=2,
        in_channels=12,
        out_channels=12,
        scale_factor_spatial=16,
        scale_factor_temporal=4,
        latents_mean=[0.05 * i - 0.2 for i in range(z)],
        latents_std=[0.9 + 0.05 * i for i in range(z)],
    )


def tiny_wan_vae(z: int = LATENT_CHANNELS) -> AutoencoderKLWan:
    return AutoencoderKLWan(
        base_dim=8,
        z_dim=z,
        dim_mult=[1, 2, 2, 2],  # three downsamplings: 8x spatial
        num_res_blocks=1,
        temperal_downsample=[False, True, True],  # two in time: 4x
        # the real VAE normalises each channel by its own mean and std; so does this one
        latents_mean=[0.1 * i - 0.15 for i in range(z)],
        latents_std=[0.8 + 0.1 * i for i in range(z)],
    )


def tiny_wan_transformer(
    in_channels: int = LATENT_CHANNELS, out_channels: int = LATENT_CHANNELS, **extra
) -> WanTransformer3DModel:
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,  # RoPE splits it 4 / 4 / 4 over frames, height, width
        in_channels=in_channels,
        out_channels=out_channels,
        text_dim=UMT5_DMODEL,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=64,
        **extra,
    )


def tiny_umt5(folder: Path) -> tuple[T5Tokenizer, UMT5EncoderModel]:
    vocab = write_t5_tokenizer(folder / "tokenizer")
    tok = T5Tokenizer.from_pretrained(folder / "tokenizer")
    return tok, UMT5EncoderModel(UMT5Config(**t5_sizes(vocab, UMT5_DMODEL)))


def scheduler(shift: float) -> UniPCMultistepScheduler:
    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=shift
    )


def tiny_clip_vision() -> tuple[CLIPImageProcessor, CLIPVisionModel]:
    """Wan 2.1 I2V's image encoder, small: a CLIP vision tower whose penultimate layer (all 17 tokens of
    a 32 px image in 8 px patches, the class token first) the transformer attends to; 257 tokens of a
    224 px image in the real ViT-H/14."""
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    config = CLIPVisionConfig(
        hidden_size=CLIP_WIDTH,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=CLIP_WIDTH,
    )
    return processor, CLIPVisionModel(config)


def _layout(ti2v: bool, experts: bool, i2v: bool) -> dict[str, Any]:
    if ti2v:
        return {"vae": tiny_wan22_vae(8), "transformer": tiny_wan_transformer(8, 8), "expand_timesteps": True}
    channels = I2V_CHANNELS if i2v else LATENT_CHANNELS
    if experts:  # Wan 2.2 A14B: text-to-video switches at 0.875, image-to-video at 0.9
        return {
            "vae": tiny_wan_vae(),
            "transformer": tiny_wan_transformer(channels),
            "transformer_2": tiny_wan_transformer(channels),
            "boundary_ratio": 0.9 if i2v else 0.875,
        }
    if i2v:  # Wan 2.1 I2V: attends to the first frame's CLIP tokens too (2 heads x 12 = 24 wide)
        processor, encoder = tiny_clip_vision()
        transformer = tiny_wan_transformer(channels, image_dim=CLIP_WIDTH, added_kv_proj_dim=24)
        return {
            "vae": tiny_wan_vae(),
            "transformer": transformer,
            "image_processor": processor,
            "image_encoder": encoder,
        }
    return {"vae": tiny_wan_vae(), "transformer": tiny_wan_transformer()}


def write(
    folder: Path, shift: float = 3.0, ti2v: bool = False, experts: bool = False, i2v: bool = False
) -> Path:
    """A tiny Wan 2.1 text-to-video pipeline; ``shift``: its scheduler's flow shift; ``ti2v``: Wan 2.2
    TI2V-5B's layout instead (the Wan 2.2 VAE, 8 latent channels here, per-token timesteps);
    ``experts``: Wan 2.2 A14B's, a high- and a low-noise transformer; ``i2v``: the image-to-video
    pipeline (its transformers take the first frame's latents and mask beside the noisy latents)."""
    torch.manual_seed(0)
    folder = Path(folder)
    tok, encoder = tiny_umt5(folder)
    pipeline = WanImageToVideoPipeline if i2v else WanPipeline
    pipeline(
        tokenizer=tok,  # pyright: ignore[reportArgumentType]  (annotated AutoTokenizer; any tokenizer works)
        text_encoder=encoder,
        scheduler=scheduler(shift),  # pyright: ignore[reportArgumentType]  (the Wan repos ship UniPC on flow sigmas)
        **_layout(ti2v, experts, i2v),
    ).save_pretrained(folder)
    return folder
