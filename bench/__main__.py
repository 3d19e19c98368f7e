"""Benchmark this trainer's step against the stock diffusers + peft step, in one run.

    python -m bench                 # full-size Flux-dev / SDXL cases on the GPU
    python -m bench --tiny          # tiny configs on the CPU (checks the harness itself)
    python -m bench --cases flux512 --steps 20 --json results.json
    python -m bench --speed '{}' --speed 'fp8={"compile": "blocks", "fp8_base": "on"}'

Each (case, implementation) runs in a fresh process (a CUDA fault or fragmentation in one
cannot affect another), the stock ones first. Implementations: ``stock`` (eager),
``stock-compiled`` (diffusers' regional compile), and one ``project`` row per ``--speed``
(the spec's speed section as JSON, optionally named ``NAME=JSON``). Figures: median s/step
over ``--steps`` steps after warm-up, the first step's time (compilation), TFLOP/step counted
by torch's FlopCounterMode, MFU against PEAK_TFLOPS (default 989, H200 dense bf16), peak
allocated memory. Ratios compare sides of the same run: ``vs stock`` = stock s/step /
project s/step, likewise ``vs compiled``. ``target`` is the issue's goal for the case.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .cases import CASES, MEMORY_CASE_SLOWDOWN, TARGET_S_PER_STEP

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SPEED = '{"compile": "blocks", "fuse_qkv": "on", "fuse_lora": "on"}'


def run_one(case: str, impl: str, tiny: bool, steps: int, timeout: int, speed: str = "") -> dict:
    kind = "project" if impl.startswith("project") else impl
    cmd = [sys.executable, "-m", "bench.run", "--case", case, "--impl", kind, "--steps", str(steps)]
    if tiny:
        cmd.append("--tiny")
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "BENCH_SPEED": speed,
    }
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"case": case, "impl": impl, "error": f"timed out after {timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"case": case, "impl": impl, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}"}
    return {
        **json.loads(lines[-1]),
        "impl": impl,
        "speed": json.loads(speed or "{}") if kind == "project" else None,
    }


def parse_variants(values: list[str]) -> list[tuple[str, str]]:
    """``--speed`` values -> [(impl name, speed JSON)]; one unnamed value is plain ``project``."""
    variants = []
    for i, value in enumerate(values or [DEFAULT_SPEED], 1):
        name, sep, text = value.partition("=")
        if not sep or name.strip().startswith("{"):
            name, text = ("project" if len(values or [1]) == 1 else f"project{i}"), value
        else:
            name = name if name.startswith("project") else f"project-{name}"
        json.loads(text)  # fail here, not in every child process
        variants.append((name.strip(), text.strip()))
    return variants


# The table's columns in print order, with their widths; `table_rows` fills them by name.
COLUMNS: dict[str, int] = {
    "case": -13,
    "impl": -16,
    "s/step": 8,
    "1st s": 7,
    "TFLOP": 7,
    "MFU%": 5,
    "peakGiB": 7,
    "vs stock": 8,
    "vs comp.": 8,
    "target": 14,
    "met": 4,
}  # < 0: left-aligned


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def target_for(case: str, r: dict, results: list[dict]) -> tuple[str, bool | None]:
    """(the target in words, met?) for one project row."""
    if case in TARGET_S_PER_STEP:
        goal = TARGET_S_PER_STEP[case]
        return f"<={goal:.2f}s", r["s_per_step"] <= goal
    cap = CASES[case].memory_gib
    if cap is None:
        return "-", None
    free = [
        x["s_per_step"]
        for x in results
        if x["case"] == "flux1024" and x["impl"].startswith("project") and "s_per_step" in x
    ]
    fits = r.get("peak_gib") is None or r["peak_gib"] <= cap
    if not free:
        return f"<={cap:g}GiB", fits if r.get("peak_gib") is not None else None
    goal = MEMORY_CASE_SLOWDOWN * min(free)
    return f"<={goal:.2f}s,{cap:g}GiB", fits and r["s_per_step"] <= goal


def table_rows(results: list[dict]) -> list[dict[str, str]]:
    """One row per figure, keyed by column name (``COLUMNS``); a failed run's row has ``error``
    instead of figures. Ratios compare against the stock rows of the same case in ``results``."""
    order = list(dict.fromkeys(r["case"] for r in results))  # grouped by case, in first-run order
    results = sorted(results, key=lambda r: order.index(r["case"]))
    rows = []
    stock = {
        (r["case"], r["impl"]): r.get("s_per_step")
        for r in results
        if r["impl"] in ("stock", "stock-compiled")
    }
    for r in results:
        row = {"case": r["case"], "impl": r["impl"]}
        if "error" in r:
            rows.append({**row, "error": r["error"]})
            continue
        project = r["impl"].startswith("project")
        ratios = {}
        for column, ref in (("vs stock", "stock"), ("vs comp.", "stock-compiled")):
            s = stock.get((r["case"], ref))
            ratios[column] = f"{s / r['s_per_step']:.2f}x" if s and project else "-"
        goal, met = target_for(r["case"], r, results) if project else ("-", None)
        rows.append(
            {
                **row,
                "s/step": f"{r['s_per_step']:.4f}",
                "1st s": f"{r.get('first_step_s', 0):.1f}",
                "TFLOP": f"{r['tflop_per_step']:.4g}",
                "MFU%": _fmt(r.get("mfu_pct"), ".1f"),
                "peakGiB": _fmt(r.get("peak_gib"), ".1f"),
                **ratios,
                "target": goal,
                "met": "-" if met is None else ("yes" if met else "NO"),
            }
        )
    return rows


def format_table(rows: list[dict[str, str]]) -> str:
    """The rows of ``table_rows`` as fixed-width text under a header and a rule."""

    def line(cells: dict[str, str]) -> str:
        return " ".join(f"{cells[c]:<{-w}}" if w < 0 else f"{cells[c]:>{w}}" for c, w in COLUMNS.items())

    head = line({c: c for c in COLUMNS})
    out = [head, "-" * len(head)]
    for row in rows:
        if "error" in row:
            out.append(f"{row['case']:<13} {row['impl']:<16} ERROR {row['error'][:90]}")
        else:
            out.append(line(row))
    return "\n".join(out)


def table(results: list[dict]) -> str:
    return format_table(table_rows(results))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configs on the CPU")
    parser.add_argument(
        "--cases", default="flux1024,flux512,sdxl1024", help=f"comma-separated, from {', '.join(CASES)}"
    )
    parser.add_argument(
        "--impls",
        default="stock,stock-compiled,project",
        help="comma-separated, from stock, stock-compiled, project",
    )
    parser.add_argument(
        "--speed",
        action="append",
        default=[],
        metavar="[NAME=]JSON",
        help=f"a project variant's spec.speed (repeatable; default {DEFAULT_SPEED})",
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 3 with --tiny)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per case and implementation")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for the whole run: later runs are skipped (and listed) once it is spent",
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    steps = args.steps or (3 if args.tiny else 10)
    try:
        variants = parse_variants(args.speed)
    except json.JSONDecodeError as exc:
        parser.error(f"--speed: not JSON ({exc})")
    impls = args.impls.split(",")
    for impl in impls:
        if impl not in ("stock", "stock-compiled", "project"):
            parser.error(f"unknown implementation {impl!r}; choose from stock, stock-compiled, project")
    results = []
    for case in args.cases.split(","):
        if case not in CASES:
            parser.error(f"unknown case {case!r}; choose from {', '.join(CASES)}")
        for impl in impls:
            for name, speed in variants if impl == "project" else [(impl, "")]:
                left = None if args.budget is None else args.budget - (time.monotonic() - started)
                if left is not None and left < 30:
                    r = {"case": case, "impl": name, "error": "skipped: the --budget was spent"}
                else:
                    r = run_one(
                        case, name, args.tiny, steps, int(min(args.timeout, left or args.timeout)), speed
                    )
                print(json.dumps(r), flush=True)
                results.append(r)
                if args.json:  # written as it goes: a device call cut short keeps what it measured
                    args.json.write_text(json.dumps(results, indent=1) + "\n")
    print()
    print(table(results))
    if any(impl == "project" for impl in impls):
        print()
        for name, speed in variants:
            print(f"{name}: speed {speed}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
