"""Model families, one folder each (``train/models/<family>/``); ``family_class`` picks one for a model id.

This package and each family's ``__init__.py`` stay torch-free (they hold the registry entries the
spec reads on a laptop); a family's maths is its ``family.py``, which exports its ``Family``
subclass as ``FAMILY`` (and, where one module serves several models differently, ``FAMILIES``:
model id -> class), imported only when a process trains or renders that model.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..spec import TrainingSpec
    from .base import Family


def family_class(model: str) -> type[Family]:
    """The ``Family`` subclass for a model id (``flux-dev``, ``sdxl``, ...)."""
    # Imported on demand: each family module loads its diffusers pipeline code (seconds), and a
    # process needs only one of them. (The registry imports this package: it is read here, not above.)
    from ..families import model_info

    module = importlib.import_module(f"{__name__}.{model_info(model).family}.family")
    return getattr(module, "FAMILIES", {}).get(model, module.FAMILY)


def family_for(spec: TrainingSpec, base_dir: Path) -> Family:
    return family_class(spec.model)(spec, base_dir)


__all__ = ["family_class", "family_for"]
