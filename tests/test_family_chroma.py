"""Chroma, what the family contract (tests/test_family_contract.py) does not cover: its ``auto``
noise levels (its own density, moved by the pipeline's shift), and the text mask kept under
gradient checkpointing (diffusers drops it there); a full fine-tune is refused naming the size."""

from __future__ import annotations

import pytest
import torch

from conftest import quick_spec
from train.families import model_info
from train.models.base import Batch, BatchRandom
from train.models.chroma.family import ChromaFamily
from train.models.flow import scheduler_shift, shifted
from train.spec import SpecError, parse_spec

PROMPT = "sks, a red circle"


def _batch(family, texts, image_side: int = 64) -> Batch:
    pixels = (
        torch.rand(len(texts), 3, image_side, image_side, generator=torch.Generator().manual_seed(0)) * 2 - 1
    )
    mean, std = family.encode_images(pixels)
    text = {k: torch.stack([t[k] for t in texts]) for k in texts[0]}
    rng = BatchRandom(torch.Generator().manual_seed(0), len(texts), 0, len(texts), torch.device("cpu"))
    return Batch(mean, std * 0, text, torch.zeros(len(texts), 6), rng)


def test_auto_noise_levels_are_chroma_s_density_moved_by_the_pipeline_s_shift(tiny_weights):
    base = tiny_weights / model_info("chroma").tiny_name
    family = ChromaFamily(quick_spec(tiny_weights, "chroma"), base)
    family.load_encoders(torch.float32)
    rng = BatchRandom(torch.Generator().manual_seed(1), 20000, 0, 20000, torch.device("cpu"))
    median = float(family.sample_sigmas(rng, 16).median())  # the density's median is 0.5
    assert (
        abs(median - float(shifted(torch.tensor(0.5), scheduler_shift(family.pipe.scheduler.config, 16))))
        < 0.01
    )


def test_gradient_checkpointing_keeps_the_text_mask(tiny_weights):
    """diffusers drops the mask when it checkpoints a single block; the family puts it back."""
    family = ChromaFamily(quick_spec(tiny_weights, "chroma"), tiny_weights / model_info("chroma").tiny_name)
    family.load(torch.float32)
    texts = family.encode_prompts([PROMPT, "a blue square on a white background"], torch.device("cpu"))
    model = family.pipe.transformer  # a ChromaTransformer2DModel (Family.denoiser says only Module)
    model.train()
    plain = family.loss(model, _batch(family, texts))
    model.enable_gradient_checkpointing()
    checkpointed = family.loss(model, _batch(family, texts))
    torch.testing.assert_close(checkpointed, plain)


def test_full_fine_tune_is_refused_naming_the_size():
    with pytest.raises(SpecError, match=r"full fine-tune of chroma is refused: .*8\.9 B.*80 GB"):
        parse_spec({"model": "chroma", "mode": "full"})
