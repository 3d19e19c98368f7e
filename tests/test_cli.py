"""``python -m train``: the main-job command prints where the outputs are; bad input exits 2 with the reason."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import ROOT


def _run(args, tiny_weights, cwd):
    env = {**os.environ, "ADVANCED_TRAINER_WEIGHTS": str(tiny_weights), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "train", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def test_demo_command_trains_and_prints_outputs(tiny_weights, tmp_path):
    """What `make demo` runs, with the tiny weights from this test session."""
    proc = _run(
        [
            "--spec",
            str(ROOT / "examples" / "demo-spec.json"),
            "--data",
            str(ROOT / "examples" / "sample-dataset"),
            "--out",
            str(tmp_path / "demo"),
            "--set",
            "steps=6",
            "--set",
            "validation.interval=3",
        ],
        tiny_weights,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = dict(
        line.split(":", 1)
        for line in proc.stdout.splitlines()
        if line.startswith(("LoRA", "loss plot", "validation images"))
    )
    assert Path(lines["LoRA (diffusers)"].strip()).is_file()
    assert "LoRA (kohya)" not in lines  # FLUX.1: the diffusers file is the one ComfyUI reads (export.kohya)
    assert Path(lines["loss plot"].strip()).is_file()
    images = [Path(p.strip()) for p in lines["validation images"].split(",")]
    assert len(images) == 4 and all(p.is_file() for p in images)


def test_bad_spec_exits_2_naming_every_field(tiny_weights, tmp_path):
    proc = _run(
        [
            "--data",
            str(ROOT / "examples" / "sample-dataset"),
            "--out",
            str(tmp_path / "o"),
            "--set",
            "steps=-1",
            "--set",
            "model=sd15",
            "--set",
            "lora.rank=0",
        ],
        tiny_weights,
        tmp_path,
    )
    assert proc.returncode == 2
    for field in ("steps:", "model:", "lora.rank:"):
        assert field in proc.stderr
    assert not (tmp_path / "o").exists(), "a bad spec must fail before anything is written"


def test_unsafe_archive_exits_2_naming_the_entry(tiny_weights, tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../../escape.txt", "x")
    proc = _run(
        ["--data", str(archive), "--out", str(tmp_path / "job"), "--set", "base_weights=tiny-flux-dev"],
        tiny_weights,
        tmp_path,
    )
    assert proc.returncode == 2
    assert "../../escape.txt" in proc.stderr and "traversal" in proc.stderr
    assert not list(tmp_path.rglob("escape.txt"))


def test_missing_base_weights_say_what_to_provide(tiny_weights, tmp_path):
    proc = _run(
        [
            "--data",
            str(ROOT / "examples" / "sample-dataset"),
            "--out",
            str(tmp_path / "job"),
            "--set",
            "base_weights=nowhere/not-a-model",
        ],
        tiny_weights,
        tmp_path,
    )
    assert proc.returncode == 2
    assert "base_weights" in proc.stderr and "HF_TOKEN" in proc.stderr


def test_a_base_of_another_model_exits_2_naming_both(tiny_weights, tmp_path):
    args = ["--data", str(ROOT / "examples" / "sample-dataset"), "--out", str(tmp_path / "job")]
    proc = _run(
        [*args, "--set", 'model="flux-dev"', "--set", 'base_weights="tiny-sdxl"'], tiny_weights, tmp_path
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "base_weights" in proc.stderr and "StableDiffusionXLPipeline" in proc.stderr
    assert "FluxPipeline" in proc.stderr and "transformer/" in proc.stderr


def test_a_set_item_without_a_value_exits_2_naming_it(tiny_weights, tmp_path):
    proc = _run(
        [
            "--data",
            str(ROOT / "examples" / "sample-dataset"),
            "--out",
            str(tmp_path / "o"),
            "--set",
            "steps=5",
            "--set",
            "lora.rank",
        ],
        tiny_weights,
        tmp_path,
    )
    assert proc.returncode == 2 and "--set 'lora.rank': expected FIELD=VALUE" in proc.stderr
    assert not (tmp_path / "o").exists()
