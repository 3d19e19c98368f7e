"""Model families behind one interface (``Family``); ``family_for`` picks one for a spec."""

from __future__ import annotations

from pathlib import Path

from ..spec import TrainingSpec
from .base import Batch, Family


def family_for(spec: TrainingSpec, base_dir: Path) -> Family:
    if spec.family == "flux":
        from .flux import FluxFamily

        return FluxFamily(spec, base_dir)
    from .sdxl import SdxlFamily

    return SdxlFamily(spec, base_dir)


__all__ = ["Batch", "Family", "family_for"]
