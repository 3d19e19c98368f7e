"""Benchmark this trainer's step against the stock diffusers + peft step, in one run.

    python -m bench                 # full-size Flux-dev / SDXL cases on the GPU
    python -m bench --tiny          # tiny configs on the CPU (checks the harness itself)
    python -m bench --cases flux512 --steps 20 --json results.json

Each (case, implementation) runs in a fresh process (a CUDA fault or fragmentation in one
cannot affect another), the stock one first. Figures: median s/step over ``--steps`` steps
after warm-up, TFLOP/step counted by torch's FlopCounterMode, MFU against PEAK_TFLOPS
(default 989, H200 dense bf16), peak allocated memory. Ratios compare the two sides of the
same run: speed-up = stock s/step / project s/step; memory = project peak / stock peak.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from .cases import CASES

ROOT = Path(__file__).resolve().parent.parent


def run_one(case: str, impl: str, tiny: bool, steps: int, timeout: int) -> dict:
    cmd = [sys.executable, "-m", "bench.run", "--case", case, "--impl", impl, "--steps", str(steps)]
    if tiny:
        cmd.append("--tiny")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"case": case, "impl": impl, "error": f"timed out after {timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"case": case, "impl": impl, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}"}
    return json.loads(lines[-1])


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(results: list[dict]) -> str:
    head = f"{'case':<10} {'impl':<8} {'s/step':>9} {'TFLOP/step':>11} {'MFU %':>7} {'peak GiB':>9} {'speed-up':>9} {'mem ratio':>10}"
    rows = [head, "-" * len(head)]
    by_case: dict[str, dict[str, dict]] = {}
    for r in results:
        by_case.setdefault(r["case"], {})[r["impl"]] = r
    for case, impls in by_case.items():
        stock = impls.get("stock", {})
        for impl in ("stock", "project"):
            r = impls.get(impl)
            if r is None:
                continue
            if "error" in r:
                rows.append(f"{case:<10} {impl:<8} ERROR {r['error'][:80]}")
                continue
            speed = mem = None
            if impl == "project" and "s_per_step" in stock:
                speed = stock["s_per_step"] / r["s_per_step"]
                if stock.get("peak_gib") and r.get("peak_gib"):
                    mem = r["peak_gib"] / stock["peak_gib"]
            rows.append(f"{case:<10} {impl:<8} {r['s_per_step']:>9.4f} {r['tflop_per_step']:>11.4g} "
                        f"{_fmt(r['mfu_pct'], '>7.1f'):>7} {_fmt(r['peak_gib'], '>9.1f'):>9} "
                        f"{_fmt(speed, '>8.2f') + ('x' if speed else ''):>9} {_fmt(mem, '>9.2f'):>10}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configs on the CPU")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--impls", default="stock,project")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 3 with --tiny)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per case and implementation")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    parser.add_argument("--speed", default="", help='the project step\'s spec.speed, e.g. \'{"compile": "blocks"}\'')
    args = parser.parse_args(argv)
    steps = args.steps or (3 if args.tiny else 10)
    if args.speed:
        os.environ["BENCH_SPEED"] = args.speed  # inherited by the per-case processes
    results = []
    for case in args.cases.split(","):
        if case not in CASES:
            parser.error(f"unknown case {case!r}; choose from {', '.join(CASES)}")
        for impl in args.impls.split(","):
            r = run_one(case, impl, args.tiny, steps, args.timeout)
            print(json.dumps(r), flush=True)
            results.append(r)
    print()
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
