"""Data parallel on the CPU (gloo): both processes end with identical weights, and the run computes
what one process with the same global batch computes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from safetensors.torch import load_file

from conftest import ROOT, quick_spec, train_quietly
from train.progress import parse_progress_line


def test_two_processes_match_one_with_the_same_global_batch(tiny_weights, sample_dataset, tmp_path):
    # fp32 files: the two runs' weights differ by float32 summation order, which a bf16 export would
    # round to a whole bf16 step now and then
    extra = {"validation.num_inference_steps": 2, "export.dtype": "fp32"}
    fields = dict(steps=8, caption_dropout=0.2, learning_rate=3e-3, **extra)
    # with the methods that add work to a step: output preservation (its passes go around the DDP
    # wrapper, its gradient through DDP's all-reduce) and the moving average of the weights
    fields.update(trigger_word="sks", preservation={"class_word": "plain"}, ema={"decay": 0.8})
    two = quick_spec(tiny_weights, "flux-dev", batch_size=1, **fields)  # 2 processes x 1 image
    one = quick_spec(tiny_weights, "flux-dev", batch_size=2, **fields)  # 1 process x 2 images

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "--num-processes",
            "2",
            "--spec",
            two.to_json(),
            "--data",
            str(sample_dataset),
            "--out",
            str(tmp_path / "ddp"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sums = dict(re.findall(r"data parallel: process (\d) final weights sha256 (\w+)", proc.stdout))
    assert set(sums) == {"0", "1"}, proc.stdout[-2000:]
    assert sums["0"] == sums["1"], "the two processes ended with different weights"

    single, _ = train_quietly(one, sample_dataset, tmp_path / "single")
    ddp_losses = [
        r["loss"] for r in map(parse_progress_line, proc.stdout.splitlines()) if r and r["phase"] == "train"
    ]
    single_losses = [v for _, v in single.losses]
    assert len(ddp_losses) == len(single_losses) == 8
    # Same global batches and the same random draws, so only float summation order differs
    # (DDP averages two per-process means; one process averages two items): the curves agree
    # to float32 rounding, far below the loss's step-to-step noise (~0.1).
    for a, b in zip(ddp_losses, single_losses, strict=True):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), (ddp_losses, single_losses)
    wa = load_file(str(tmp_path / "ddp" / "pytorch_lora_weights.safetensors"))
    wb = load_file(str(single.lora_file))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
    config = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert config["processes"] == 2
