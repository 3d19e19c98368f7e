"""python -m train --spec spec.json --data data.zip --out out/"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .spec import SpecError, parse_spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description="Train a LoRA on a dataset archive or folder.")
    parser.add_argument("--spec", default=None, help="training spec: a JSON file or a JSON string (default: all defaults)")
    parser.add_argument("--data", required=True, type=Path, help="dataset: a zip / tar / tar.gz archive or a folder")
    parser.add_argument("--out", required=True, type=Path, help="job folder: outputs are written here, nowhere else")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help='override a spec field, e.g. --set steps=50 --set lora.rank=8 (JSON values)')
    parser.add_argument("--keep-work", action="store_true", help="keep the staged dataset in OUT/.work")
    args = parser.parse_args(argv)

    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected FIELD=VALUE")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    try:
        spec = parse_spec(args.spec, **overrides)
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return 2

    from .data import DatasetError, UnsafeArchiveError
    from .loop import TrainingError, describe, run_training
    from .weights import WeightsError

    try:
        result = run_training(spec, args.data, args.out, keep_work=args.keep_work)
    except (DatasetError, UnsafeArchiveError, WeightsError, TrainingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    d = describe(result)
    print(f"LoRA (diffusers):   {d['lora']}")
    print(f"LoRA (kohya):       {d['kohya']}")
    print(f"validation images:  {', '.join(d['samples'])}")
    print(f"loss plot:          {d['loss_plot']}")
    print(f"config:             {d['config']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
