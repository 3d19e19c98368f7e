"""A tiny random LTX-2 pipeline (``LTX2Pipeline``), built offline: a Gemma tokenizer from a character
vocabulary, a two-layer Gemma 3 text model (with the small vision tower its class carries), the text
connectors with learnable registers, a two-block audio-video transformer, the video VAE with the real
32x spatial and 8x temporal compression and per-channel latent statistics, the audio VAE with its
real 4x compression, a vocoder, and the published scheduler configuration."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch
from diffusers.models.autoencoders.autoencoder_kl_ltx2 import AutoencoderKLLTX2Video
from diffusers.models.autoencoders.autoencoder_kl_ltx2_audio import AutoencoderKLLTX2Audio
from diffusers.models.transformers.transformer_ltx2 import LTX2VideoTransformer3DModel
from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors
from diffusers.pipelines.ltx2.pipeline_ltx2 import LTX2Pipeline
from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, GemmaTokenizer

TEXT_WIDTH = 16  # Gemma's hidden size -> the connectors' and the transformer's caption_channels (3840)
TEXT_LAYERS = 2  # the connectors read all TEXT_LAYERS + 1 hidden states (49 in Gemma 3 12B)
VIDEO_CHANNELS = 8  # the video VAE's latent channels (128)
AUDIO_CHANNELS = 2  # the audio VAE's latent channels (8)
MEL_BINS = 16  # (64); the audio VAE compresses them 4x
AUDIO_WIDTH = AUDIO_CHANNELS * MEL_BINS // 4  # an audio token (128): the audio VAE's base_channels too
REGISTERS = 8  # the connectors' learnable registers (128); the prompt length is a multiple of it


def gemma_tokenizer() -> GemmaTokenizer:
    """Gemma's byte-fallback BPE with a character vocabulary (and ``▁c`` merges for word starts)."""
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += ["\u2581", *chars, *("\u2581" + c for c in chars)]
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
    merges: Any = [("\u2581", c) for c in chars]  # (pairs, which the class takes; annotated as strings)
    return GemmaTokenizer(vocab=vocab, merges=merges)


def gemma3(vocab_size: int) -> Gemma3ForConditionalGeneration:
    text = dict(
        vocab_size=vocab_size + 3,  # + the image tokens its multimodal class reserves
        hidden_size=TEXT_WIDTH,
        intermediate_size=32,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=2048,
        sliding_window=8,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        image_token_index=vocab_size + 2,
        boi_token_index=vocab_size + 1,
        eoi_token_index=vocab_size,
    )
    return Gemma3ForConditionalGeneration(config).eval()


def connectors() -> LTX2TextConnectors:
    return LTX2TextConnectors(
        caption_channels=TEXT_WIDTH,
        text_proj_in_factor=TEXT_LAYERS + 1,
        video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=8,  # 2 x 8: the caption width
        video_connector_num_layers=1,
        video_connector_num_learnable_registers=REGISTERS,
        audio_connector_num_attention_heads=2,
        audio_connector_attention_head_dim=8,
        audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=REGISTERS,
        connector_rope_base_seq_len=32,
        rope_type="split",
    )


def transformer() -> LTX2VideoTransformer3DModel:
    return LTX2VideoTransformer3DModel(
        in_channels=VIDEO_CHANNELS,
        out_channels=VIDEO_CHANNELS,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,  # the video stream's width (2 x 8)
        audio_in_channels=AUDIO_WIDTH,
        audio_out_channels=AUDIO_WIDTH,
        audio_num_attention_heads=2,
        audio_attention_head_dim=4,
        audio_cross_attention_dim=8,  # the audio stream's width (2 x 4)
        num_layers=2,
        caption_channels=TEXT_WIDTH,
        rope_type="split",
        vae_scale_factors=(8, 32, 32),
    )


def video_vae() -> AutoencoderKLLTX2Video:
    vae = AutoencoderKLLTX2Video(
        latent_channels=VIDEO_CHANNELS,
        block_out_channels=(8, 16, 32),
        down_block_types=("LTX2VideoDownBlock3D",) * 3,
        layers_per_block=(1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True),
        downsample_type=("spatiotemporal",) * 3,
        decoder_block_out_channels=(8, 16, 32),
        decoder_layers_per_block=(1, 1, 1, 1),
        decoder_spatio_temporal_scaling=(True, True, True),
        decoder_inject_noise=(False,) * 4,
        upsample_type=("spatiotemporal",) * 3,
        upsample_residual=(True, True, True),
        upsample_factor=(2, 2, 2),
        patch_size=4,
        patch_size_t=1,
        decoder_causal=False,
        # stated, as the published config states them: the class's default works them out from the
        # blocks, which is wrong for blocks that scale one axis only
        spatial_compression_ratio=32,
        temporal_compression_ratio=8,
    )
    # the real VAE normalises each channel by its own mean and std; so does this one
    vae.latents_mean.copy_(torch.linspace(-0.2, 0.2, VIDEO_CHANNELS))
    vae.latents_std.copy_(torch.linspace(0.8, 1.2, VIDEO_CHANNELS))
    return vae


def audio_vae() -> AutoencoderKLLTX2Audio:
    vae = AutoencoderKLLTX2Audio(
        base_channels=AUDIO_WIDTH,  # its latent statistics apply to packed audio tokens: one per width
        output_channels=2,
        ch_mult=(1, 2, 4),  # two downsamplings: the 4x the pipeline assumes
        num_res_blocks=1,
        latent_channels=AUDIO_CHANNELS,
        resolution=32,
        mel_bins=MEL_BINS,
    )
    vae.latents_mean.copy_(torch.linspace(-0.1, 0.1, AUDIO_WIDTH))
    vae.latents_std.copy_(torch.linspace(0.9, 1.1, AUDIO_WIDTH))
    return vae


def vocoder() -> LTX2Vocoder:
    return LTX2Vocoder(
        in_channels=2 * MEL_BINS,
        hidden_channels=32,
        out_channels=2,
        upsample_kernel_sizes=[20, 8, 8],
        upsample_factors=[10, 4, 4],  # 160x: one mel frame is a 160-sample hop, as in the real one
        resnet_kernel_sizes=[3],
        resnet_dilations=[[1, 3, 5]],
        output_sampling_rate=16000,
    )


def scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The published scheduler: a resolution-dependent shift over 1024 to 4096 tokens, stretched to end
    at 0.1 (diffusers' LTX-2 conversion script)."""
    return FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.95,
        max_shift=2.05,
        base_image_seq_len=1024,
        max_image_seq_len=4096,
        shift_terminal=0.1,
    )


def write(folder: Path) -> Path:
    torch.manual_seed(0)
    tok = gemma_tokenizer()
    LTX2Pipeline(
        scheduler=scheduler(),
        vae=video_vae(),
        audio_vae=audio_vae(),
        text_encoder=gemma3(len(tok)),
        tokenizer=tok,
        connectors=connectors(),
        transformer=transformer(),
        vocoder=vocoder(),
    ).save_pretrained(folder)
    return Path(folder)
