"""Tiny random Z-Image pipelines (turbo: shift 3, no CFG; base: the same layout, rendered with CFG).

Qwen3 text encoder (``Qwen3Model``, the pipeline reads its second-to-last hidden state), a KL
VAE with the real 8x downsampling and the Flux VAE's scale and shift (4 channels here, 16 in the
real one), the single-stream S3-DiT with its noise and context refiners. The tokenizer is the Qwen2 byte-level BPE of
``train/models/qwen_image/tiny.py`` with Qwen3's chat template (the pipeline applies it).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel
from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
from transformers import Qwen3Config, Qwen3Model

from ..qwen_image.tiny import write_qwen_tokenizer
from ..tiny_common import vae

QWEN3_HIDDEN = 32  # -> the transformer's cap_feat_dim
# Qwen3's chat template, reduced to what the pipeline uses: messages, the generation prompt, and
# the empty think block Qwen3 adds when enable_thinking is false (the pipeline passes true).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def write_tiny_z_image(folder: Path, shift: float = 3.0) -> Path:
    """Write a tiny Z-Image pipeline; ``shift`` is its scheduler's fixed timestep shift."""
    torch.manual_seed(0)
    folder = Path(folder)
    tok = write_qwen_tokenizer(folder / "tokenizer", chat_template=QWEN3_CHAT_TEMPLATE)
    n = len(tok)
    text_encoder = Qwen3Model(
        Qwen3Config(
            vocab_size=n,
            hidden_size=QWEN3_HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=2048,
            bos_token_id=n - 3,  # <|endoftext|>
            eos_token_id=n - 1,  # <|im_end|>
            pad_token_id=n - 3,
        )
    )
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=QWEN3_HIDDEN,
        axes_dims=[8, 4, 4],
        axes_lens=[1024, 64, 64],  # the real model's text axis (1024 positions) bounds the prompt
    )
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False
        ),
        vae=vae(
            4, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False
        ),
        text_encoder=text_encoder,
        tokenizer=tok,  # pyright: ignore[reportArgumentType]  (annotated AutoTokenizer; any tokenizer works)
        transformer=transformer,
    )
    pipe.save_pretrained(folder)
    return folder


def write(folder: Path, shift: float = 3.0) -> Path:
    return write_tiny_z_image(folder, shift)
