"""The family registry: every model id the trainer knows, collected from the family folders.

Each family is one folder, ``train/models/<family>/``: its ``__init__.py`` holds the registry
entries (``MODELS``, ``ModelInfo``s: plain data, torch-free, so the spec validated on a laptop,
the client's estimates, the memory table and the Cog entries read the same figures) and ``ORDER``
(where its models stand in the lists users see); ``family.py`` its maths (class ``FAMILY``);
``tiny.py`` its tiny random pipeline (function ``write``). This module finds the folders, so a new
family is a new folder. Nothing else names a family: code that needs to know something about one
asks its ``ModelInfo``. See docs/families.md, "How to add a family".
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from .model_info import GB, ModelInfo

__all__ = ["GB", "MODELS", "MODEL_IDS", "FAMILIES", "ModelInfo", "family_of", "model_info"]

_MODELS_DIR = Path(__file__).with_name("models")


def _family_packages() -> list[str]:
    """The family folders (the subpackages of ``train.models``), in their ``ORDER``."""
    names = [m.name for m in pkgutil.iter_modules([str(_MODELS_DIR)]) if m.ispkg]
    packages = {name: importlib.import_module(f"{__package__}.models.{name}") for name in names}
    return sorted(packages, key=lambda name: (packages[name].ORDER, name))


def _collect() -> dict[str, ModelInfo]:
    models: dict[str, ModelInfo] = {}
    for name in FAMILIES:
        for info in importlib.import_module(f"{__package__}.models.{name}").MODELS:
            assert info.family == name, f"{info.id} is registered in {name}/ but names family {info.family}"
            assert info.id not in models, f"model id {info.id} is registered twice"
            models[info.id] = info
    return models


FAMILIES: tuple[str, ...] = tuple(_family_packages())
# The order is the order users see (Cog choices, docs): the families' ORDER, then each one's MODELS.
MODELS: dict[str, ModelInfo] = _collect()
MODEL_IDS: tuple[str, ...] = tuple(MODELS)


def model_info(model: str) -> ModelInfo:
    """The registry entry of ``model``; a ``KeyError`` naming the known ids otherwise."""
    try:
        return MODELS[model]
    except KeyError:
        raise KeyError(f"unknown model {model!r}; known: {', '.join(MODEL_IDS)}") from None


def family_of(model: str) -> str:
    """The family (folder under train/models/) of a model id: ``flux-dev`` -> ``flux``."""
    return model_info(model).family
