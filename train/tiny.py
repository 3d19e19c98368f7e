"""Write tiny random Flux.1 and SDXL pipelines in the diffusers folder layout.

    python -m train.tiny --out weights          # tiny-flux-dev, tiny-flux-schnell, tiny-sdxl

The folders load with the stock ``FluxPipeline.from_pretrained`` /
``StableDiffusionXLPipeline.from_pretrained`` and produce an image on a CPU in well under
a second, so the trainer, the Cog package and the client are tested through exactly the
loading code real weights go through. Everything is built offline: the tokenizers come
from a hand-written vocabulary, the models from configs with seeded random weights.

The shapes keep the real models' structure (4-level VAE with 8x downsampling, Flux 2x2
latent packing, SDXL's two text encoders and ``text_time`` added conditioning) and shrink
only widths and depths.
"""

from __future__ import annotations

import argparse
import string
from pathlib import Path
from typing import Any

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,  # in transformers 5 the tokenizers-backed class (formerly T5TokenizerFast)
)

TINY_NAMES = ("tiny-flux-dev", "tiny-flux-schnell", "tiny-sdxl")

# Text widths. Flux: CLIP pooled -> pooled_projection_dim, T5 d_model -> joint_attention_dim.
# SDXL: cross_attention_dim = hidden(te1) + hidden(te2); pooled = te2 projection.
_CLIP_HIDDEN = 32
_T5_DMODEL = 32


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


def _vae(latent_channels: int, **extra: Any) -> AutoencoderKL:
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


def _clip_config(vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=_CLIP_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=_CLIP_HIDDEN,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def write_tiny_flux(folder: Path, variant: str = "dev", num_single_layers: int = 1) -> Path:
    """Write a tiny Flux.1 pipeline (``variant`` "dev": guidance embedding; "schnell": none)."""
    assert variant in ("dev", "schnell")
    torch.manual_seed(0)
    folder = Path(folder)
    tok_dir, tok2_dir = folder / "tokenizer", folder / "tokenizer_2"
    clip_vocab = write_clip_tokenizer(tok_dir)
    t5_vocab = write_t5_tokenizer(tok2_dir)
    t5_config = T5Config(
        vocab_size=t5_vocab,
        d_model=_T5_DMODEL,
        d_ff=64,
        d_kv=8,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
    )
    t5_config.decoder_start_token_id = 0  # unused by an encoder; kept so the written config stays as it was
    t5 = T5EncoderModel(t5_config)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=num_single_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_T5_DMODEL,
        pooled_projection_dim=_CLIP_HIDDEN,
        guidance_embeds=(variant == "dev"),
        axes_dims_rope=(4, 6, 6),
    )
    if variant == "dev":
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=_vae(
            4, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False
        ),
        text_encoder=CLIPTextModel(_clip_config(clip_vocab)),
        tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
        text_encoder_2=t5,
        tokenizer_2=T5Tokenizer.from_pretrained(tok2_dir),
        transformer=transformer,
    )
    pipe.save_pretrained(folder)
    return folder


def write_tiny_sdxl(folder: Path, prediction_type: str = "epsilon") -> Path:
    """Write a tiny SDXL pipeline (two CLIP text encoders, ``text_time`` conditioning)."""
    torch.manual_seed(0)
    folder = Path(folder)
    vocab = write_clip_tokenizer(folder / "tokenizer")
    write_clip_tokenizer(folder / "tokenizer_2")
    time_dim = 8
    # A config mapping: diffusers annotates the per-block tuples as one-item tuples.
    unet_config: dict[str, Any] = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * _CLIP_HIDDEN,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + _CLIP_HIDDEN,
        use_linear_projection=True,
        norm_num_groups=32,
    )
    unet = UNet2DConditionModel(**unet_config)
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        timestep_spacing="leading",
        steps_offset=1,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(4, scaling_factor=0.13025),
        text_encoder=CLIPTextModel(_clip_config(vocab)),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(vocab)),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
        unet=unet,
        # diffusers types this as the enum of Karras schedulers' names, not a scheduler instance
        scheduler=scheduler,  # pyright: ignore[reportArgumentType]
        add_watermarker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def write_all(out: Path, force: bool = False) -> list[Path]:
    """Write every tiny pipeline under ``out`` (skipping complete ones unless ``force``)."""
    out = Path(out)
    writers = {
        "tiny-flux-dev": lambda d: write_tiny_flux(d, "dev"),
        "tiny-flux-schnell": lambda d: write_tiny_flux(d, "schnell"),
        "tiny-sdxl": write_tiny_sdxl,
    }
    written = []
    for name in TINY_NAMES:
        folder = out / name
        if force or not (folder / "model_index.json").is_file():
            writers[name](folder)
        written.append(folder)
    return written


def main(argv: list[str] | None = None) -> None:
    summary = (__doc__ or "").split("\n\n")[0]
    parser = argparse.ArgumentParser(prog="python -m train.tiny", description=summary)
    parser.add_argument(
        "--out", type=Path, default=Path("weights"), help="folder to write into (default: weights)"
    )
    parser.add_argument("--force", action="store_true", help="rewrite folders that already exist")
    args = parser.parse_args(argv)
    for folder in write_all(args.out, force=args.force):
        print(folder)


if __name__ == "__main__":
    main()
