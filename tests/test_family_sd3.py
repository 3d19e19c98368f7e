"""Stable Diffusion 3.5 (Large, Medium), what the family contract (tests/test_family_contract.py)
does not cover: the default LoRA reaches MMDiT-X's second attention (Medium only), ``auto`` noise
levels are SD3's shifted logit-normal, the sequence is 77 CLIP + the T5 tokens, and full fine-tunes
are allowed (Medium) or refused naming the size (Large)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import quick_spec, train_quietly
from train.families import model_info
from train.models.base import BatchRandom
from train.models.flow import scheduler_shift, shifted
from train.models.sd3.family import Sd3Family
from train.spec import SpecError, parse_spec

MODELS = ["sd3.5-large", "sd3.5-medium"]
PROMPT = "sks, a red circle"


def _stock(base, lora_dir=None, seed: int = 3, steps: int = 2, guidance: float | None = None) -> np.ndarray:
    """What a user gets from the stock pipeline (with ``load_lora_weights`` where a LoRA is given)."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir)
    out = pipe(
        PROMPT,
        num_inference_steps=steps,
        height=64,
        width=64,
        guidance_scale=guidance if guidance is not None else 3.5,
        max_sequence_length=256,
        generator=torch.Generator().manual_seed(seed),
    )
    return np.asarray(out.images[0].convert("RGB")).astype(int)  # pyright: ignore[reportAttributeAccessIssue]


@pytest.mark.parametrize("model", MODELS)
def test_the_default_lora_and_the_sequence_are_sd3_s(tiny_weights, model):
    from train.loop import make_trainable

    spec = quick_spec(tiny_weights, model)
    family = Sd3Family(spec, tiny_weights / model_info(model).tiny_name)
    family.load(torch.float32)
    names = [n for n, p in family.denoiser.named_parameters() if p.requires_grad and "lora_A" in n]
    assert names == []
    make_trainable(spec, family.denoiser)
    names = [n for n, p in family.denoiser.named_parameters() if p.requires_grad and "lora_A" in n]
    assert any(".ff_context." in n for n in names) and any(".ff." in n for n in names)
    assert any(".attn2." in n for n in names) == (model == "sd3.5-medium")  # MMDiT-X's second attention
    # auto: logit-normal sigmas moved by the scheduler's shift (3.0): median shifted(0.5, 3) = 0.75
    rng = BatchRandom(torch.Generator().manual_seed(1), 20000, 0, 20000, torch.device("cpu"))
    assert scheduler_shift(family.pipe.scheduler.config, 16) == 3.0
    assert abs(float(family.sample_sigmas(rng, 16).median()) - float(shifted(torch.tensor(0.5), 3.0))) < 0.01
    (text,) = family.encode_prompts([PROMPT], torch.device("cpu"))
    assert text["prompt_embeds"].shape[0] == 77 + 256  # CLIP tokens, then T5 tokens


def test_full_fine_tune_of_medium_exports_a_loadable_pipeline_and_large_is_refused(
    tiny_weights, sample_dataset, tmp_path
):
    base = tiny_weights / model_info("sd3.5-medium").tiny_name
    spec = quick_spec(tiny_weights, "sd3.5-medium", mode="full", steps=2, learning_rate=1e-3)
    result, _ = train_quietly(spec, sample_dataset, tmp_path / "out")
    assert result is not None
    folder = result.weights[0]
    assert folder == tmp_path / "out" / "model" and (folder / "model_index.json").is_file()
    assert np.abs(_stock(folder) - _stock(base)).max() > 0, "the fine-tuned model renders like the base"
    with pytest.raises(SpecError, match=r"full fine-tune of sd3\.5-large is refused: .*8\.1 B.*80 GB"):
        parse_spec({"model": "sd3.5-large", "mode": "full"})
