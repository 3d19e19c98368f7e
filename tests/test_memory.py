"""The memory policy picks documented savings from simulated cards, and the spec overrides it."""

from __future__ import annotations

import pytest

from train.memory import GIB, choose_memory_plan, estimate_peak_bytes

FLUX_DEV = dict(family="flux", weight_bytes=int(11.9e9 * 2), trainable_params=int(65e6), optimizer="adamw",
                text_tokens=512)
SDXL = dict(family="sdxl", weight_bytes=int(2.6e9 * 2), trainable_params=int(23e6), optimizer="adamw", text_tokens=0)


def test_estimates_follow_the_measured_stock_peaks():
    # gpu-baseline.md: stock Flux-dev LoRA peaks 56.5 GiB at 1024 px, 34.3 GiB at 512 px; SDXL bs4 34.6 GiB
    assert estimate_peak_bytes(resolution=1024, batch_size=1, **FLUX_DEV) / GIB == pytest.approx(56.5, rel=0.1)
    assert estimate_peak_bytes(resolution=512, batch_size=1, **FLUX_DEV) / GIB == pytest.approx(34.3, rel=0.1)
    assert estimate_peak_bytes(resolution=1024, batch_size=4, **SDXL) / GIB == pytest.approx(34.6, rel=0.1)


@pytest.mark.parametrize("free_gib,expected", [
    (139, False),   # H200: everything fits
    (79, False),    # A100 80 GB
    (44, True),     # L40S: Flux 1024 px needs checkpointing
    (24, True),     # a 24 GB consumer card: on, and the log says it may still not fit
])
def test_auto_picks_checkpointing_by_free_memory(free_gib, expected):
    plan = choose_memory_plan("auto", int(free_gib * GIB), resolution=1024, batch_size=1, **FLUX_DEV)
    assert plan.gradient_checkpointing is expected
    assert f"{free_gib:.1f} GiB free" in plan.reason
    if free_gib == 24:
        assert "may still not fit" in plan.reason


def test_small_jobs_need_nothing_and_the_cpu_never_does():
    assert not choose_memory_plan("auto", 44 * GIB, resolution=512, batch_size=1, **FLUX_DEV).gradient_checkpointing
    assert not choose_memory_plan("auto", 44 * GIB, resolution=1024, batch_size=4, **SDXL).gradient_checkpointing
    cpu = choose_memory_plan("auto", None, resolution=1024, batch_size=1, **FLUX_DEV)
    assert not cpu.gradient_checkpointing and "CPU" in cpu.reason


def test_the_spec_overrides_auto():
    forced = choose_memory_plan("gradient_checkpointing", 139 * GIB, resolution=512, batch_size=1, **FLUX_DEV)
    assert forced.gradient_checkpointing and "from the spec" in forced.reason
    off = choose_memory_plan("off", 8 * GIB, resolution=1024, batch_size=1, **FLUX_DEV)
    assert not off.gradient_checkpointing and "from the spec" in off.reason


def test_the_choice_is_logged_and_applied(tiny_weights, sample_dataset, tmp_path):
    from conftest import quick_spec, train_quietly

    result, log = train_quietly(quick_spec(tiny_weights, "sdxl", steps=2, memory_policy="gradient_checkpointing"),
                                sample_dataset, tmp_path / "out")
    assert "memory policy gradient_checkpointing (from the spec): checkpointing on" in log
    import json

    assert json.loads((tmp_path / "out" / "config.json").read_text())["memory_plan"]["gradient_checkpointing"]
