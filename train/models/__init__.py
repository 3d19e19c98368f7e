"""Model families behind one interface (``Family``); ``family_for`` picks one for a spec."""

from __future__ import annotations

from pathlib import Path

from ..spec import TrainingSpec, family_of
from .base import Batch, Family


def family_class(model: str) -> type[Family]:
    """The ``Family`` subclass for a model id (``flux-dev``, ``sdxl``, ...)."""
    # Imported on demand: each family module loads its diffusers pipeline code (seconds), and a
    # process needs only one of them.
    if family_of(model) == "flux":
        from .flux import FluxFamily

        return FluxFamily
    from .sdxl import SdxlFamily

    return SdxlFamily


def family_for(spec: TrainingSpec, base_dir: Path) -> Family:
    return family_class(spec.model)(spec, base_dir)


__all__ = ["Batch", "Family", "family_class", "family_for"]
