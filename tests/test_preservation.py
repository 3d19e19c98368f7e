"""Output preservation: on the class-word prompt the LoRA is trained toward the base model (the same
denoiser with its LoRA switched off), so a character or style LoRA leaves the class alone while its
trigger word still works."""

from __future__ import annotations

import shutil
import statistics

import numpy as np
import pytest
import torch

from conftest import quick_spec, train_quietly
from train.progress import parse_progress_line
from train.spec import SpecError, parse_spec

# Captions of the trigger word alone: the preservation prompt is then the class word alone. (With the
# sample set's long captions the tiny model's 32 T5 tokens end before the trigger word, and its one
# differing character token is too little for a tiny random model to tell the prompts apart.)
TRIGGER_PROMPT, CLASS_PROMPT = "sks", "plain"


def _render(base, lora_dir, prompt: str) -> np.ndarray:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir)
    image = pipe(
        prompt,
        num_inference_steps=2,
        height=64,
        width=64,
        max_sequence_length=64,
        output_type="np",
        generator=torch.Generator().manual_seed(3),
    ).images[0]
    return np.asarray(image, dtype=np.float64)


def test_preservation_keeps_the_class_prompt_while_the_trigger_word_still_changes(
    tiny_weights, sample_dataset, tmp_path
):
    data = tmp_path / "data"
    data.mkdir()
    for image in sorted(sample_dataset.glob("*.png")):
        shutil.copy(image, data / image.name)
        (data / f"{image.stem}.txt").write_text(TRIGGER_PROMPT)
    common = {
        "steps": 80,
        "learning_rate": 1e-2,
        "trigger_word": "sks",
        "lora.rank": 8,
        "flow.max_sequence_length": 64,  # renders below use the same
    }
    plain, plain_log = train_quietly(quick_spec(tiny_weights, **common), data, tmp_path / "plain")
    spec = quick_spec(tiny_weights, **common, preservation={"class_word": "plain", "weight": 1.0})
    kept, kept_log = train_quietly(spec, data, tmp_path / "kept")

    base = tiny_weights / "tiny-flux-dev"
    before = {p: _render(base, None, p) for p in (CLASS_PROMPT, TRIGGER_PROMPT)}
    moved = {
        name: {p: float(np.abs(_render(base, out, p) - before[p]).mean()) for p in before}
        for name, out in (("plain", tmp_path / "plain"), ("kept", tmp_path / "kept"))
    }
    cost = _mean_step_s(kept_log) / _mean_step_s(plain_log)
    print(f"mean change of the render (0-1 scale): {moved}; time a step with preservation: {cost:.2f}x")
    assert moved["kept"][CLASS_PROMPT] < 0.5 * moved["plain"][CLASS_PROMPT], moved
    assert moved["kept"][TRIGGER_PROMPT] > 0.6 * moved["plain"][TRIGGER_PROMPT], moved


def _mean_step_s(log: str) -> float:
    rows = [r for r in map(parse_progress_line, log.splitlines()) if r and r.get("phase") == "train"]
    return statistics.median(r["s_per_step"] for r in rows[1:])


def test_preservation_settings_are_checked_together():
    with pytest.raises(SpecError) as err:
        parse_spec(
            {
                "model": "flux1-kontext-dev",
                "preservation": {"class_word": "person"},
                "speed": {"fuse_lora": "on"},
            }
        )
    text = str(err.value)
    assert "needs a trigger_word" in text and "takes control images" in text and "speed.fuse_lora off" in text
