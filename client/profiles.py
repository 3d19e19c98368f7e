"""Hardware profiles: which Replicate model trains on which hardware.

A Replicate model has exactly one hardware setting, and a training runs on the trainer model's
hardware. So every machine type needs its own trainer model, all holding the same image:

    settings.hardware (default gpu-l40s)  ->  settings.model       simpletuner/advanced-trainer
    gpu-h100                              ->  settings.model-h100  simpletuner/advanced-trainer-h100
    gpu-h100-8x                           ->  ...-h100-8x          simpletuner/advanced-trainer-h100-8x
    gpu-2x-l40s                           ->  ...-l40s-2x          simpletuner/advanced-trainer-l40s-2x

``settings.profiles`` (``{"gpu-h100-8x": "me/trainer-8x[:version]"}``) names any other model for
a SKU. The default profile's version pin is ``settings.version``; the others pin with
``owner/name:version`` or use their latest version. ``scripts/push_profiles.py`` pushes the
image to every configured profile model and creates the missing ones with their hardware.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from . import pricing
from .config import Settings

__all__ = ["PUSHED_BY_DEFAULT", "Profile", "profile_name", "profile_for", "configured", "hardware_rows"]

# the machines a trainer is pushed for unless settings.profiles names others
PUSHED_BY_DEFAULT = (
    "gpu-l40s",
    "gpu-2x-l40s",
    "gpu-4x-l40s",
    "gpu-8x-l40s",
    "gpu-h100",
    "gpu-h100-2x",
    "gpu-h100-4x",
    "gpu-h100-8x",
)
MODEL_REF = re.compile(r"^(?P<model>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<version>[0-9a-f]{64}))?$")


@dataclass(frozen=True)
class Profile:
    hardware: str
    model: str  # owner/name on Replicate
    version: str | None  # a pinned version id; None = the model's latest
    default: bool  # settings.model itself

    def to_dict(self) -> dict[str, Any]:
        return {
            "hardware": self.hardware,
            "model": self.model,
            "version": self.version,
            "default": self.default,
        }


def profile_name(sku: str) -> str:
    """The suffix of a SKU's profile model: ``h100``, ``h100-8x``, ``l40s-2x``, ``a100-4x``."""
    hw = pricing.check_sku(sku)
    return hw.card if hw.gpus <= 1 else f"{hw.card}-{hw.gpus}x"


def parse_model_ref(name: str, value: Any) -> tuple[str, str | None]:
    """``owner/name`` or ``owner/name:<64-hex version>``; ValueError naming ``name`` otherwise."""
    m = MODEL_REF.match(value) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f"{name}: expected owner/name or owner/name:<version id>, got {value!r}")
    return m.group("model"), m.group("version")


def profile_for(settings: Settings, sku: str) -> Profile:
    """The trainer model that runs on ``sku`` (UnknownHardware for a SKU Replicate does not sell)."""
    pricing.check_sku(sku)
    configured_ref = (settings.profiles or {}).get(sku)
    if configured_ref:
        model, version = parse_model_ref(f"profiles.{sku}", configured_ref)
        return Profile(sku, model, version, model == settings.model)
    if sku == settings.hardware:
        return Profile(sku, settings.model, settings.version, True)
    return Profile(sku, f"{settings.model}-{profile_name(sku)}", None, False)


def configured(settings: Settings) -> list[Profile]:
    """Every profile a push covers: the default one, then PUSHED_BY_DEFAULT and settings.profiles."""
    skus: dict[str, None] = dict.fromkeys([settings.hardware, *PUSHED_BY_DEFAULT, *(settings.profiles or {})])
    return [profile_for(settings, sku) for sku in skus if sku in pricing.SKUS]


def hardware_rows(settings: Settings, listed: Iterable[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """The price table with each SKU's trainer model; names from ``GET /v1/hardware`` (``listed``)
    win, and SKUs the API lists that the table has no price for are shown without one."""
    names = {h.get("sku"): h.get("name") for h in listed}
    rows = []
    for sku, hw in pricing.SKUS.items():
        rows.append(
            {
                "sku": sku,
                "name": names.get(sku) or hw.name,
                "usd_per_hour": round(hw.usd_per_hour, 4),
                "usd_per_second": hw.usd_per_s,
                "gpus": hw.gpus,
                "listed_by_api": sku in names,
                "trainer_model": profile_for(settings, sku).model,
            }
        )
    for sku, name in names.items():
        if isinstance(sku, str) and sku not in pricing.SKUS:
            rows.append(
                {
                    "sku": sku,
                    "name": name or sku,
                    "usd_per_hour": None,
                    "usd_per_second": None,
                    "gpus": None,
                    "listed_by_api": True,
                    "trainer_model": None,
                }
            )
    return rows
