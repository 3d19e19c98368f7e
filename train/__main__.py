"""python -m train --spec spec.json --data data.zip --out out/"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .spec import SpecError, parse_set_items, parse_spec

if TYPE_CHECKING:
    from .loop import TrainResult


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train", description="Train a LoRA or fine-tune on a dataset."
    )
    parser.add_argument(
        "--spec", default=None, help="training spec: a JSON file or a JSON string (default: all defaults)"
    )
    parser.add_argument(
        "--data", required=True, type=Path, help="dataset: a zip / tar / tar.gz archive or a folder"
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="job folder: outputs are written here, nowhere else"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a spec field, e.g. --set steps=50 --set lora.rank=8 (JSON values)",
    )
    parser.add_argument(
        "--resume-from",
        type=Path,
        default=None,
        help="a checkpoint folder (OUT/checkpoints/step-N) or an archive of one",
    )
    parser.add_argument(
        "--num-processes",
        type=int,
        default=1,
        help="data-parallel processes (one per GPU; on a CPU, gloo processes)",
    )
    parser.add_argument("--keep-work", action="store_true", help="keep the staged dataset in OUT/.work")
    return parser


def _launch(args: argparse.Namespace, argv: list[str]) -> int:
    """Re-run this command under torch's elastic launcher, one process per device."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--num-processes":
            skip = True
            continue
        if a.startswith("--num-processes="):
            continue
        rest.append(a)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.num_processes}",
        "-m",
        "train",
        *rest,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run(cmd, env=env).returncode


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)

    try:
        overrides = parse_set_items(args.set)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        spec = parse_spec(args.spec, **overrides)
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.num_processes < 1 or args.num_processes > 64:
        parser.error("--num-processes: between 1 and 64")
    if args.num_processes > 1 and "LOCAL_RANK" not in os.environ:
        return _launch(args, argv)

    from .checkpoint import CheckpointError
    from .data import DatasetError, UnsafeArchiveError
    from .loop import TrainingError, run_training
    from .weights import WeightsError

    try:
        result = run_training(
            spec, args.data, args.out, keep_work=args.keep_work, resume_from=args.resume_from
        )
    except (DatasetError, UnsafeArchiveError, WeightsError, TrainingError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result is None:  # a data-parallel worker: the main process reports
        return 0
    for label, value in summary_lines(result, spec.mode):
        print(f"{label + ':':<20}{value}")
    return 0


def summary_lines(result: TrainResult, mode: str) -> list[tuple[str, str]]:
    """The closing summary: what this run wrote, by what it is (a family without a kohya/ComfyUI
    convention writes no kohya file, a full fine-tune a model folder)."""
    if mode == "full":
        lines = [("model (diffusers)", str(result.weights[0]))]
    else:
        lines = [("LoRA (diffusers)", str(result.lora_file))]
        # a second expert's LoRA (Wan 2.2 A14B: the low-noise one), then the kohya/ComfyUI copies
        lines += [("LoRA (diffusers)", str(p)) for p in result.weights[1:] if "kohya" not in p.name]
        lines += [("LoRA (kohya)", str(p)) for p in result.weights if "kohya" in p.name]
    lines.append(("validation images", ", ".join(str(p) for p in result.samples) or "none"))
    return lines + [("loss plot", str(result.loss_plot)), ("config", str(result.config))]


if __name__ == "__main__":
    sys.exit(main())
