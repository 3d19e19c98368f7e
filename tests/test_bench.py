"""bench/ with --tiny prints the project and both stock figures side by side for both families."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_tiny_bench_prints_both_families_side_by_side(tmp_path):
    out = tmp_path / "bench.json"
    # aot_eager: the compiled rows trace through dynamo without generating C++ (minutes on 2 cores)
    proc = subprocess.run([sys.executable, "-m", "bench", "--tiny", "--cases", "flux512,sdxl1024", "--steps", "2",
                           "--speed", "{}", "--speed", 'compiled={"compile": "blocks"}', "--json", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "ADVANCED_TRAINER_COMPILE_BACKEND": "aot_eager"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = proc.stdout.split("\n\n")[-2]
    rows = [ln.split() for ln in table.splitlines()[2:]]
    impls = ["stock", "stock-compiled", "project1", "project-compiled"]
    assert [(r[0], r[1]) for r in rows] == [(c, i) for c in ("flux512", "sdxl1024") for i in impls]
    for r in rows:
        assert float(r[2]) > 0 and float(r[4]) > 0  # s/step and counted TFLOP/step
    for r in rows:  # project rows carry both ratios and the case's target
        is_project = r[1].startswith("project")
        assert r[7].endswith("x") == is_project and r[8].endswith("x") == is_project
        assert r[9].startswith("<=") == is_project and (r[10] in ("yes", "NO")) == is_project
    assert 'project-compiled: speed {"compile": "blocks"}' in proc.stdout

    figures = json.loads(out.read_text())
    assert all("error" not in f for f in figures)
    by = {(f["case"], f["impl"]): f for f in figures}
    for case in ("flux512", "sdxl1024"):
        stock, project = by[(case, "stock")], by[(case, "project1")]
        # same architecture on both sides: the counted work is comparable
        assert project["base_params_b"] == stock["base_params_b"]
        assert 0.5 < project["tflop_per_step"] / stock["tflop_per_step"] < 2.0
        assert "compile_repeated_blocks" in by[(case, "stock-compiled")]["levers"]
        assert any("compile: repeated blocks" in lever for lever in by[(case, "project-compiled")]["levers"])
        assert by[(case, "project-compiled")]["speed"] == {"compile": "blocks"}


def test_memory_case_caps_and_plans(tmp_path):
    """flux1024-44g: the stock side checkpoints; the project plans with policy auto."""
    proc = subprocess.run([sys.executable, "-m", "bench", "--tiny", "--cases", "flux1024-44g", "--steps", "1",
                           "--impls", "stock,project", "--speed", "{}"], capture_output=True, text=True, cwd=ROOT,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    figures = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    stock, project = figures
    assert stock["gradient_checkpointing"] and stock["memory_cap_gib"] == 44.0
    assert project["levers"][0].startswith("memory policy auto")


def test_end_to_end_bench_reports_every_phase(tmp_path):
    """bench.e2e runs a whole job through run_training and prints config.json's phase timings."""
    out = tmp_path / "e2e.json"
    proc = subprocess.run([sys.executable, "-m", "bench.e2e", "--tiny", "--steps", "4", "--images", "3",
                           "--render-steps", "1", "--speed", "{}", "--json", str(out)], capture_output=True,
                          text=True, cwd=ROOT, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert {"stage", "load", "cache", "first_step", "train", "validate", "export", "total"} <= set(r["timings_s"])
    t = r["timings_s"]
    assert t["first_step"] <= t["train"]  # part of train, not counted twice in the total
    assert abs(t["total"] - sum(v for k, v in t.items() if k not in ("total", "first_step"))) < 0.05
    assert r["steps"] == 4 and r["s_per_step"] > 0
    assert "total" in proc.stdout and "s/step after the first step" in proc.stdout
