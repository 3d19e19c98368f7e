"""Replicate's status page, checked with a short timeout. Unreachable means "unknown", never a failure."""

from __future__ import annotations

import os

import httpx

STATUS_URL = "https://www.replicatestatus.com/api/v2/status.json"


def replicate_status(url: str | None = None, timeout: float = 3.0) -> dict:
    """{"indicator": none|minor|major|critical|unknown, "description": ...}; honours proxy variables.

    ADVANCED_TRAINER_STATUS_URL overrides the address (a mirror, or tests)."""
    url = url or os.environ.get("ADVANCED_TRAINER_STATUS_URL") or STATUS_URL
    try:
        r = httpx.get(url, timeout=timeout, trust_env=True, follow_redirects=True)
        r.raise_for_status()
        status = r.json().get("status", {})
        return {
            "indicator": status.get("indicator", "unknown"),
            "description": status.get("description", ""),
            "url": "https://www.replicatestatus.com",
        }
    except (httpx.HTTPError, ValueError):
        return {
            "indicator": "unknown",
            "description": "status page unreachable",
            "url": "https://www.replicatestatus.com",
        }
