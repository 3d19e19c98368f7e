"""Validated changes to the settings — one place for the CLI's `config set` and the server's PUTs."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import replace
from typing import Any

from . import pricing
from .config import Settings
from .profiles import parse_model_ref
from .spend import SpendLimit

_MODEL = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_VERSION = re.compile(r"^[0-9a-f]{64}$")


def _cidrs(name: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f'{name}: expected a list of IP ranges such as "34.82.0.0/16"')
    out = []
    for v in value:
        try:
            out.append(str(ipaddress.ip_network(v.strip(), strict=False)))
        except ValueError:
            raise ValueError(f"{name}: {v!r} is not an IP address or range") from None
    return out


def _url(name: str, value: Any) -> str | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str) or not re.match(r"^https?://[^\s/]+", value):
        raise ValueError(f"{name}: expected an http(s) URL, got {value!r}")
    return value.rstrip("/")


def _profiles(value: Any) -> dict[str, str]:
    """``{"gpu-h100-8x": "owner/name[:version]"}``; every bad SKU or model named at once."""
    if value in (None, ""):
        return {}
    if not isinstance(value, dict):
        raise ValueError('profiles: expected {"<sku>": "owner/name[:version]", ...}')
    problems, out = [], {}
    for sku, ref in value.items():
        try:
            pricing.check_sku(sku)
            model, version = parse_model_ref(f"profiles.{sku}", ref)
            out[sku] = f"{model}:{version}" if version else model
        except ValueError as exc:
            problems.append(str(exc) if str(exc).startswith("profiles.") else f"profiles.{sku}: {exc}")
    if problems:
        raise ValueError("; ".join(problems))
    return out


def apply_settings(settings: Settings, changes: dict[str, Any]) -> Settings:
    """A new Settings with ``changes`` applied; ValueError naming every bad key at once."""
    problems, clean = [], {}
    for key, value in changes.items():
        try:
            if key == "model":
                if not isinstance(value, str) or not _MODEL.match(value):
                    raise ValueError(f"model: expected owner/name, got {value!r}")
                clean[key] = value
            elif key == "version":
                if value not in (None, "") and (not isinstance(value, str) or not _VERSION.match(value)):
                    raise ValueError(f"version: expected a 64-character version id or null, got {value!r}")
                clean[key] = value or None
            elif key == "hardware":
                if not isinstance(value, str):
                    raise ValueError(f"hardware: expected a SKU such as gpu-h100, got {value!r}")
                clean[key] = pricing.check_sku(value).sku
            elif key == "profiles":
                clean[key] = _profiles(value)
            elif key in ("public_url", "cog_url", "cog_run_url"):
                clean[key] = _url(key, value)
            elif key in ("webhook_allowed_ips", "trusted_proxies"):
                clean[key] = _cidrs(key, value)
                if key == "webhook_allowed_ips" and not clean[key]:
                    raise ValueError(
                        "webhook_allowed_ips: an empty list refuses every webhook; to accept any "
                        'address say so: ["0.0.0.0/0", "::/0"]'
                    )
            elif key == "allowed_hosts":
                if not isinstance(value, list) or not all(
                    isinstance(h, str) and re.match(r"^[A-Za-z0-9.-]+$|^\[[0-9a-fA-F:]+\]$", h) for h in value
                ):
                    raise ValueError(
                        'allowed_hosts: expected a list of host names such as "trainer.example.com"'
                    )
                clean[key] = [h.lower() for h in value]
            elif key == "spend_limit":
                clean[key] = None if value in (None, "", {}) else SpendLimit.from_dict(value).to_dict()
            else:
                raise ValueError(
                    f"{key}: unknown setting; known: model, version, hardware, profiles, public_url, cog_url, "
                    f"cog_run_url, webhook_allowed_ips, trusted_proxies, allowed_hosts, spend_limit"
                )
        except (ValueError, TypeError) as exc:
            problems.append(str(exc) if str(exc).startswith(key) else f"{key}: {exc}")
    if problems:
        raise ValueError("; ".join(problems))
    return replace(settings, **clean)
