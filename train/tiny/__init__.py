"""Write tiny random pipelines, one per registered model, in the diffusers folder layout.

    python -m train.tiny --out weights                  # every model: tiny-flux-dev, tiny-sdxl, ...
    python -m train.tiny --out weights flux-dev sdxl    # only these

Each folder loads with its stock diffusers pipeline's ``from_pretrained`` and produces an image
on a CPU in well under a second, so the trainer, the Cog package and the client are tested
through exactly the loading code real weights go through. Everything is built offline: the
tokenizers come from hand-written vocabularies, the models from configs with seeded random
weights. The shapes keep the real models' structure (VAE downsampling, latent packing, the text
encoders and their conditioning) and shrink only widths and depths.

A family's writer is ``train/models/<family>/tiny.py``'s ``write(folder, **ModelInfo.tiny)``; the
builders they share (offline tokenizers, VAE, CLIP and T5) are in ``train/models/tiny_common.py``.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Iterable
from pathlib import Path

from ..families import MODEL_IDS, model_info
from ..weights import pipeline_index

TINY_NAMES = tuple(model_info(m).tiny_name for m in MODEL_IDS)


def write_tiny(model: str, folder: Path) -> Path:
    """Write ``model``'s tiny pipeline into ``folder`` with its family's writer."""
    info = model_info(model)
    writer = importlib.import_module(f"train.models.{info.family}.tiny")
    return writer.write(Path(folder), **info.tiny)


def write_all(out: Path, force: bool = False, models: Iterable[str] | None = None) -> list[Path]:
    """Write the tiny pipelines of ``models`` (default: all) under ``out`` as ``tiny-<model>``,
    skipping complete ones unless ``force``."""
    out = Path(out)
    written = []
    for model in models or MODEL_IDS:
        folder = out / model_info(model).tiny_name
        if force or pipeline_index(folder) is None:
            write_tiny(model, folder)
        written.append(folder)
    return written


def main(argv: list[str] | None = None) -> None:
    summary = (__doc__ or "").split("\n\n")[0]
    parser = argparse.ArgumentParser(prog="python -m train.tiny", description=summary)
    parser.add_argument(
        "--out", type=Path, default=Path("weights"), help="folder to write into (default: weights)"
    )
    parser.add_argument("--force", action="store_true", help="rewrite folders that already exist")
    parser.add_argument(
        "models", nargs="*", metavar="MODEL", help=f"model ids (default: all of {', '.join(MODEL_IDS)})"
    )
    args = parser.parse_args(argv)
    unknown = [m for m in args.models if m not in MODEL_IDS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; choose from {', '.join(MODEL_IDS)}")
    for folder in write_all(args.out, force=args.force, models=args.models or None):
        print(folder)


__all__ = ["TINY_NAMES", "main", "write_all", "write_tiny"]
