"""Model families behind one interface (``Family``); ``family_for`` picks one for a spec.

Which module implements a model id is the registry's word (``train/families.py``): the module
``train/models/<family>.py`` exports its ``Family`` subclass as ``FAMILY``.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ..families import model_info
from ..spec import TrainingSpec
from .base import Batch, Family


def family_class(model: str) -> type[Family]:
    """The ``Family`` subclass for a model id (``flux-dev``, ``sdxl``, ...)."""
    # Imported on demand: each family module loads its diffusers pipeline code (seconds), and a
    # process needs only one of them.
    module = importlib.import_module(f"{__name__}.{model_info(model).family}")
    # a module serving several models may name a class per model id (``FAMILIES``), else ``FAMILY``
    return getattr(module, "FAMILIES", {}).get(model, module.FAMILY)


def family_for(spec: TrainingSpec, base_dir: Path) -> Family:
    return family_class(spec.model)(spec, base_dir)


__all__ = ["Batch", "Family", "family_class", "family_for"]
