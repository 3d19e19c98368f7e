"""bench/: the table is built from the figures by name (unit tests on synthetic timings); one tiny
run of ``python -m bench`` prints that table for real measurements; ``bench.e2e`` reports every
phase of a whole job."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.__main__ import COLUMNS, format_table, parse_variants, table, table_rows
from bench.e2e import GOAL_S, report
from conftest import ROOT


def figure(case: str, impl: str, s_per_step: float, **extra) -> dict:
    """One child process's figures, as ``bench.run`` prints them (the fields the table reads)."""
    return {
        "case": case,
        "impl": impl,
        "s_per_step": s_per_step,
        "first_step_s": 1.5,
        "tflop_per_step": 12.5,
        "mfu_pct": 40.0,
        "peak_gib": 30.0,
        **extra,
    }


def by_impl(rows: list[dict[str, str]], case: str) -> dict[str, dict[str, str]]:
    return {r["impl"]: r for r in rows if r["case"] == case}


def test_table_rows_compare_each_project_row_with_its_own_stock_rows():
    results = [
        figure("flux1024", "stock", 0.6),
        figure("flux1024", "stock-compiled", 0.45),
        figure("flux1024", "project", 0.3),
        figure("flux1024", "project-slow", 0.5),
        figure("sdxl1024", "stock", 0.8),
        figure("sdxl1024", "project", 0.16, mfu_pct=None, peak_gib=None),
    ]
    rows = table_rows(results)
    flux, sdxl = by_impl(rows, "flux1024"), by_impl(rows, "sdxl1024")
    assert set(flux["project"]) == set(COLUMNS)
    assert (flux["project"]["vs stock"], flux["project"]["vs comp."]) == ("2.00x", "1.50x")
    assert (flux["project"]["target"], flux["project"]["met"]) == ("<=0.30s", "yes")
    assert (flux["project-slow"]["vs stock"], flux["project-slow"]["met"]) == ("1.20x", "NO")
    # stock rows carry figures but no ratio or target
    assert flux["stock"]["s/step"] == "0.6000" and flux["stock"]["TFLOP"] == "12.5"
    assert [flux["stock"][c] for c in ("vs stock", "vs comp.", "target", "met")] == ["-"] * 4
    # no stock-compiled run for SDXL: that ratio is unknown, not borrowed from the Flux case
    assert (sdxl["project"]["vs stock"], sdxl["project"]["vs comp."]) == ("5.00x", "-")
    assert (sdxl["project"]["MFU%"], sdxl["project"]["peakGiB"], sdxl["project"]["met"]) == ("-", "-", "yes")


def test_memory_case_target_is_relative_to_the_unconstrained_step():
    results = [
        figure("flux1024", "project", 0.30),
        figure("flux1024-44g", "project", 0.38, peak_gib=40.0),
        figure("flux1024-44g", "project-fat", 0.30, peak_gib=50.0),
    ]
    rows = by_impl(table_rows(results), "flux1024-44g")
    assert (rows["project"]["target"], rows["project"]["met"]) == ("<=0.39s,44GiB", "yes")
    assert rows["project-fat"]["met"] == "NO"  # fast, but over the card's memory
    alone = table_rows([figure("flux1024-44g", "project", 0.38, peak_gib=None)])[0]
    assert (alone["target"], alone["met"]) == ("<=44GiB", "-")  # no unconstrained run, no peak (CPU)


def test_printed_table_has_a_header_per_column_and_groups_rows_by_case():
    results = [
        figure("flux512", "stock", 0.2),
        figure("sdxl1024", "stock", 0.5),
        figure("flux512", "project", 0.1),
        {"case": "sdxl1024", "impl": "project", "error": "exit 1: OOM"},
    ]
    lines = table(results).splitlines()
    assert lines[0].split() == " ".join(COLUMNS).split() and set(lines[1]) == {"-"}
    assert [ln.split()[:2] for ln in lines[2:]] == [
        ["flux512", "stock"],
        ["flux512", "project"],
        ["sdxl1024", "stock"],
        ["sdxl1024", "project"],
    ]
    assert lines[-1].split()[2:] == ["ERROR", "exit", "1:", "OOM"]
    assert all(len(ln) == len(lines[0]) for ln in lines[2:5])  # fixed width: columns line up


def test_speed_variants_are_named_and_checked_before_any_run():
    assert parse_variants([]) == [("project", '{"compile": "blocks", "fuse_qkv": "on", "fuse_lora": "on"}')]
    assert parse_variants(["{}", 'fp8={"fp8_base": "on"}']) == [
        ("project1", "{}"),
        ("project-fp8", '{"fp8_base": "on"}'),
    ]
    with pytest.raises(json.JSONDecodeError):
        parse_variants(["fast={compile: blocks}"])


def test_e2e_report_extrapolates_a_1000_step_job_against_the_goal():
    timings = {
        "stage": 2.0,
        "load": 10.0,
        "cache": 5.0,
        "first_step": 30.0,
        "train": 129.0,
        "validate": 8.0,
        "export": 3.0,
        "total": 157.0,
    }
    r = {"tiny": False, "timings_s": timings, "wall_s": 160.0, "s_per_step": 0.33}
    text = report(r)
    assert "first_step" not in [ln.split()[0] for ln in text.splitlines()[1:]]  # inside train, not a phase
    per_1000 = 157.0 - 129.0 + 30.0 + 999 * 0.33
    assert f"a 1000-step job at this rate: {per_1000:.0f} s; goal {GOAL_S} s: met" in text
    assert report({**r, "s_per_step": 0.5}).endswith("NOT met")


def test_tiny_bench_prints_the_table_of_what_it_measured(tmp_path):
    """The smallest real run: the memory case (tiny configs, CPU), stock and project, one timed step."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--tiny",
            "--cases",
            "flux1024-44g",
            "--impls",
            "stock,project",
            "--steps",
            "1",
            "--speed",
            "{}",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert format_table(table_rows(figures)) in proc.stdout  # the printed table is built from these figures
    rows = by_impl(table_rows(figures), "flux1024-44g")
    assert set(rows) == {"stock", "project"}
    for row in rows.values():
        assert float(row["s/step"]) > 0 and float(row["TFLOP"]) > 0 and row["peakGiB"] == "-"  # CPU: no peak
    assert rows["project"]["vs stock"].endswith("x") and rows["project"]["target"] == "<=44GiB"
    stock, project = (next(f for f in figures if f["impl"] == impl) for impl in ("stock", "project"))
    assert stock["gradient_checkpointing"] and stock["memory_cap_gib"] == 44.0
    assert project["levers"][0].startswith("memory policy auto")
    assert project["base_params_b"] == stock["base_params_b"]  # same architecture on both sides
    assert 0.5 < project["tflop_per_step"] / stock["tflop_per_step"] < 2.0  # comparable counted work
    assert "project: speed {}" in proc.stdout


def test_end_to_end_bench_reports_every_phase(tmp_path):
    """bench.e2e runs a whole job through run_training and prints config.json's phase timings."""
    out = tmp_path / "e2e.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.e2e",
            "--tiny",
            "--steps",
            "2",
            "--images",
            "2",
            "--render-steps",
            "1",
            "--speed",
            "{}",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert {"stage", "load", "cache", "first_step", "train", "validate", "export", "total"} <= set(
        r["timings_s"]
    )
    t = r["timings_s"]
    assert t["first_step"] <= t["train"]  # part of train, not counted twice in the total
    assert abs(t["total"] - sum(v for k, v in t.items() if k not in ("total", "first_step"))) < 0.05
    assert r["steps"] == 2 and r["s_per_step"] > 0
    assert report(r) in proc.stdout


def test_fetch_bench_prints_its_figures():
    """``python -m bench.fetch`` at a tiny size: every case runs and the table is printed (the figures
    themselves are measured at 2 GiB; docs/benchmarks.md)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.fetch",
            "--size-gib",
            "0.02",
            "--rate-mb",
            "20",
            "--single-seconds",
            "1",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["case"] for r in rows] == ["single", "parallel", "stream"]
    assert rows[1]["bytes"] > 0.02 * 2**30 and rows[2]["bytes"] >= 0.02 * 2**30 - 4096
    assert "x single" in proc.stdout and "peak disk / unpacked size" in proc.stdout
