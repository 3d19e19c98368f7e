"""Delivering a finished job's output archive: download (resuming), verify, unpack."""

from __future__ import annotations

import base64
import json
import os
import shutil
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from train.http import DownloadError, RetryPolicy, retryable_status
from train.http import download as http_download

from .errors import ProviderError, UserError

LORA_FILE = "pytorch_lora_weights.safetensors"
JOB_ID = "<job id>"  # deliver_job puts the job's own id in its place
RETRY_HINT = f"run `advanced-trainer download {JOB_ID}` again to resume"


class DeliveryError(ProviderError):
    """The outputs could not be fetched or unpacked. A ``ClientError``: the CLI exits 3 (try again)
    with the message, or 2 when the remote refusal is one the user must act on (an expired URL)."""


def output_url(kind: str, output) -> str | None:
    """The archive's URL in a job's output (a prediction's output, a training's ``weights``)."""
    if isinstance(output, dict):
        output = output.get("weights")
    if isinstance(output, list):
        output = output[-1] if output else None
    return output if isinstance(output, str) else None


def download(
    url: str,
    dest: Path,
    progress: Callable[[int, int | None], None] | None = None,
    attempts: int = 5,
    timeout: float = 60.0,
) -> Path:
    """Fetch ``url`` into ``dest``: retried, and resuming a partial ``dest.part`` with an HTTP Range request
    (also when a later call picks up an earlier one's partial file)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if url.startswith("data:"):
        dest.write_bytes(base64.b64decode(url.split(",", 1)[1]))
        return dest
    try:
        return http_download(
            url, dest, progress=progress, timeout=timeout, retry=RetryPolicy(attempts=attempts)
        )
    except DownloadError as exc:
        if exc.status is not None and not retryable_status(exc.status):
            # 403 (an expired URL), 404: trying again will not help
            raise DeliveryError(str(exc), exc.status) from None
        raise DeliveryError(f"{exc}; {RETRY_HINT}", exc.status) from None


def verify_zip(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise DeliveryError(f"{path.name}: {bad} is corrupt (CRC mismatch); {RETRY_HINT}")
            return zf.namelist()
    except zipfile.BadZipFile as exc:
        raise DeliveryError(f"{path.name} is not a complete zip archive ({exc}); {RETRY_HINT}") from None


def unpack(path: Path, folder: Path) -> list[Path]:
    """Extract ``path`` into ``folder``; refuses entries that would land outside it."""
    out = []
    root = folder.resolve()
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            name = PurePosixPath(info.filename.replace("\\", "/"))
            if name.is_absolute() or ".." in name.parts:
                raise DeliveryError(f"{path.name}: entry {info.filename!r} would land outside {folder}")
            target = (folder / name).resolve()
            if not target.is_relative_to(root):
                raise DeliveryError(f"{path.name}: entry {info.filename!r} would land outside {folder}")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            out.append(target)
    return out


def deliver(url: str, folder: Path, progress=None) -> dict:
    """Download, verify and unpack a job's output archive into ``folder``; returns what is where."""
    archive = download(url, folder / "output.zip", progress)
    verify_zip(archive)
    files = unpack(archive, folder)
    found = {p.relative_to(folder).as_posix() for p in files}
    return {
        "folder": str(folder),
        "archive": str(archive),
        "lora": (
            str(folder / "pytorch_lora_weights.safetensors")
            if "pytorch_lora_weights.safetensors" in found
            else None
        ),
        "kohya": str(folder / "lora_kohya.safetensors") if "lora_kohya.safetensors" in found else None,
        "model": str(folder / "model") if any(n.startswith("model/") for n in found) else None,
        "samples": sorted(str(folder / n) for n in found if n.startswith("samples/")),
        "loss_plot": str(folder / "loss.png") if "loss.png" in found else None,
        "config": str(folder / "config.json") if "config.json" in found else None,
        **step_choice(folder, found),
    }


def step_choice(folder: Path, found: set[str]) -> dict:
    """What the trainer chose among its validation steps (scores.json) and where each kept step is."""
    kept = {}
    for name in found:
        parts = name.split("/")
        if len(parts) == 3 and parts[0] == "steps" and parts[2] == LORA_FILE and parts[1].startswith("step-"):
            tail = parts[1].removeprefix("step-")
            if tail.isdigit():
                kept[int(tail)] = str(folder / name)
    chosen, reason = None, None
    if "scores.json" in found:
        try:
            doc = json.loads((folder / "scores.json").read_text())
            chosen, reason = doc.get("chosen_step"), doc.get("reason")
        except (OSError, ValueError):
            pass
    if isinstance(chosen, int) and LORA_FILE in found:
        kept[chosen] = str(folder / LORA_FILE)  # the chosen step's files are the top-level ones
    return {
        "contact_sheet": str(folder / "contact_sheet.png") if "contact_sheet.png" in found else None,
        "scores": str(folder / "scores.json") if "scores.json" in found else None,
        "chosen_step": chosen,
        "selection_reason": reason,
        "kept_steps": {str(k): kept[k] for k in sorted(kept)},
    }


def pick_step(info: dict, step: int) -> dict:
    """The delivery with ``step``'s LoRA as the one to use (``download --step N``)."""
    kept = info.get("kept_steps") or {}
    if str(step) not in kept:
        raise UserError(f"--step: the job kept no step {step}; kept steps: {', '.join(kept) or 'none'}")
    kohya = Path(kept[str(step)]).with_name("lora_kohya.safetensors")
    return {
        **info,
        "lora": kept[str(step)],
        "kohya": str(kohya) if kohya.is_file() else None,
        "picked_step": step,
    }


def publish_delivered(
    folder: Path, target: Any, env: Mapping[str, str], log: Callable[[str], Any] = print
) -> dict:
    """Publish a delivered job's outputs (the files its ``output.zip`` holds, nothing else in the
    folder) to ``target`` (a ``train.spec.PublishSpec``) from this machine, with the credentials in
    ``env`` (HF_TOKEN; AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, else boto3's chain). The outcome
    is added to the folder's config.json (``publish.from_client``). A failure is a UserError with
    the target's reason."""
    import tempfile

    from train.publish import PublishError, publish

    names = verify_zip(folder / "output.zip")
    with tempfile.TemporaryDirectory(prefix="advanced-trainer-publish-") as tmp:
        staged = Path(tmp)
        for name in names:
            if name.endswith("/"):
                continue
            dest = staged / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(folder / name, dest)  # no second copy of the weights
            except OSError:
                shutil.copyfile(folder / name, dest)
        try:
            results = publish(
                staged,
                target,
                hf_token=env.get("HF_TOKEN"),
                s3_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
                s3_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
                log=log,
            )
        except PublishError as exc:
            raise UserError(f"publish: {exc}") from None
    config = folder / "config.json"
    if config.is_file():
        doc = json.loads(config.read_text())
        doc.setdefault("publish", {})["from_client"] = results
        config.write_text(json.dumps(doc, indent=2) + "\n")
    return results
