"""Delivering a finished job's output archive: download (resuming), verify, unpack."""

from __future__ import annotations

import base64
import shutil
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable

import httpx


class DeliveryError(Exception):
    pass


def output_url(kind: str, output) -> str | None:
    """The archive's URL in a job's output (a prediction's output, a training's ``weights``)."""
    if isinstance(output, dict):
        output = output.get("weights")
    if isinstance(output, list):
        output = output[-1] if output else None
    return output if isinstance(output, str) else None


def download(url: str, dest: Path, progress: Callable[[int, int | None], None] | None = None,
             attempts: int = 5, timeout: float = 60.0) -> Path:
    """Fetch ``url`` into ``dest``, resuming a partial ``dest.part`` with an HTTP Range request."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if url.startswith("data:"):
        dest.write_bytes(base64.b64decode(url.split(",", 1)[1]))
        return dest
    part = dest.with_name(dest.name + ".part")
    last_error: Exception | None = None
    for _ in range(attempts):
        have = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with httpx.stream("GET", url, headers=headers, timeout=timeout, follow_redirects=True) as r:
                if r.status_code == 416:  # already complete
                    break
                if r.status_code not in (200, 206):
                    raise DeliveryError(f"download of {url} failed: HTTP {r.status_code}")
                if r.status_code == 200:
                    have = 0  # the server ignored the range: start over
                total = r.headers.get("content-length")
                total_i = int(total) + have if total is not None else None
                with open(part, "ab" if have else "wb") as f:
                    for chunk in r.iter_bytes(1 << 20):
                        f.write(chunk)
                        have += len(chunk)
                        if progress:
                            progress(have, total_i)
                if total_i is not None and have < total_i:
                    raise httpx.ReadError(f"connection closed at {have} of {total_i} bytes")
                break
        except (httpx.HTTPError, OSError) as exc:
            last_error = exc
            continue
    else:
        raise DeliveryError(f"download of {url} did not complete after {attempts} attempts ({last_error}); "
                            f"run `advanced-trainer download` again to resume")
    part.replace(dest)
    return dest


def verify_zip(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise DeliveryError(f"{path.name}: {bad} is corrupt (CRC mismatch)")
            return zf.namelist()
    except zipfile.BadZipFile as exc:
        raise DeliveryError(f"{path.name} is not a complete zip archive ({exc})") from None


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
        "lora": str(folder / "pytorch_lora_weights.safetensors") if "pytorch_lora_weights.safetensors" in found else None,
        "kohya": str(folder / "lora_kohya.safetensors") if "lora_kohya.safetensors" in found else None,
        "model": str(folder / "model") if any(n.startswith("model/") for n in found) else None,
        "samples": sorted(str(folder / n) for n in found if n.startswith("samples/")),
        "loss_plot": str(folder / "loss.png") if "loss.png" in found else None,
        "config": str(folder / "config.json") if "config.json" in found else None,
    }
