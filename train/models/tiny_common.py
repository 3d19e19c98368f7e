"""Offline building blocks of the tiny pipelines: tokenizers from hand-written vocabularies, a
4-level VAE with the real 8x downsampling, CLIP and T5 configs with seeded random weights."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPTextConfig,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,  # in transformers 5 the tokenizers-backed class (formerly T5TokenizerFast)
)

# Text widths. Flux: CLIP pooled -> pooled_projection_dim, T5 d_model -> joint_attention_dim.
# SDXL: cross_attention_dim = hidden(te1) + hidden(te2); pooled = te2 projection.
CLIP_HIDDEN = 32
T5_DMODEL = 32


def write_clip_tokenizer(folder: Path) -> int:
    """A CLIP BPE tokenizer whose vocabulary is the 256 byte symbols, each also with ``</w>``.

    With no merges, every word becomes its characters — crude, but a real CLIPTokenizer
    with real special tokens, built without a download. Returns the vocabulary size.
    """
    symbols = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    tok.save_pretrained(folder)
    return len(vocab)


def write_t5_tokenizer(folder: Path) -> int:
    """A T5 fast tokenizer from a character-level Unigram model (pad, eos, unk + characters).
    Returns the vocabulary size."""
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    tok = T5Tokenizer(
        tokenizer_object=backend,
        extra_ids=0,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
    )
    tok.save_pretrained(folder)
    return len(pieces)


def vae(latent_channels: int, **extra: Any) -> AutoencoderKL:
    # A config mapping: diffusers annotates the per-block tuples as tuple[str] / tuple[int] (one item).
    config: dict[str, Any] = dict(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=64,
        **extra,
    )
    return AutoencoderKL(**config)


def clip_config(vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=CLIP_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=CLIP_HIDDEN,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def t5_sizes(vocab_size: int, width: int = T5_DMODEL) -> dict[str, Any]:
    """A 2-layer T5 (or UMT5) encoder's configuration of ``width``, for the tokenizers above."""
    return dict(
        vocab_size=vocab_size,
        d_model=width,
        d_ff=64,
        d_kv=8,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
    )


def t5_encoder(vocab_size: int, width: int = T5_DMODEL) -> T5EncoderModel:
    """A 2-layer T5 encoder of ``width`` (default ``T5_DMODEL``)."""
    config = T5Config(**t5_sizes(vocab_size, width))
    config.decoder_start_token_id = 0  # unused by an encoder; kept so the written config stays as it was
    return T5EncoderModel(config)


def dynamic_shift_scheduler(
    max_image_seq_len: int, max_shift: float, **extra: Any
) -> FlowMatchEulerDiscreteScheduler:
    """A flow-matching Euler scheduler with the resolution-dependent exponential shift (``mu`` from
    the image's tokens between 256 and ``max_image_seq_len``, 0.5 to ``max_shift``), as the
    Qwen-Image family's repos configure it; ``extra``: further config (``shift_terminal``)."""
    return FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=max_image_seq_len,
        max_shift=max_shift,
        shift=1.0,
        time_shift_type="exponential",
        use_dynamic_shifting=True,
        **extra,
    )
