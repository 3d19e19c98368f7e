"""Finding the base weights a spec names: a diffusers folder, a folder in ``weights/``, or a Hub id."""

from __future__ import annotations

import os
import re
from pathlib import Path

WEIGHTS_DIR = Path(os.environ.get("ADVANCED_TRAINER_WEIGHTS", Path(__file__).resolve().parent.parent / "weights"))
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class WeightsError(FileNotFoundError):
    """The base weights cannot be found; the message says what to provide."""


def _is_pipeline(folder: Path) -> bool:
    return (folder / "model_index.json").is_file()


def resolve_base_weights(ref: str, weights_dir: Path | None = None) -> Path:
    """A local diffusers pipeline folder for ``ref`` (path, ``weights/<name>``, or Hub id)."""
    weights_dir = Path(weights_dir or WEIGHTS_DIR)
    candidates = [Path(ref).expanduser(), weights_dir / ref, weights_dir / ref.split("/")[-1]]
    for folder in candidates:
        if folder.is_dir() and _is_pipeline(folder):
            return folder
    for folder in candidates:
        if folder.is_dir():
            raise WeightsError(f"base_weights: {folder} has no model_index.json; it must be a diffusers pipeline folder")
    if not _HUB_ID.match(ref):
        raise WeightsError(f"base_weights: {ref!r} is neither a diffusers pipeline folder nor a Hub id (owner/name); "
                           f"looked in {', '.join(str(c) for c in candidates)}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, token=os.environ.get("HF_TOKEN") or None,
                                      allow_patterns=["*.json", "*.txt", "*.model", "*.safetensors"],
                                      ignore_patterns=["*.fp16.safetensors", "*/diffusion_pytorch_model-*.bin"]))
    except Exception as exc:  # network down, gated repo without a token, no such repo
        raise WeightsError(
            f"base_weights: cannot get {ref!r} from the Hugging Face Hub ({type(exc).__name__}: {str(exc)[:300]}). "
            f"Put the pipeline folder in {weights_dir / ref.split('/')[-1]}, pass a local folder, "
            f"or set HF_TOKEN for a gated repo.") from None
