"""bench/ with --tiny prints project and stock figures side by side for both families."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT


def test_tiny_bench_prints_both_families_side_by_side(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--tiny", "--cases", "flux512,sdxl1024", "--steps", "2",
                           "--json", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = proc.stdout.split("\n\n")[-1]
    rows = [ln.split() for ln in table.splitlines()[2:]]
    assert [(r[0], r[1]) for r in rows] == [("flux512", "stock"), ("flux512", "project"),
                                           ("sdxl1024", "stock"), ("sdxl1024", "project")]
    for r in rows:
        assert float(r[2]) > 0 and float(r[3]) > 0  # s/step and counted TFLOP/step
    assert rows[1][6].endswith("x") and rows[3][6].endswith("x")  # the project rows carry the ratio
    import json

    figures = json.loads(out.read_text())
    project = [f for f in figures if f["impl"] == "project"]
    stock = [f for f in figures if f["impl"] == "stock"]
    # same architecture on both sides: the counted work is comparable
    for p, s in zip(project, stock):
        assert p["base_params_b"] == s["base_params_b"]
        assert 0.5 < p["tflop_per_step"] / s["tflop_per_step"] < 2.0
