"""FLUX.3 [klein] beyond the family contract: prompts of different lengths in one batch, the model
card's snippet for a modular pipeline, and a full fine-tune's folder in diffusers' modular layout."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from diffusers.modular_pipelines.flux3.encoders import Flux3TextEncoderStep

from conftest import quick_spec, run_entry_render, stock_render, train_quietly
from train.cache import _stack_rows
from train.models import family_class
from train.models.flux3.family import OUT_LAYERS, _repeat_last_rows
from train.spec import parse_spec

SHORT = "sks, a red circle"
LONG = (  # past 80 tokens with the chat template: two blocks of 80
    "sks, a red circle on a pale blue ground, drawn with a thick brush, a soft shadow under it, "
    "evening light from the left, grain of old paper"
)


def test_a_shorter_prompt_in_a_batch_gets_the_rows_a_longer_padding_gives(tiny_weights):
    """The transformer sees no mask, so a batch's shorter prompt must be padded as the text encoder
    pads: the family repeats its pad token's state, which equals encoding it at the longer length."""
    base = tiny_weights / "tiny-flux3-klein"
    family = family_class("flux3-klein")(
        parse_spec({"model": "flux3-klein", "base_weights": str(base)}), base
    )
    family.load_encoders(torch.float32)
    short, long = (t["prompt_embeds"] for t in family.encode_prompts([SHORT, LONG], torch.device("cpu")))
    assert short.shape[0] == 80 and long.shape[0] == 160, (short.shape, long.shape)  # multiples of 80

    batch = _repeat_last_rows(_stack_rows([short, long]))  # as the cache's collate stacks them
    longer = Flux3TextEncoderStep._get_qwen3_vl_prompt_embeds(
        family.pipe.text_encoder,
        family.pipe.tokenizer,
        SHORT,
        torch.device("cpu"),
        pad_multiple=160,
        hidden_states_layers=OUT_LAYERS,
    )[0]
    torch.testing.assert_close(batch[0], longer)
    torch.testing.assert_close(batch[1], long)


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
