"""Trying trained weights: run a trained model on a prompt and download the images.

On Replicate a finished training is a new version of its destination model, so running it is
a prediction on ``owner/name`` (its latest version) or ``owner/name:version``. A job from the
store names its own version. A Cog server has no destinations: the run-mode server (its
``predict.py``) gets the job's weights as ``lora_weights``.
"""

from __future__ import annotations

import json
import mimetypes
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from .delivery import DeliveryError, download, output_url
from .errors import ProviderError, UserError
from .providers import Provider
from .records import Job
from .store import JobStore

_REF = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[0-9a-f]{64})?$")


@dataclass
class Target:
    """What to run: a Replicate model reference, or a Cog job's weights."""

    provider: str  # replicate | cog
    ref: str  # owner/name[:version] (replicate) or the job id (cog)
    job: Job | None = None
    weights: str | None = None  # cog: sent as lora_weights


def resolve_target(store: JobStore, target: str) -> Target:
    """A job id from the store (a succeeded training), or a Replicate model ``owner/name[:version]``."""
    rec = store.get(target)
    if rec is not None:
        if rec["status"] != "succeeded":
            raise UserError(f"job {target} is {rec['status']}; only a succeeded training can be run")
        output_json = rec["output_json"]
        output = json.loads(output_json) if output_json else None
        if rec["provider"] == "cog":
            weights = output_url(rec["kind"], output)
            if not weights:
                raise UserError(f"job {target} has no weights to run")
            return Target("cog", target, rec, weights)
        version = output.get("version") if isinstance(output, dict) else None
        ref = version or rec.get("destination")
        if not ref:
            raise UserError(f"job {target} has no destination model to run (it was not a training)")
        return Target("replicate", ref, rec)
    if _REF.match(target):
        return Target("replicate", target)
    raise UserError(
        f"{target!r} is neither a job in the store nor a model (owner/name or owner/name:version)"
    )


@dataclass
class RunResult:
    prediction: dict
    images: list[Path]
    folder: Path

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.prediction.get("id"),
            "status": self.prediction.get("status"),
            "images": [str(p) for p in self.images],
            "folder": str(self.folder),
            "predict_time": (self.prediction.get("metrics") or {}).get("predict_time"),
        }


def _name(url: str, i: int) -> str:
    if url.startswith("data:"):
        ext = mimetypes.guess_extension(url[5:].split(";", 1)[0]) or ".bin"
        return f"out-{i}{'.jpg' if ext == '.jpeg' else ext}"
    name = PurePosixPath(urlsplit(url).path).name
    return name if name and "." in name else f"out-{i}.bin"


def run(
    provider: Provider, target: Target, inputs: dict[str, Any], folder_for: Callable[[str], Path]
) -> RunResult:
    """Run ``target`` with ``inputs`` and download its images into ``folder_for(prediction id)``."""
    inputs = {k: v for k, v in inputs.items() if v is not None}
    if target.provider == "cog":
        inputs.setdefault("lora_weights", target.weights)
    obj = provider.predict(target.ref, inputs)
    if obj.get("status") != "succeeded":
        raise ProviderError(
            f"run {target.ref}: the prediction {obj.get('status')}: {obj.get('error') or 'no reason given'}"
        )
    outputs = obj.get("output")
    outputs = outputs if isinstance(outputs, list) else [outputs]
    folder = Path(folder_for(obj["id"]))
    images = []
    seen: set[str] = set()
    for i, url in enumerate(o for o in outputs if isinstance(o, str)):
        name = _name(url, i)
        name = f"{i}-{name}" if name in seen else name
        seen.add(name)
        try:
            images.append(download(url, folder / name))
        except (DeliveryError, OSError) as exc:
            raise ProviderError(f"run {target.ref}: could not download {name}: {exc}") from None
    if not images:
        raise ProviderError(f"run {target.ref}: the prediction returned no images")
    return RunResult(obj, images, folder)
