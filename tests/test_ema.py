"""ema: the delivered LoRA is an exponential moving average of the trained weights (diffusers'
EMAModel), kept in checkpoints so that a resumed run ends exactly as an uninterrupted one."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from safetensors.torch import load_file

from conftest import quick_spec, train_quietly
from train.spec import SpecError, parse_spec

DECAY, START = 0.8, 2


def _decay(step: int) -> float:
    """The past's weight at optimizer step ``step`` (1-based), written out from the documented rule:
    the average follows the weights up to ``start_step + 1``, then min(decay, (1 + j) / (10 + j))."""
    j = step - START - 1
    return 0.0 if j <= 0 else min(DECAY, (1 + j) / (10 + j))


def test_the_delivered_lora_is_the_moving_average_of_every_step_s_weights(
    tiny_weights, sample_dataset, tmp_path
):
    steps = 12
    spec = quick_spec(
        tiny_weights,
        "flux-dev",
        steps=steps,
        learning_rate=1e-2,
        checkpoint_interval=1,  # each step's own weights, saved
        resumable=True,  # and the last step's
        ema={"decay": DECAY, "start_step": START},
        export={"dtype": "fp32"},
    )
    result, log = train_quietly(spec, sample_dataset, tmp_path / "out")
    assert "ema: the delivered weights are a moving average (decay 0.8 from step 2)" in log
    out = tmp_path / "out"
    raw = [
        load_file(str(out / "checkpoints" / f"step-{k:06d}" / "trainable.safetensors"))
        for k in range(1, steps)
    ]
    raw.append(load_file(str(out / "resume" / "trainable.safetensors")))
    average = {k: v.clone() for k, v in raw[0].items()}
    for step, weights in enumerate(raw[1:], start=2):
        d = _decay(step)
        average = {k: d * average[k] + (1 - d) * weights[k] for k in average}

    delivered = load_file(str(result.lora_file))
    assert set(delivered) == {f"transformer.{k}" for k in average}
    worst = max((delivered[f"transformer.{k}"] - v).abs().max().item() for k, v in average.items())
    assert worst <= 1e-6, f"the delivered LoRA is not the moving average (off by {worst})"
    last = load_file(str(out / "steps" / f"raw-step-{steps}" / "pytorch_lora_weights.safetensors"))
    moved = max((last[k] - delivered[k]).abs().max().item() for k in delivered)
    assert moved > 1e-3, "the average equals the last step's weights: it averaged nothing"
    assert max((last[f"transformer.{k}"] - v).abs().max().item() for k, v in raw[-1].items()) == 0


def test_resume_with_ema_ends_as_an_uninterrupted_run(tiny_weights, sample_dataset, tmp_path):
    from train.checkpoint import CheckpointError
    from train.loop import run_training

    spec = quick_spec(tiny_weights, "sdxl", steps=6, checkpoint_interval=3, ema={"decay": 0.7})
    straight, _ = train_quietly(spec, sample_dataset, tmp_path / "straight")
    ckpt = tmp_path / "straight" / "checkpoints" / "step-000003"
    with contextlib.redirect_stdout(io.StringIO()):
        resumed = run_training(spec, sample_dataset, tmp_path / "resumed", resume_from=ckpt)
    a, b = load_file(str(straight.lora_file)), load_file(str(resumed.lora_file))
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6
    renders = [np.asarray(__import__("PIL.Image").Image.open(r.samples[-1])) for r in (straight, resumed)]
    assert np.array_equal(*renders), "the resumed run's last validation render differs"

    without = quick_spec(tiny_weights, "sdxl", steps=6)
    with pytest.raises(CheckpointError, match="ema"):
        run_training(without, sample_dataset, tmp_path / "other", resume_from=ckpt)


def test_ema_is_refused_for_a_full_fine_tune_naming_the_field():
    with pytest.raises(SpecError, match=r"ema\.decay: needs mode lora"):
        parse_spec({"mode": "full", "ema": {"decay": 0.99}, "publish": {"hub_model_id": "a/b"}})
    with pytest.raises(SpecError, match=r"ema\.decay"):
        parse_spec({"ema": {"decay": 1.0}})
