"""What a job delivers, at the size users get it: a default FLUX.1-dev LoRA job's output counted on
the full-size architecture, the estimate against a real run's files, and what the bf16 export
costs a render.

Tiny models hide sizes, so the full-size figure is built on the meta device (no memory, no
weights: train/models/meta.py): the published FLUX.1-dev transformer with the project's default
LoRA (rank 16, the "attention+mlp" preset), whose parameter count times the bytes per parameter
and the files a real (tiny) run writes is what the job uploads through Cog's one-file PUT.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import quick_spec, train_quietly
from train.spec import parse_spec

MIB = 2**20
TARGET_MIB = 300  # what a default FLUX.1-dev LoRA job may deliver (issue 23; was ~1 GB in fp32, twice)
# 8-bit levels the bf16 export may move a render on the tiny models (measured: see the test below)
BF16_RENDER_TOLERANCE = 3


def _params(path: Path) -> int:
    with safe_open(str(path), "pt") as f:
        return sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())


def _keys(path: Path) -> int:
    with safe_open(str(path), "pt") as f:
        return len(list(f.keys()))


def _lora_files(out: Path) -> list[Path]:
    return sorted(out.rglob("*.safetensors"))


def test_a_default_flux_dev_lora_job_delivers_at_most_300_mib(tiny_weights, sample_dataset, tmp_path):
    """The full-size default LoRA (counted on the meta device) times what a tiny run with the same
    defaults writes: which files (the diffusers file in bf16; FLUX.1's kohya copy only on request,
    since ComfyUI reads the diffusers file and the BFL names' fused q/k/v make the copy 1.8x its
    size), their bytes per parameter, and everything else in the output."""
    from client.estimates import output_sizes
    from train.models.meta import default_lora_counts

    counts = default_lora_counts("flux-dev")
    assert 64e6 < counts.lora < 67e6, counts  # 65.4 M: the stock baseline's 14 linear types
    spec = quick_spec(tiny_weights, "flux-dev", steps=4)
    result, _ = train_quietly(spec, sample_dataset, tmp_path / "out")
    files = _lora_files(result.out_dir)
    assert [f.name for f in files] == ["pytorch_lora_weights.safetensors"]
    with safe_open(str(files[0]), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # 2 bytes a parameter
    header = files[0].stat().st_size - 2 * _params(files[0])  # names and offsets: per tensor, not size
    others = sum(p.stat().st_size for p in result.out_dir.rglob("*") if p.is_file() and p not in files)
    full_mib = (counts.lora * 2 + header * counts.lora_keys / _keys(files[0]) + others) / MIB
    print(
        f"default FLUX.1-dev LoRA job output at full size: {full_mib:.0f} MiB ({counts.lora / 1e6:.1f} M params)"
    )
    assert full_mib <= TARGET_MIB, f"a default FLUX.1-dev LoRA job would deliver {full_mib:.0f} MiB"
    # with the BFL-named copy asked for, what the estimate says it costs
    with_copy = (counts.lora + counts.kohya) * 2 / MIB
    print(f"... with export.kohya on: {with_copy:.0f} MiB")
    # the client's estimate (what `advanced-trainer estimate` prints) says the same
    estimate = output_sizes(parse_spec({"model": "flux-dev"}))
    estimated_mib = estimate["weights_mb"] + estimate["kept_steps_mb"]
    assert abs(estimated_mib - counts.lora * 2 / MIB) <= 0.01 * estimated_mib, (estimated_mib, full_mib)
    on = output_sizes(parse_spec({"model": "flux-dev", "export": {"kohya": "on"}}))["weights_mb"]
    assert abs(on - with_copy) <= 0.01 * with_copy


def test_the_estimate_is_within_10_percent_of_a_run_s_weight_files(tiny_weights, sample_dataset, tmp_path):
    """Kept validation steps (diffusers file only), the chosen step's two files once: the estimate
    given the run's own LoRA size matches the bytes of the weight files the run delivers."""
    from client.estimates import output_sizes

    fields = {"validation.interval": 2, "lora.rank": 64, "export.kohya": "on"}
    spec = quick_spec(tiny_weights, "sdxl", steps=6, **fields)
    result, _ = train_quietly(spec, sample_dataset, tmp_path / "out")
    files = _lora_files(result.out_dir)
    names = sorted(str(f.relative_to(result.out_dir)) for f in files)
    chosen = result.chosen_step
    kept = [f"steps/step-{s}/pytorch_lora_weights.safetensors" for s in (2, 4, 6) if s != chosen]
    assert names == sorted(["lora_kohya.safetensors", "pytorch_lora_weights.safetensors", *kept])
    estimate = output_sizes(spec, lora_params=_params(result.lora_file))  # SDXL: the copy is its size
    estimated = (estimate["weights_mb"] + estimate["kept_steps_mb"]) * MIB
    actual = sum(f.stat().st_size for f in files)
    assert abs(estimated - actual) <= 0.1 * actual, (estimated, actual)


@pytest.mark.parametrize("model", ["flux-dev", "sdxl"])
def test_the_bf16_export_moves_a_render_by_at_most_a_few_levels(
    model, tiny_weights, sample_dataset, tmp_path
):
    """The same training exported in fp32 and in bf16 (the default): what the cast does to the
    stock pipeline's render with the LoRA. bf16 keeps 8 significant bits, so a LoRA delta of a few
    hundredths moves by ~0.4 % of itself; the renders differ by at most a few 8-bit levels (the
    figure is printed; the run entry and the stock pipeline load the same file, so the family
    contract compares them within 2)."""
    from test_family_contract import _stock

    images = {}
    for dtype in ("fp32", "bf16"):
        spec = quick_spec(tiny_weights, model, steps=10, learning_rate=1e-2, **{"export.dtype": dtype})
        result, _ = train_quietly(spec, sample_dataset, tmp_path / dtype)
        with safe_open(str(result.lora_file), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {
                getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype])
            }
        images[dtype] = _stock(model, tiny_weights / f"tiny-{model}", result.out_dir)
    base = _stock(model, tiny_weights / f"tiny-{model}")
    moved, effect = np.abs(images["bf16"] - images["fp32"]).max(), np.abs(images["fp32"] - base).max()
    print(f"{model}: the bf16 export moves the render by {moved} levels; the LoRA itself by {effect}")
    assert moved <= BF16_RENDER_TOLERANCE < effect
