"""A tiny random Krea 2 pipeline: a Qwen3-VL text encoder (two of its hidden states tapped), the
Qwen-Image VAE's layout, the single-stream DiT with its text-fusion stage.

The tokenizer is ``train/models/qwen_image/tiny.py``'s (Krea 2 uses Qwen-Image's prompt template,
whose 34-token system prefix the pipeline drops by position); the scheduler has Krea 2's
resolution-aware shift (``max_image_seq_len`` 6400).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.models.transformers.transformer_krea2 import Krea2Transformer2DModel
from diffusers.pipelines.krea2.pipeline_krea2 import Krea2Pipeline
from transformers import Qwen3VLConfig, Qwen3VLModel

from ..qwen_image.tiny import Z_DIM, _check_template, qwen_vae, write_qwen_tokenizer
from ..tiny_common import dynamic_shift_scheduler

HIDDEN = 32  # the tiny Qwen3-VL's width -> the transformer's text_hidden_dim
TAPPED = (1, 2)  # hidden states the pipeline stacks (the real one taps 12 of Qwen3-VL-4B's 37)


def qwen3_vl_config(
    vocab_size: int,
    vision_start_token_id: int = 0,
    vision_end_token_id: int = 1,
    image_token_id: int = 2,
    video_token_id: int = 3,
) -> Qwen3VLConfig:
    """A 2-layer Qwen3-VL of width ``HIDDEN`` (its vision tower shrunk too; unused for text), with
    the image / video placeholders' ids (default: ids inside the tiny vocabulary no prompt uses)."""
    return Qwen3VLConfig(
        text_config={
            "hidden_size": HIDDEN,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "vocab_size": vocab_size,
            "max_position_embeddings": 2048,
            "pad_token_id": vocab_size - 3,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
            },
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": HIDDEN,
            "deepstack_visual_indexes": [0],
        },
        vision_start_token_id=vision_start_token_id,
        vision_end_token_id=vision_end_token_id,
        image_token_id=image_token_id,
        video_token_id=video_token_id,
    )


def write_tiny_krea2(folder: Path) -> Path:
    torch.manual_seed(0)
    folder = Path(folder)
    tok = write_qwen_tokenizer(folder / "tokenizer")
    _check_template(tok)
    transformer = Krea2Transformer2DModel(
        in_channels=Z_DIM * 4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        timestep_embed_dim=32,
        text_hidden_dim=HIDDEN,
        num_text_layers=len(TAPPED),
        text_num_attention_heads=2,
        text_num_key_value_heads=2,
        text_intermediate_size=64,
        num_layerwise_text_blocks=1,
        num_refiner_text_blocks=1,
        axes_dims_rope=(4, 6, 6),
    )
    pipe = Krea2Pipeline(
        scheduler=dynamic_shift_scheduler(max_image_seq_len=6400, max_shift=1.15),
        vae=qwen_vae(),
        text_encoder=Qwen3VLModel(qwen3_vl_config(len(tok))),
        tokenizer=tok,  # pyright: ignore[reportArgumentType]  (annotated AutoTokenizer; any tokenizer works)
        transformer=transformer,
        text_encoder_select_layers=TAPPED,
    )
    pipe.save_pretrained(folder)
    return folder


def write(folder: Path) -> Path:
    return write_tiny_krea2(folder)
