"""Trained weights: what a source of them holds, fetched and read once.

On Replicate every finished training becomes a new version of the user's destination model:
the same image, with ``COG_WEIGHTS`` set to the URL of the training's output (our
``output.zip``). The run entry also takes any other LoRA by URL (``lora_weights``,
``extra_lora``). ``fetch_trained(source, ...)`` turns each of these into a ``Trained``:

- the source: an http(s) URL, a ``data:`` URI, a Hugging Face repo (``owner/name``,
  ``owner/name/file.safetensors``, ``hf://...`` or a ``huggingface.co`` URL) or, only for
  COG_WEIGHTS (set by whoever runs the container), a local path;
- its content: our output archive or folder (``config.json`` + the LoRA, or ``model/`` for a
  full fine-tune, or ``published_model.json`` pointing to where it was published), another
  trainer's archive holding one LoRA ``.safetensors``, or a bare
  ``.safetensors`` LoRA (the family is then read from its tensor names).

Everything lands in a cache folder keyed by the source, so the same source is fetched once
per container. Errors are ``TrainedWeightsError`` naming the field and the source (signed URLs
shown without their query string).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from .http import safe_url
from .published import POINTER_FILE, PublishedModelError, describe, read_pointer
from .spec import MODEL_FAMILIES, family_of
from .weights import WeightsError, download_url, pipeline_index

LORA_FILE = "pytorch_lora_weights.safetensors"  # what train/export.py writes (diffusers/peft naming)
# Wan 2.2 A14B's low-noise expert's LoRA, beside LORA_FILE (train/models/wan/family.py writes it; the
# run entry loads it into the pipeline's second transformer)
LOW_NOISE_FILE = "pytorch_lora_weights_low_noise.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"
STEPS_DIR = "steps"  # steps/step-N/: the LoRA of each validation step (train/steps.py)
_HF_REPO = re.compile(r"^(?:hf://)?([A-Za-z0-9][\w.-]*/[\w.-]+)(?:/(.+\.safetensors))?$")
_HF_URL = re.compile(
    r"^https://huggingface\.co/([A-Za-z0-9][\w.-]*/[\w.-]+)"
    r"(?:/(?:blob|resolve)/[^/]+/(.+))?/?$"
)


class TrainedWeightsError(ValueError):
    """A weights source that cannot be used; the message names the field and the source."""


@dataclass(frozen=True)
class Trained:
    """What one source holds, on this machine."""

    source: str  # as given, for messages (shown redacted)
    model: str | None  # model family id (flux-dev, ...); None when it cannot be told
    base_weights: str | None  # the base the training used (spec.base_weights); None for foreign LoRAs
    lora_file: Path | None  # diffusers/peft (or kohya) LoRA file
    model_dir: Path | None  # a full fine-tune's pipeline folder (replaces the base)
    published: dict | None = None  # a full fine-tune published elsewhere, not fetched yet (its pointer)
    trigger_word: str = ""
    config: dict | None = None  # our config.json, when the source is our output
    kept_steps: tuple[int, ...] = ()  # the validation steps kept under steps/step-N/ (our output)
    chosen_step: int | None = None  # the step whose files are the top-level ones

    @property
    def family(self) -> str | None:
        return family_of(self.model) if self.model else None

    def describe(self) -> str:
        if self.published:
            return f"full fine-tune for {self.model} from {shown(self.source)}, published at {describe(self.published)}"
        what = "full fine-tune" if self.model_dir else "LoRA"
        steps = f" (step {self.chosen_step}; kept steps {_steps(self.kept_steps)})" if self.kept_steps else ""
        return f"{what} for {self.model or 'an unknown family'} from {shown(self.source)}{steps}"

    def lora_for_step(self, step: int | None) -> Path | None:
        """The LoRA file of a kept ``step`` (None or the chosen step: the top-level file)."""
        if step is None or step == self.chosen_step:
            return self.lora_file
        if step not in self.kept_steps or self.lora_file is None:
            kept = f"its kept steps are {_steps(self.kept_steps)}" if self.kept_steps else "it keeps no steps"
            raise TrainedWeightsError(f"step: {shown(self.source)} has no step {step}; {kept}")
        folder = self.lora_file.parent / STEPS_DIR / f"step-{step}"
        return folder / LORA_FILE if (folder / LORA_FILE).is_file() else folder / KOHYA_FILE


def _steps(steps: tuple[int, ...]) -> str:
    return ", ".join(map(str, steps)) or "none"


def shown(source: str) -> str:
    """A source for messages: URLs without credentials or query string, data URIs abbreviated."""
    if source.startswith("data:"):
        return source[:40] + "…"
    return safe_url(source)


def _key(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:24]


# -- fetching ------------------------------------------------------------------------------------


def _hf_ref(source: str) -> tuple[str, str | None] | None:
    m = _HF_URL.match(source)
    if m:
        return m.group(1), m.group(2)
    if "://" in source and not source.startswith("hf://"):
        return None
    m = _HF_REPO.match(source)
    return (m.group(1), m.group(2)) if m else None


def _fetch_hf(repo: str, filename: str | None, dest: Path, field: str, hf_token: str | None) -> Path:
    try:
        from huggingface_hub import HfApi, hf_hub_download

        if filename is None:
            files = HfApi(token=hf_token).list_repo_files(repo)
            if LORA_FILE in files:
                filename = LORA_FILE
            else:
                found = [f for f in files if f.endswith(".safetensors")]
                if len(found) != 1:
                    raise TrainedWeightsError(
                        f"{field}: the Hugging Face repo {repo} holds {len(found)} .safetensors files "
                        f"({', '.join(found[:6]) or 'none'}); name one: {repo}/<file>.safetensors"
                    )
                filename = found[0]
        return Path(hf_hub_download(repo, filename, token=hf_token, local_dir=dest))
    except TrainedWeightsError:
        raise
    except Exception as exc:  # offline, private repo without a token, no such repo or file
        why = " ".join(str(exc).split())[:300]
        raise TrainedWeightsError(
            f"{field}: cannot get {repo} from the Hugging Face Hub "
            f"({type(exc).__name__}: {why}); a private repo needs hf_token"
        ) from None


def _fetch_file(source: str, dest_dir: Path, field: str, allow_local: bool, hf_token: str | None) -> Path:
    """The source's bytes (or folder) on this machine."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    if source.startswith("data:"):
        head, sep, payload = source.partition(",")
        if not sep or ";base64" not in head:
            raise TrainedWeightsError(f"{field}: a data URI must be base64-encoded (data:<type>;base64,...)")
        try:
            data = base64.b64decode(payload, validate=True)
        except ValueError:
            raise TrainedWeightsError(f"{field}: the data URI is not valid base64") from None
        path = dest_dir / "weights"
        path.write_bytes(data)
        return path
    scheme = urlsplit(source).scheme.lower() if "://" in source else ""
    if scheme in ("http", "https") and not _HF_URL.match(source):
        name = Path(unquote(urlsplit(source).path)).name or "weights"
        path = dest_dir / name
        try:
            download_url(source, path)
        except WeightsError as exc:
            raise TrainedWeightsError(f"{field}: {exc}") from None
        return path
    hf = _hf_ref(source)
    local = Path(source[len("file://") :] if scheme == "file" else source).expanduser()
    if allow_local and (scheme in ("", "file")) and local.exists():
        return local
    if hf is not None:  # owner/name[/file], hf://..., or a huggingface.co URL
        return _fetch_hf(hf[0], hf[1], dest_dir, field, hf_token)
    if allow_local and scheme in ("", "file"):
        raise TrainedWeightsError(f"{field}: {source} does not exist")
    raise TrainedWeightsError(
        f"{field}: {shown(source)!r} is not an http(s) URL, a data URI or a Hugging "
        f"Face repo (owner/name or owner/name/file.safetensors)"
    )


# -- reading ---------------------------------------------------------------------------------------


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n < 100 * 2**20 and head[8:9] == b"{"


def lora_family(path: Path) -> str | None:
    """``flux`` or ``sdxl`` from a LoRA file's tensor names (diffusers, peft or kohya naming)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    if any(("single_transformer_blocks" in k or "double_blocks" in k or "single_blocks" in k) for k in keys):
        return "flux"
    unet_blocks = ("down_blocks", "up_blocks", "mid_block")
    if any(k.startswith(("unet.", "lora_unet_", "text_encoder", "lora_te")) for k in keys) or any(
        k.startswith("lycoris_" + b) for k in keys for b in unet_blocks
    ):
        return "sdxl"
    return None


def _our_config(folder: Path) -> tuple[dict, Path] | None:
    """Our ``config.json`` below ``folder`` (not a pipeline component's) and the folder holding it."""
    configs = [
        p
        for p in sorted(folder.rglob("config.json"))
        if "model" not in p.relative_to(folder).parts[:-1] and p.parent.name not in ("transformer", "unet")
    ]
    for path in configs:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if (
            isinstance(doc, dict)
            and doc.get("trainer") == "advanced-trainer"
            and isinstance(doc.get("spec"), dict)
        ):
            return doc, path.parent
    return None


def _read_our_output(config: dict, root: Path, source: str, field: str) -> Trained:
    spec = config["spec"]
    model = spec.get("model")
    if model not in MODEL_FAMILIES:
        raise TrainedWeightsError(
            f"{field}: {shown(source)} was trained for {model!r}, which this version "
            f"cannot render (it renders {', '.join(MODEL_FAMILIES)})"
        )
    lora_file, model_dir, published = None, None, None
    if spec.get("mode") == "full":
        model_dir = root / "model"
        if (root / POINTER_FILE).is_file() and pipeline_index(model_dir) is None:
            model_dir = None  # published elsewhere: fetched when first needed (train/published.py)
            try:
                published = read_pointer(root / POINTER_FILE)
            except PublishedModelError as exc:
                raise TrainedWeightsError(f"{field}: {shown(source)}: {exc}") from None
        elif pipeline_index(model_dir) is None:
            raise TrainedWeightsError(
                f"{field}: {shown(source)} is a full fine-tune without model/model_index.json"
            )
    else:
        lora_file = root / LORA_FILE if (root / LORA_FILE).is_file() else root / KOHYA_FILE
        if not lora_file.is_file():
            raise TrainedWeightsError(f"{field}: {shown(source)} has a config.json but no {LORA_FILE}")
    return Trained(
        source=source,
        model=model,
        base_weights=spec.get("base_weights"),
        lora_file=lora_file,
        model_dir=model_dir,
        published=published,
        trigger_word=spec.get("trigger_word") or "",
        config=config,
        kept_steps=_kept_steps(root, config.get("chosen_step")) if lora_file else (),
        chosen_step=config.get("chosen_step") if isinstance(config.get("chosen_step"), int) else None,
    )


def _kept_steps(root: Path, chosen: Any = None) -> tuple[int, ...]:
    """The kept validation steps: those under steps/step-N/, and the chosen one (its files are the
    top-level ones)."""
    found = [chosen] if isinstance(chosen, int) else []
    for folder in (root / STEPS_DIR).glob("step-*"):
        tail = folder.name.removeprefix("step-")
        if tail.isdigit() and any((folder / name).is_file() for name in (LORA_FILE, KOHYA_FILE)):
            found.append(int(tail))
    return tuple(sorted(set(found)))


def _read_folder(folder: Path, source: str, field: str, default_model: str) -> Trained:
    ours = _our_config(folder)
    if ours is not None:
        return _read_our_output(ours[0], ours[1], source, field)
    files = [p for p in sorted(folder.rglob("*.safetensors")) if not p.name.startswith(".")]
    preferred = [p for p in files if p.name == LORA_FILE] or files
    if len(preferred) != 1:
        names = ", ".join(str(p.relative_to(folder)) for p in files[:6]) or "none"
        raise TrainedWeightsError(
            f"{field}: {shown(source)} holds {len(files)} .safetensors files "
            f"({names}); expected one LoRA or an advanced-trainer output"
        )
    return _read_lora_file(preferred[0], source, field, default_model)


def _read_lora_file(path: Path, source: str, field: str, default_model: str) -> Trained:
    try:
        family = lora_family(path)
    except Exception as exc:  # a truncated or damaged file
        raise TrainedWeightsError(
            f"{field}: {shown(source)} is not a readable .safetensors file ({type(exc).__name__}: {exc})"
        ) from None
    if family is None:
        model = None
    else:
        same = family_of(default_model) == family
        model = default_model if same else {"flux": "flux-dev", "sdxl": "sdxl"}[family]
    return Trained(source=source, model=model, base_weights=None, lora_file=path, model_dir=None)


def fetch_trained(
    source: str,
    cache_dir: Path,
    *,
    field: str,
    default_model: str = "flux-dev",
    allow_local: bool = False,
    hf_token: str | None = None,
) -> Trained:
    """Fetch ``source`` into ``cache_dir`` (once) and read what it holds; see the module docstring."""
    from .data import DataLimits, DatasetError, UnsafeArchiveError, archive_kind, extract_archive

    source = source.strip()
    if not source:
        raise TrainedWeightsError(f"{field}: empty")
    slot = Path(cache_dir) / _key(source)
    unpacked = slot / "unpacked"
    if unpacked.is_dir():  # fetched and unpacked before
        return _read_folder(unpacked, source, field, default_model)
    kept = sorted(slot.glob("*.safetensors")) if slot.is_dir() else []
    if kept:  # a bare LoRA fetched before
        return _read_lora_file(kept[0], source, field, default_model)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    raw_dir = Path(tempfile.mkdtemp(prefix=".fetch-", dir=cache_dir))
    try:
        path = _fetch_file(source, raw_dir, field, allow_local, hf_token)
        if path.is_dir():
            return _read_folder(path, source, field, default_model)
        if _is_safetensors(path):
            kept = slot / (path.name if path.name.endswith(".safetensors") else "lora.safetensors")
            slot.mkdir(parents=True, exist_ok=True)
            if raw_dir in path.parents:
                shutil.move(str(path), kept)
            else:
                shutil.copyfile(path, kept)
            return _read_lora_file(kept, source, field, default_model)
        try:
            archive_kind(path)
        except DatasetError:
            raise TrainedWeightsError(
                f"{field}: {shown(source)} is neither a .safetensors LoRA nor a zip/tar archive of one"
            ) from None
        tmp = slot / ".unpacking"
        shutil.rmtree(tmp, ignore_errors=True)
        slot.mkdir(parents=True, exist_ok=True)
        try:
            extract_archive(path, tmp, DataLimits(max_files=200_000, max_bytes=1 << 40))
        except (DatasetError, UnsafeArchiveError) as exc:
            raise TrainedWeightsError(f"{field}: cannot unpack {shown(source)}: {exc}") from None
        tmp.rename(unpacked)
        try:
            return _read_folder(unpacked, source, field, default_model)
        except TrainedWeightsError:
            shutil.rmtree(unpacked, ignore_errors=True)  # an unusable archive is not kept
            raise
    finally:
        shutil.rmtree(raw_dir, ignore_errors=True)
