"""Tiny random HiDream-I1 pipelines (full: UniPC with flow sigmas and CFG; dev and fast: the
few-step flow-matching LCM scheduler, no CFG).

Four text encoders as the real pipeline has them — two CLIPs with projection (pooled), a T5, and a
Llama whose every hidden state the pipeline stacks — a KL VAE with the Flux.1 VAE's scale and shift
(4 channels here, 16 in the real one), and the sparse MoE DiT. The CLIPs take 248 positions, as
HiDream's do (the pipeline pads their prompts to ``max_sequence_length`` up to 218).

The pipeline scales every render to the area of a 128 x 128 latent (``default_sample_size``,
whatever size is asked). Two sizes are shrunk so a render stays cheap on a CPU while the code paths
stay the real ones: the VAE downsamples 2x, not 8x (it decodes 256 x 256 images, not 1024 x 1024:
26 s each in bf16), and the transformer's patches are 8 x 8 latent pixels, not 2 x 2 (256 tokens a
render, not 4096). The family reads both from the configs, as it does for the real model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.transformers.transformer_hidream_image import HiDreamImageTransformer2DModel
from diffusers.pipelines.hidream_image.pipeline_hidream_image import HiDreamImagePipeline
from diffusers.schedulers.scheduling_flow_match_lcm import FlowMatchLCMScheduler
from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler
from transformers import (
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Tokenizer,
)

from ..flux2.tiny import write_mistral_tokenizer
from ..tiny_common import (
    CLIP_HIDDEN,
    T5_DMODEL,
    clip_config,
    t5_encoder,
    write_clip_tokenizer,
    write_t5_tokenizer,
)

CLIP_POSITIONS = 248
LLAMA_HIDDEN = 32
LLAMA_LAYERS = 2  # the pipeline stacks hidden_states[1:]: one per decoder layer


def clip(vocab: int) -> CLIPTextModelWithProjection:
    config = clip_config(vocab)
    config.max_position_embeddings = CLIP_POSITIONS
    return CLIPTextModelWithProjection(config)


def llama(vocab: int) -> LlamaForCausalLM:
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=LLAMA_HIDDEN,
            intermediate_size=64,
            num_hidden_layers=LLAMA_LAYERS,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=512,
            bos_token_id=0,
            eos_token_id=1,
        )
    )


def small_vae() -> AutoencoderKL:
    """A 2-level KL VAE (2x), with the Flux.1 VAE's scaling and shift factors."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2,  # pyright: ignore[reportArgumentType]
        up_block_types=("UpDecoderBlock2D",) * 2,  # pyright: ignore[reportArgumentType]
        block_out_channels=(8, 16),  # pyright: ignore[reportArgumentType]
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )


def scheduler(variant: str) -> UniPCMultistepScheduler | FlowMatchLCMScheduler:
    """HiDream-ai's scheduler configs: full UniPC with flow sigmas (shift 3); dev (shift 6) and fast
    (shift 3) the flow-matching LCM scheduler."""
    if variant == "full":
        return UniPCMultistepScheduler(
            num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
        )
    return FlowMatchLCMScheduler(num_train_timesteps=1000, shift=6.0 if variant == "dev" else 3.0)


def write_tiny_hidream(folder: Path, variant: str = "full") -> Path:
    torch.manual_seed(0)
    folder = Path(folder)
    clip_vocab = write_clip_tokenizer(folder / "tokenizer")
    write_clip_tokenizer(folder / "tokenizer_2")
    t5_vocab = write_t5_tokenizer(folder / "tokenizer_3")
    llama_tok = write_mistral_tokenizer(folder / "tokenizer_4")
    transformer = HiDreamImageTransformer2DModel(
        patch_size=8,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_channels=[T5_DMODEL, LLAMA_HIDDEN],
        text_emb_dim=2 * CLIP_HIDDEN,
        num_routed_experts=4,
        num_activated_experts=2,
        axes_dims_rope=(4, 2, 2),  # pyright: ignore[reportArgumentType]  (annotated as two; one per id axis)
        max_resolution=(128, 128),  # the real one's: a non-square image pads to 256 tokens here
        llama_layers=[0, 1],  # one per block (the real model's 48 draw on Llama's 32 layers)
    )
    pipe = HiDreamImagePipeline(
        scheduler=scheduler(variant),  # pyright: ignore[reportArgumentType]  (either kind works)
        vae=small_vae(),
        text_encoder=clip(clip_vocab),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer", model_max_length=CLIP_POSITIONS),
        text_encoder_2=clip(clip_vocab),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2", model_max_length=CLIP_POSITIONS),
        text_encoder_3=t5_encoder(t5_vocab),
        tokenizer_3=T5Tokenizer.from_pretrained(folder / "tokenizer_3"),
        text_encoder_4=llama(len(llama_tok)),
        tokenizer_4=PreTrainedTokenizerFast.from_pretrained(folder / "tokenizer_4"),
        transformer=transformer,
    )
    pipe.save_pretrained(folder)
    return folder


def write(folder: Path, variant: str = "full") -> Path:
    return write_tiny_hidream(folder, variant)
