"""Where the client keeps its state, and its settings.

    ~/.simpletuner/                  (ADVANCED_TRAINER_HOME overrides)
        settings.json                provider settings, spend limit
        secrets.json                 the API token saved by `token set` (mode 0600)
        jobs.sqlite3                 job store and cost ledger
        cloud_outputs/<job id>/      delivered outputs (tries/<prediction id>/: images rendered with them)
        cloud_outputs/runs/<id>/     images from `advanced-trainer run`

Settings never hold secrets; the token lives only in secrets.json (or the environment).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "simpletuner/advanced-trainer"
DEFAULT_HARDWARE = "gpu-l40s"
REPLICATE_WEBHOOK_CIDRS = ["34.82.0.0/16", "35.185.0.0/16"]
WEBHOOK_PATH = "/api/webhooks/replicate"


def home() -> Path:
    return Path(os.environ.get("ADVANCED_TRAINER_HOME") or Path.home() / ".simpletuner")


def _write_private(path: Path, text: str) -> None:
    """Write atomically with mode 0600 (the file never exists with wider permissions)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class Settings:
    """User settings (settings.json). Every field has a safe default."""

    model: str = DEFAULT_MODEL  # the trainer model on Replicate (or your own owner/model)
    version: str | None = None  # a pinned version id of ``model``; None = the latest
    hardware: str = DEFAULT_HARDWARE  # ``model``'s hardware: the default for estimates and jobs
    # SKU -> "owner/name[:version]": the trainer model for other hardware (default
    # ``<model>-<profile>``, e.g. simpletuner/advanced-trainer-h100-8x; see client.profiles)
    profiles: dict[str, str] = field(default_factory=dict)
    public_url: str | None = None  # public base URL that reaches `serve` (webhooks); None = poll
    webhook_allowed_ips: list[str] = field(default_factory=lambda: list(REPLICATE_WEBHOOK_CIDRS))
    trusted_proxies: list[str] = field(default_factory=list)
    cog_url: str | None = None  # provider "cog": a Cog HTTP server in train mode (trainings)
    cog_run_url: str | None = None  # provider "cog": a Cog HTTP server in run mode (trying the weights)
    allowed_hosts: list[str] = field(default_factory=list)  # extra Host names `serve` answers to
    spend_limit: dict[str, Any] | None = None  # {"amount_usd", "period", "action"}

    @classmethod
    def load(cls, root: Path | None = None) -> Settings:
        path = (root or home()) / "settings.json"
        if not path.is_file():
            return cls()
        data = json.loads(path.read_text())
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def save(self, root: Path | None = None) -> Path:
        path = (root or home()) / "settings.json"
        _write_private(path, json.dumps(asdict(self), indent=2) + "\n")
        return path

    def webhook_url(self) -> str | None:
        return self.public_url.rstrip("/") + WEBHOOK_PATH if self.public_url else None


def secrets_path(root: Path | None = None) -> Path:
    return (root or home()) / "secrets.json"


def load_secrets(root: Path | None = None) -> dict[str, str]:
    path = secrets_path(root)
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def save_secret(name: str, value: str | None, root: Path | None = None) -> Path:
    data = load_secrets(root)
    if value is None:
        data.pop(name, None)
    else:
        data[name] = value
    path = secrets_path(root)
    _write_private(path, json.dumps(data) + "\n")
    return path


def outputs_dir(root: Path | None = None) -> Path:
    return (root or home()) / "cloud_outputs"


def store_path(root: Path | None = None) -> Path:
    return (root or home()) / "jobs.sqlite3"
