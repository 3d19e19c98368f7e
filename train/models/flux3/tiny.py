"""A tiny random FLUX.3 [klein] pipeline (base or step-distilled), saved as diffusers saves a
modular pipeline: ``modular_model_index.json`` and one folder per component.

- the text encoder is a Qwen3-VL (``Qwen3VLForConditionalGeneration``) of 32 narrow layers, as
  deep as the pipeline's default ``text_encoder_out_layers`` (4, 8, ..., 32) reads; its processor is
  ``train/models/qwen_image_edit/tiny.py``'s (no torchvision) with Qwen-Image 2.1's Qwen3-VL chat
  template;
- the VAE is Flux.2's (``train/models/flux2/tiny.py``, batch-norm latent statistics);
- the transformer keeps every stream (image, reference, text per-mode blocks; joint single blocks);
  the distilled one is a flow map (``flow_map``).

The scheduler, guider and image processor are not saved: the pipeline's blocks create them from
their own configuration (the constant shift 6.93, CFG 3.5), as for the published model. The index
points each component at the registry's Hub id, as a downloaded repo's does; diffusers loads
components whose files are present from the local folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.models.transformers.transformer_flux3 import Flux3Transformer2DModel
from diffusers.modular_pipelines.flux3.modular_blocks_flux3 import Flux3AutoBlocks
from diffusers.modular_pipelines.flux3.modular_blocks_flux3_distilled import Flux3DistilledAutoBlocks
from transformers import Qwen2VLImageProcessorPil

from ...weights import point_modular_index
from ..flux2.tiny import flux2_vae
from ..krea2.tiny import HIDDEN
from ..qwen_image21.tiny import CHAT_TEMPLATE, text_encoder
from ..qwen_image_edit.tiny import MAX_PIXELS, MIN_PIXELS, TinyQwen2VLProcessor, write_edit_tokenizer

TEXT_LAYERS = 32  # the deepest hidden state the pipeline stacks by default
STACKED = 8  # hidden states stacked per token: joint_attention_dim = 8 x the encoder's width
LATENT_CHANNELS = 4  # the tiny Flux.2 VAE's; 16 after the 2x2 patchify


def write(folder: Path, distilled: bool = False) -> Path:
    from .. import flux3

    torch.manual_seed(0)
    folder = Path(folder)
    tok = write_edit_tokenizer(folder / "tokenizer")
    processor = TinyQwen2VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
        tokenizer=tok,
        chat_template=CHAT_TEMPLATE,
    )
    encoder = text_encoder(tok)
    setattr(encoder.config.text_config, "num_hidden_layers", TEXT_LAYERS)  # noqa: B010  (a typed config)
    encoder = type(encoder)(encoder.config)  # rebuilt at the new depth, seeded
    transformer = Flux3Transformer2DModel(
        in_channels=LATENT_CHANNELS * 4,
        cond_in_channels=LATENT_CHANNELS * 4,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=STACKED * HIDDEN,
        timestep_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        flow_map=distilled,
    )
    blocks = (Flux3DistilledAutoBlocks if distilled else Flux3AutoBlocks)()
    blocks.sub_blocks.pop("prompt_upsampler")  # a separate VLM the published repo ships; not built here
    pipe = blocks.init_pipeline()
    pipe.update_components(
        text_encoder=encoder, tokenizer=processor, vae=flux2_vae(), transformer=transformer
    )
    pipe.save_pretrained(str(folder), overwrite_modular_index=True)
    info = flux3.FLUX3_KLEIN_DISTILLED if distilled else flux3.FLUX3_KLEIN
    point_modular_index(folder, info.base_weights)  # as a downloaded repo's index points at the Hub
    return folder
