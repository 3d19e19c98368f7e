"""FLUX.3 [klein] beyond the family contract: prompts of different lengths in one batch, the model
card's snippet for a modular pipeline, and a full fine-tune's folder in diffusers' modular layout."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_rows_predict_as_alone, quick_spec, run_entry_render, stock_render, train_quietly
from train.models import family_class
from train.spec import parse_spec
from train.weights import point_modular_index

SHORT = "sks, a red circle"
LONG = (  # past 80 tokens with the chat template: two blocks of 80
    "sks, a red circle on a pale blue ground, drawn with a thick brush, a soft shadow under it, "
    "evening light from the left, grain of old paper"
)


def test_prompts_of_different_lengths_in_one_batch_train_as_each_alone(tiny_weights):
    """The transformer sees no text mask and the pipeline encodes one prompt at a time, padded to
    its own multiple of 80 tokens: a batch's shorter prompt must not be conditioned on padding the
    pipeline never gives it. Each row of a mixed batch predicts as that row alone."""
    base = tiny_weights / "tiny-flux3-klein"
    family = family_class("flux3-klein")(
        parse_spec({"model": "flux3-klein", "base_weights": str(base)}), base
    )
    family.load(torch.float32)
    texts = family.encode_prompts([SHORT, LONG], torch.device("cpu"))
    assert [t["prompt_embeds"].shape[0] for t in texts] == [80, 160]  # multiples of 80
    assert_rows_predict_as_alone(family, texts)


def _card_snippet(out: Path, base: Path) -> str:
    """The model card's python block, pointed at this run's folders, on the CPU."""
    card = (out / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S)
    assert code is not None, card
    text = code.group(1).replace('pipe.to("cuda")', "").replace("torch.bfloat16", "torch.float32")
    text = text.replace("path/to/this/folder", str(out))
    return re.sub(
        r'from_pretrained\("[^"]+"\)|init_pipeline\("[^"]+"\)',
        lambda m: m.group(0).split('"')[0] + f'"{base}")',
        text,
    )


def test_the_model_card_snippet_renders_the_lora_with_the_modular_pipeline(
    tiny_weights, sample_dataset, tmp_path
):
    base = tiny_weights / "tiny-flux3-klein-distilled"
    spec = quick_spec(tiny_weights, "flux3-klein-distilled", steps=4, learning_rate=3e-2, trigger_word="sks")
    result, _ = train_quietly(spec, sample_dataset, tmp_path / "out")
    assert result is not None
    snippet = _card_snippet(tmp_path / "out", base)
    assert 'sub_blocks.pop("prompt_upsampler")' in snippet and "load_lora_weights" in snippet
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102  (the card's own code, as a user pastes it)
    assert scope["image"].size == (1024, 1024)  # the pipeline's default size: the card passes none
    assert scope["pipe"].transformer.peft_config, "the card's snippet did not load the LoRA"


def test_a_full_fine_tune_is_a_modular_pipeline_folder_that_renders(
    tiny_weights, sample_dataset, tmp_path, monkeypatch
):
    base = tiny_weights / "tiny-flux3-klein"
    spec = quick_spec(tiny_weights, "flux3-klein", mode="full", steps=6, learning_rate=1e-3)
    result, _ = train_quietly(spec, sample_dataset, tmp_path / "out")
    folder = result.weights[0]
    assert (folder / "modular_model_index.json").is_file() and not (folder / "model_index.json").exists()
    # the index still names the Hub repo (a copy of the base's): diffusers loads the files present here
    tuned = stock_render("flux3-klein", folder)
    assert np.abs(tuned - stock_render("flux3-klein", base)).max() > 2, "the fine-tune renders like the base"
    via_run_entry = run_entry_render("flux3-klein", base, tmp_path / "out", tmp_path / "run", monkeypatch)
    assert np.abs(via_run_entry - tuned).max() <= 2

    # published to the Hub, the index names the repo for every component uploaded (loaded by its id,
    # diffusers would otherwise fetch the base's transformer); a local copy still loads locally
    point_modular_index(folder, "me/my-flux3")
    index = json.loads((folder / "modular_model_index.json").read_text())
    sources = {k: v[2]["pretrained_model_name_or_path"] for k, v in index.items() if isinstance(v, list)}
    assert sources == dict.fromkeys(["text_encoder", "tokenizer", "transformer", "vae"], "me/my-flux3")
    assert np.abs(stock_render("flux3-klein", folder) - tuned).max() == 0


def test_a_component_that_fails_to_load_is_named(tiny_weights, tmp_path):
    """diffusers' modular loader logs a component that fails to load and leaves it None; loading
    fails at once, naming it, not later at the first use of a missing transformer."""
    from train.models.flux3.family import Flux3Pipeline
    from train.weights import WeightsError

    broken = tmp_path / "broken"
    shutil.copytree(tiny_weights / "tiny-flux3-klein", broken)
    for f in (broken / "transformer").glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="transformer did not load"):
        Flux3Pipeline.from_pretrained(broken, torch.float32)
