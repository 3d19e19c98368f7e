"""Tiny random Flux.2 [klein] pipelines (Qwen3 text encoder; ``distilled`` as the step-distilled
repos are): the Flux.2 writer's klein variant (train/models/flux2/tiny.py)."""

from __future__ import annotations

from pathlib import Path

from ..flux2.tiny import write as write_flux2


def write(folder: Path, distilled: bool = False, double: int = 1, single: int = 1) -> Path:
    return write_flux2(folder, variant="klein", distilled=distilled, double=double, single=single)
