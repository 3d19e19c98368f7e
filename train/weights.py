"""Base weights: finding them, recording them in a manifest, fetching them, checking them.

A base model is a diffusers pipeline folder (one with ``model_index.json``). They live in
the weights cache, ``weights/`` (``ADVANCED_TRAINER_WEIGHTS`` overrides), one folder each.

- ``resolve_base_weights(ref)``: the folder a spec's ``base_weights`` names (a path,
  ``weights/<name>``, or a Hub id downloaded with ``snapshot_download``).
- ``weights/manifest.json`` records every file of every model with its size and sha256::

      {"version": 1,
       "models": {"FLUX.1-dev": {"files": {"model_index.json": {"size": 536, "sha256": "ab12..."},
                                           "transformer/diffusion_pytorch_model-00001-of-00003.safetensors":
                                               {"size": 9962580296, "sha256": null}}}}}

  ``sha256`` may be null (not recorded). ``write_manifest`` writes it, ``verify_weights``
  checks sizes (always: cheap) and sha256 (only with ``full_hash``: multi-GB reads).
- ``fetch_weights_archive(source, weights_dir)``: a .tar / .tar.gz / .zip (URL or path)
  of one or more pipeline folders, unpacked safely into the cache; existing model folders
  are never overwritten.
- ``prepare_weights(...)``: what the Cog container's ``setup()`` calls: fetch, verify,
  fall back to the Hub when allowed, and fail with a message that says what to provide.

Command line::

    python -m train.weights manifest [--weights-dir D] [--no-hash] [NAME ...]
    python -m train.weights verify   [--weights-dir D] [--hash]
    python -m train.weights fetch    SOURCE [--weights-dir D]

Nothing here deletes anything in the weights folder except its own temporary files
(``.fetch-*``, ``.manifest.json.tmp-*``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote, urlsplit

from .http import DownloadError, RetryPolicy, download, safe_url

WEIGHTS_DIR = Path(
    os.environ.get("ADVANCED_TRAINER_WEIGHTS", Path(__file__).resolve().parent.parent / "weights")
)
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_ALLOW = ["*.json", "*.txt", "*.model", "*.safetensors"]
_HUB_IGNORE = ["*.fp16.safetensors", "*/diffusion_pytorch_model-*.bin"]
_CHUNK = 1 << 20
_PROGRESS_MIN_BYTES = 64 << 20  # downloads at least this big print a line every ~5 %
_FETCH_PREFIX = ".fetch-"
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
# An archive of base pipelines fetched into the cache by setup(). Not COG_WEIGHTS: on Replicate that
# variable carries a training's *trained* weights into its destination version (see train/trained.py).
BASE_WEIGHTS_ENV = "ADVANCED_TRAINER_BASE_WEIGHTS"


class WeightsError(FileNotFoundError):
    """The base weights cannot be found or used; the message says what to provide."""


# A diffusers pipeline folder's index: a DiffusionPipeline's, or a modular pipeline's (FLUX.3, which
# diffusers ships as modular pipelines only: ``ModularPipeline.save_pretrained`` writes the second).
PIPELINE_INDEXES = ("model_index.json", "modular_model_index.json")


def pipeline_index(folder: Path) -> Path | None:
    """The folder's pipeline index file, or None where it is not a diffusers pipeline folder."""
    return next((folder / n for n in PIPELINE_INDEXES if (folder / n).is_file()), None)


def point_modular_index(folder: Path, source: str) -> None:
    """Name ``source`` (a Hub repo id) as where every component a modular pipeline folder holds
    loads from, as diffusers' own ``save_pretrained(push_to_hub=True)`` writes its index. A copied
    index may name another repo (a full fine-tune's is the base's): loaded by ``source``'s id,
    diffusers would fetch that repo's component. Loading the folder itself is unchanged: diffusers
    loads the components present in a local folder from it. Nothing to do without such an index."""
    index = Path(folder) / "modular_model_index.json"
    if not index.is_file():
        return
    data = json.loads(index.read_text())
    for entry in data.values():
        spec = entry[2] if isinstance(entry, list) and len(entry) == 3 else None
        if isinstance(spec, dict) and spec.get("subfolder") and (Path(folder) / spec["subfolder"]).is_dir():
            spec.update(pretrained_model_name_or_path=source, revision=None)
    index.write_text(json.dumps(data, indent=2) + "\n")


def _is_pipeline(folder: Path) -> bool:
    return pipeline_index(Path(folder)) is not None


def resolve_base_weights(ref: str, weights_dir: Path | None = None) -> Path:
    """A local diffusers pipeline folder for ``ref`` (path, ``weights/<name>``, or Hub id)."""
    weights_dir = Path(weights_dir or WEIGHTS_DIR)
    candidates = [Path(ref).expanduser(), weights_dir / ref, weights_dir / ref.split("/")[-1]]
    for folder in candidates:
        if folder.is_dir() and _is_pipeline(folder):
            return folder
    for folder in candidates:
        if folder.is_dir():
            raise WeightsError(
                f"base_weights: {folder} has no model_index.json (nor modular_model_index.json); it must be a diffusers pipeline folder"
            )
    archive = per_base_source(os.environ.get(BASE_WEIGHTS_ENV), ref)
    if archive is not None:  # one archive per base: this one's, fetched now (the train entry's jobs)
        fetch_weights_archive(archive, weights_dir)
        if (weights_dir / ref.split("/")[-1]).is_dir() and _is_pipeline(weights_dir / ref.split("/")[-1]):
            return weights_dir / ref.split("/")[-1]
        raise WeightsError(
            f"base_weights: {_describe_source(archive)} ({BASE_WEIGHTS_ENV}) holds no folder named "
            f"{ref.split('/')[-1]!r}"
        )
    if not _HUB_ID.match(ref):
        raise WeightsError(
            f"base_weights: {ref!r} is neither a diffusers pipeline folder "
            f"nor a Hub id (owner/name); "
            f"looked in {', '.join(str(c) for c in candidates)}"
        )
    try:
        return _snapshot_download(ref, os.environ.get("HF_TOKEN") or None)
    except Exception as exc:  # network down, gated repo without a token, no such repo
        raise WeightsError(
            f"base_weights: cannot get {ref!r} from the Hugging Face Hub "
            f"({type(exc).__name__}: {str(exc)[:300]}). "
            f"Put the pipeline folder in {weights_dir / ref.split('/')[-1]}, pass a local folder, "
            f"or set HF_TOKEN for a gated repo."
        ) from None


def resolve_model_folder(ref: str, field: str) -> Path:
    """A local folder of a transformers model (a scorer, a captioner) for ``ref``: a path, a folder
    under ``weights/``, or a Hub id (downloaded like base weights, with ``HF_TOKEN`` when gated);
    WeightsError naming ``field`` otherwise."""
    candidates = [Path(ref).expanduser(), WEIGHTS_DIR / ref, WEIGHTS_DIR / ref.split("/")[-1]]
    for folder in candidates:
        if folder.is_dir() and (folder / "config.json").is_file():
            return folder
    if not _HUB_ID.match(ref):
        raise WeightsError(
            f"{field}: {ref!r} is neither a model folder (with config.json) nor a Hub id; "
            f"looked in {', '.join(str(c) for c in candidates)}"
        )
    try:
        return _snapshot_download(ref, os.environ.get("HF_TOKEN") or None)
    except Exception as exc:  # offline, gated, no such repo
        raise WeightsError(
            f"{field}: cannot get {ref!r} from the Hugging Face Hub ({type(exc).__name__}: "
            f"{str(exc)[:300]}); put the model folder in {WEIGHTS_DIR / ref.split('/')[-1]}"
        ) from None


# --------------------------------------------------------------------------------------------
# manifest


def _show(path: Path) -> str:
    """``path`` for messages: relative to the working directory when below it (``weights/X`` in Cog)."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(path)


def pipeline_folders(weights_dir: Path | None = None) -> list[str]:
    """Names of the pipeline folders directly under ``weights_dir`` (hidden / temporary ones skipped)."""
    weights_dir = Path(weights_dir or WEIGHTS_DIR)
    if not weights_dir.is_dir():
        return []
    return sorted(
        p.name for p in weights_dir.iterdir() if not p.name.startswith(".") and p.is_dir() and _is_pipeline(p)
    )


def _model_files(folder: Path) -> list[str]:
    """Every file below a model folder as a relative posix path, hidden entries (``.cache/``) skipped."""
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            p = Path(root) / name
            if not name.startswith(".") and p.is_file():
                files.append(p.relative_to(folder).as_posix())
    return files


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _model_entry(folder: Path, sha256: bool) -> dict:
    files = {}
    for rel in _model_files(folder):
        p = folder / rel
        files[rel] = {"size": p.stat().st_size, "sha256": file_sha256(p) if sha256 else None}
    return {"files": files}


def _safe_name(name: object) -> bool:
    return (
        isinstance(name, str)
        and bool(name)
        and "/" not in name
        and "\\" not in name
        and not name.startswith(".")
    )


def _safe_rel(rel: object) -> bool:
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel:
        return False
    path = PurePosixPath(rel)
    return all(part not in ("", ".", "..") for part in path.parts) and rel == path.as_posix()


def _check_manifest(data: object, where: str) -> dict:
    """``data`` if it is a valid version-1 manifest, else WeightsError naming what is wrong."""

    def bad(why: str) -> WeightsError:
        return WeightsError(
            f"{where}: not a valid weights manifest ({why}); "
            f"rewrite it with `python -m train.weights manifest`"
        )

    if not isinstance(data, dict):
        raise bad("not a JSON object")
    if data.get("version") != MANIFEST_VERSION:
        raise bad(f"version {data.get('version')!r}, expected {MANIFEST_VERSION}")
    models = data.get("models")
    if not isinstance(models, dict):
        raise bad("'models' is not an object")
    for name, entry in models.items():
        if not _safe_name(name):
            raise bad(f"model name {name!r} is not a plain folder name")
        if not isinstance(entry, dict) or not isinstance(entry.get("files"), dict):
            raise bad(f"models.{name}.files is not an object")
        for rel, info in entry["files"].items():
            if not _safe_rel(rel):
                raise bad(f"models.{name}: file path {rel!r} is not a plain relative path")
            if (
                not isinstance(info, dict)
                or not isinstance(info.get("size"), int)
                or isinstance(info["size"], bool)
                or info["size"] < 0
            ):
                raise bad(f"models.{name}.files[{rel!r}]: size must be a non-negative integer")
            sha = info.get("sha256")
            if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
                raise bad(f"models.{name}.files[{rel!r}]: sha256 must be 64 hex digits or null")
    return data


def load_manifest(weights_dir: Path | None = None, path: Path | None = None) -> dict | None:
    """The manifest in ``weights_dir`` (or at ``path``); None if there is none, WeightsError if invalid."""
    path = Path(path) if path else Path(weights_dir or WEIGHTS_DIR) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(
            f"{_show(path)}: cannot read the weights manifest ({exc}); "
            f"rewrite it with `python -m train.weights manifest`"
        ) from None
    return _check_manifest(data, _show(path))


def _save_manifest(weights_dir: Path, data: dict) -> Path:
    """Write the manifest atomically (a temporary file in the same folder, then a rename)."""
    path = weights_dir / MANIFEST_NAME
    tmp = weights_dir / f".{MANIFEST_NAME}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_manifest(
    weights_dir: Path | None = None, names: list[str] | None = None, sha256: bool = True
) -> Path:
    """Record every file of the pipeline folders in ``weights_dir/manifest.json``; returns its path.

    Without ``names`` the manifest is rewritten from every pipeline folder present. With
    ``names`` only those entries are (re)written; the rest of an existing manifest is kept.
    ``sha256=False`` records sizes only (``"sha256": null``), which is fast for multi-GB files.
    """
    weights_dir = Path(weights_dir or WEIGHTS_DIR)
    if not weights_dir.is_dir():
        raise WeightsError(f"{_show(weights_dir)} does not exist; nothing to record")
    if names is None:
        data = {"version": MANIFEST_VERSION, "models": {}}
        names = pipeline_folders(weights_dir)
    else:
        data = load_manifest(weights_dir) or {"version": MANIFEST_VERSION, "models": {}}
        for name in names:
            if not _safe_name(name) or not _is_pipeline(weights_dir / name):
                raise WeightsError(
                    f"{_show(weights_dir / str(name))} is not a diffusers pipeline folder "
                    f"(no model_index.json); nothing recorded"
                )
    for name in names:
        if sha256:
            print(f"hashing {_show(weights_dir / name)} ...", flush=True)
        data["models"][name] = _model_entry(weights_dir / name, sha256)
    return _save_manifest(weights_dir, data)


def _check_folder(folder: Path, entry: dict, full_hash: bool) -> list[str]:
    """Problems of one model folder against its manifest entry."""
    if not folder.is_dir():
        return [f"{_show(folder)} is missing"]
    problems = []
    for rel, info in entry["files"].items():
        p = folder / rel
        if not p.is_file():
            problems.append(f"{_show(p)} is missing")
            continue
        size = p.stat().st_size
        if size != info["size"]:
            problems.append(
                f"{_show(p)}: {size} bytes, the manifest says {info['size']} (truncated or replaced)"
            )
        elif full_hash and info.get("sha256") and file_sha256(p) != info["sha256"]:
            problems.append(f"{_show(p)}: sha256 differs from the manifest's (corrupted or replaced)")
    return problems


def _verify_models(weights_dir: Path, manifest: dict, full_hash: bool) -> dict[str, list[str]]:
    """Problems per model listed in ``manifest`` (an empty list when the model checks out)."""
    return {
        name: _check_folder(weights_dir / name, entry, full_hash)
        for name, entry in manifest["models"].items()
    }


def verify_weights(
    weights_dir: Path | None = None, manifest: dict | Path | None = None, full_hash: bool = False
) -> list[str]:
    """Problems with the weights against the manifest: missing folders or files, wrong sizes, and with
    ``full_hash`` sha256 mismatches (files without a recorded sha256 are checked by size only).

    ``manifest`` is a manifest dict, a path to one, or None for ``weights_dir/manifest.json``;
    when there is no manifest at all the one problem returned says so.
    """
    weights_dir = Path(weights_dir or WEIGHTS_DIR)
    if isinstance(manifest, dict):
        data = _check_manifest(manifest, "manifest")
    else:
        path = Path(manifest) if manifest is not None else weights_dir / MANIFEST_NAME
        data = load_manifest(path=path)
        if data is None:
            return [f"{_show(path)} is missing; write it with `python -m train.weights manifest`"]
    return [p for problems in _verify_models(weights_dir, data, full_hash).values() for p in problems]


# --------------------------------------------------------------------------------------------
# fetching an archive of pipeline folders

# Signed URLs carry secrets in the query string: messages show the URL without it.
_describe_source = safe_url
# ~3.5-7 s of backoff in all: rides out a network blip or a file server restarting, then says why.
DOWNLOAD_RETRY = RetryPolicy(attempts=4)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


class _DownloadReport:
    """A download's lines in the log: its size (after a disk-space check), then every ~5 % for large
    files, or every GiB when the server does not say how large it is."""

    def __init__(self, shown: str, dest: Path):
        self.shown, self.dest = shown, dest
        self.started = False
        self.next_pct = 5
        self.gib = 0

    def __call__(self, got: int, total: int | None) -> None:
        if not self.started:
            self.started = True
            self._start(total)
        elif total is not None:
            if total >= _PROGRESS_MIN_BYTES and got * 100 >= self.next_pct * total:
                pct = min(100, got * 100 // max(total, 1))
                print(f"weights: {pct}% ({_gb(got)} of {_gb(total)})", flush=True)
                self.next_pct = (pct // 5 + 1) * 5
        elif got // (1 << 30) != self.gib:
            print(f"weights: {_gb(got)} downloaded", flush=True)
        self.gib = got // (1 << 30)

    def _start(self, total: int | None) -> None:
        if total is not None:
            free = shutil.disk_usage(self.dest.parent).free
            if total > free:
                raise WeightsError(
                    f"cannot download weights from {self.shown}: it is {_gb(total)}, only "
                    f"{_gb(free)} free in {_show(self.dest.parent.parent)}"
                )
            if 2 * total > free:
                print(
                    f"weights: warning: {_gb(free)} free; unpacking {_gb(total)} needs about twice that",
                    flush=True,
                )
        print(f"weights: downloading {self.shown}" + (f" ({_gb(total)})" if total else ""), flush=True)


def download_url(url: str, dest: Path) -> None:
    """Stream the http(s) ``url`` into ``dest`` (retried, resumed), printing progress for large files."""
    shown = safe_url(url)
    try:
        download(
            url,
            dest,
            progress=_DownloadReport(shown, dest),
            timeout=60,
            retry=DOWNLOAD_RETRY,
            headers={"User-Agent": "advanced-trainer-weights/1"},
        )
    except WeightsError:
        raise
    except DownloadError as exc:
        raise WeightsError(f"cannot download weights from {exc.url}: {exc.detail}") from None
    except OSError as exc:  # a full disk, an unwritable folder
        raise WeightsError(f"cannot download weights from {shown}: {type(exc).__name__}: {exc}") from None


def _archive_stem(source: str) -> str:
    name = PurePosixPath(urlsplit(source).path if "://" in source else Path(source).name).name
    for suffix in _ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _find_pipelines(root: Path, source: str, depth: int = 3) -> dict[str, Path]:
    """Pipeline folders in an unpacked archive: the root itself (named after the archive) or folders up to
    ``depth`` levels down (``FLUX.1-dev/``, ``weights/FLUX.1-dev/``); junk (``__MACOSX``, dot-folders)
    skipped."""
    if _is_pipeline(root):
        name = _archive_stem(source)
        if not _safe_name(name):
            raise WeightsError(
                f"{_describe_source(source)}: the archive holds one pipeline at its top "
                f"level, but no folder name can be taken from the source name"
            )
        return {name: root}
    found: dict[str, Path] = {}
    _collect_pipelines(root, root, depth, found, source)
    return found


def _collect_pipelines(
    folder: Path, root: Path, levels_left: int, found: dict[str, Path], source: str
) -> None:
    for child in sorted(folder.iterdir()):
        if not child.is_dir() or child.name.startswith(".") or child.name == "__MACOSX":
            continue
        if _is_pipeline(child):
            if child.name in found:
                raise WeightsError(
                    f"{_describe_source(source)}: two pipeline folders named {child.name!r} "
                    f"({found[child.name].relative_to(root)} and {child.relative_to(root)})"
                )
            found[child.name] = child
        elif levels_left > 1:
            _collect_pipelines(child, root, levels_left - 1, found, source)


def _archive_manifest(root: Path, pipelines: dict[str, Path]) -> dict | None:
    """A manifest.json shipped in the archive, at its top or beside the pipeline folders."""
    places = [root] + sorted({p.parent for p in pipelines.values()})
    for place in places:
        if (place / MANIFEST_NAME).is_file():
            return load_manifest(path=place / MANIFEST_NAME)
    return None


def _source_scheme(source: str) -> str:
    """``http`` / ``https`` / ``file``, or "" for a plain path; WeightsError for anything else."""
    scheme = urlsplit(source).scheme.lower() if "://" in source else ""
    if scheme not in ("", "http", "https", "file"):
        raise WeightsError(
            f"cannot fetch weights from {_describe_source(source)}: only http(s) URLs "
            f"and local paths are supported"
        )
    return scheme


def _archive_file(source: str, scheme: str, tmp: Path) -> Path:
    """The archive on this machine: fetched into ``tmp`` for a URL, else the local file itself."""
    if scheme in ("http", "https"):
        archive = tmp / "archive"
        download_url(source, archive)
        return archive
    archive = Path(urlsplit(source).path if scheme == "file" else source).expanduser()
    if not archive.is_file():
        raise WeightsError(f"cannot fetch weights from {_describe_source(source)}: no such file")
    return archive


def _url_kind(url: str) -> str | None:
    """``tar`` / ``tar.gz`` / ``zip`` from the URL's path (a tar can then be unpacked as it arrives)."""
    name = PurePosixPath(urlsplit(url).path).name.lower()
    for suffix, kind in ((".tar.gz", "tar.gz"), (".tgz", "tar.gz"), (".tar", "tar"), (".zip", "zip")):
        if name.endswith(suffix):
            return kind
    return None


def _expected_sha256(url: str) -> str | None:
    """A ``#sha256=<hex>`` fragment on the URL (pip's convention): the archive must hash to it."""
    fragment = urlsplit(url).fragment
    match = re.fullmatch(r"sha256=([0-9a-fA-F]{64})", fragment)
    return match.group(1).lower() if match else None


def _fetch_and_unpack(source: str, scheme: str, tmp: Path, shown: str) -> Path:
    """The archive's contents in ``tmp/unpacked``. A ``.tar`` / ``.tar.gz`` URL whose server serves
    ranges is unpacked while it arrives (train/fetch.py: parallel parts, read in order; one copy on
    disk); any other URL is fetched in parallel parts, then unpacked; a path is unpacked."""
    from .fetch import RangeStream, connections_from_env, fetch_file, probe

    unpacked = tmp / "unpacked"
    if scheme not in ("http", "https"):
        return _unpack(_archive_file(source, scheme, tmp), unpacked, shown)
    started, sha256, kind = time.monotonic(), _expected_sha256(source), _url_kind(source)
    url = source.split("#", 1)[0]
    try:
        remote = probe(url, retry=DOWNLOAD_RETRY)
        n = connections_from_env()
        if remote.ranges and remote.size is not None and kind in ("tar", "tar.gz"):
            _disk_check(remote.size, tmp, shown)
            print(
                f"weights: fetching and unpacking {shown} ({_gb(remote.size)}) over {n} connections",
                flush=True,
            )
            with RangeStream(url, remote, connections=n, retry=DOWNLOAD_RETRY) as stream:
                _unpack_stream(stream, unpacked, shown, kind)
                stream.drain()
                if sha256 and stream.hasher.hexdigest() != sha256:
                    shutil.rmtree(unpacked, ignore_errors=True)
                    raise DownloadError(url, f"the sha256 does not match the expected {sha256[:16]}…")
        else:
            archive = tmp / "archive"
            report = _DownloadReport(shown, archive)
            fetch_file(url, archive, connections=n, sha256=sha256, progress=report, retry=DOWNLOAD_RETRY)
            _unpack(archive, unpacked, shown)
            archive.unlink()
    except DownloadError as exc:
        raise WeightsError(f"cannot download weights from {exc.url}: {exc.detail}") from None
    took = time.monotonic() - started
    size = sum(p.stat().st_size for p in unpacked.rglob("*") if p.is_file())
    print(
        f"weights: {shown} fetched and unpacked in {took:.1f} s ({_gb(size)}, {size / 1e6 / max(took, 1e-6):.0f} MB/s)",
        flush=True,
    )
    return unpacked


def _disk_check(size: int, folder: Path, shown: str) -> None:
    free = shutil.disk_usage(folder).free
    if size > free:
        raise WeightsError(f"cannot download weights from {shown}: it is {_gb(size)}, only {_gb(free)} free")


def _unpack_stream(stream: Any, into: Path, shown: str, kind: str) -> None:
    from train.data import DataLimits, DatasetError, UnsafeArchiveError, extract_tar_stream

    limits = DataLimits(max_files=500_000, max_bytes=4 << 40)
    try:
        extract_tar_stream(stream, shown, into, limits, gz=kind == "tar.gz")
    except DatasetError as exc:
        raise WeightsError(f"cannot use weights from {shown}: {exc}") from None
    except UnsafeArchiveError as exc:
        raise WeightsError(f"cannot use weights from {shown}: unsafe archive refused: {exc}") from None


def _unpack(archive: Path, into: Path, shown: str) -> Path:
    """Extract ``archive`` into ``into`` (unsafe entries refused), WeightsError naming the source."""
    # numpy + PIL come with train.data: not at import time (client/pack.py imports this module)
    from train.data import DataLimits, DatasetError, UnsafeArchiveError, extract_archive

    print(f"weights: unpacking {shown}", flush=True)
    limits = DataLimits(max_files=500_000, max_bytes=4 << 40)  # weights are big; only traversal etc. matter
    try:
        extract_archive(archive, into, limits)
    except DatasetError as exc:
        raise WeightsError(
            f"cannot use weights from {shown}: {exc} (expected a .tar, .tar.gz or .zip "
            f"of diffusers pipeline folders)"
        ) from None
    except UnsafeArchiveError as exc:
        raise WeightsError(f"cannot use weights from {shown}: unsafe archive refused: {exc}") from None
    return into


def _entries_for(pipelines: dict[str, Path], shipped: dict | None, shown: str) -> dict[str, dict]:
    """Manifest entries of the unpacked pipelines: the archive's own (which they must match), else sizes."""
    entries: dict[str, dict] = {}
    for name, folder in pipelines.items():
        if shipped and name in shipped["models"]:
            problems = _check_folder(folder, shipped["models"][name], False)
            if problems:
                raise WeightsError(
                    f"cannot use weights from {shown}: {name} does not match the archive's "
                    f"manifest.json: " + "; ".join(problems[:5])
                )
            entries[name] = shipped["models"][name]
        else:
            entries[name] = _model_entry(folder, sha256=False)
    return entries


def _install(
    pipelines: dict[str, Path], entries: dict[str, dict], weights_dir: Path, manifest: dict | None
) -> tuple[list[str], list[str]]:
    """Move each pipeline into ``weights_dir`` (a rename) unless its folder exists; add it to the manifest."""
    manifest = manifest or {"version": MANIFEST_VERSION, "models": {}}
    installed: list[str] = []
    skipped: list[str] = []
    for name, folder in pipelines.items():
        target = weights_dir / name
        if target.exists() or target.is_symlink():
            print(f"weights: {_show(target)} already exists; left as it is (not overwritten)", flush=True)
            skipped.append(name)
            continue
        os.rename(folder, target)
        installed.append(name)
        manifest["models"][name] = entries[name]
        print(f"weights: installed {_show(target)}", flush=True)
    if installed:
        _save_manifest(weights_dir, manifest)
    return installed, skipped


def _fetch(source: str, weights_dir: Path) -> tuple[list[str], list[str]]:
    """Fetch and install; returns (names installed, names skipped because their folder already existed)."""
    shown = _describe_source(source)
    weights_dir.mkdir(parents=True, exist_ok=True)
    existing_manifest = load_manifest(weights_dir)  # a broken manifest stops us before anything moves
    scheme = _source_scheme(source)
    tmp = Path(tempfile.mkdtemp(prefix=_FETCH_PREFIX, dir=weights_dir))
    try:
        unpacked = _fetch_and_unpack(source, scheme, tmp, shown)
        pipelines = _find_pipelines(unpacked, source)
        if not pipelines:
            raise WeightsError(
                f"cannot use weights from {shown}: the archive holds no diffusers pipeline "
                f"folder (a folder with model_index.json)"
            )
        entries = _entries_for(pipelines, _archive_manifest(unpacked, pipelines), shown)
        return _install(pipelines, entries, weights_dir, existing_manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only our own temporary folder


def fetch_weights_archive(source: str, weights_dir: Path) -> list[str]:
    """Install the pipeline folders in an archive (http(s) URL or local path of a .tar / .tar.gz / .zip).

    The download and the unpacking happen in a temporary folder inside ``weights_dir`` (same disk,
    so folders move into place by rename). A model whose folder already exists is skipped, never
    overwritten. Installed models are added to ``weights_dir/manifest.json`` (from the archive's own
    manifest.json when it has one, which they must match, else sizes only). Returns the names of the
    archive's models, all now present in ``weights_dir``. WeightsError names the source and the problem.
    """
    installed, skipped = _fetch(source, Path(weights_dir))
    return sorted(installed + skipped)


# --------------------------------------------------------------------------------------------
# setup(): everything together


@dataclass
class WeightsStatus:
    """What ``prepare_weights`` found: model -> folder, where each came from, warnings."""

    weights_dir: Path
    models: dict[str, Path] = field(default_factory=dict)  # name or Hub id -> pipeline folder
    origins: dict[str, str] = field(default_factory=dict)  # name or Hub id -> cache | tarball | hub
    warnings: list[str] = field(default_factory=list)
    manifest: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)  # phase -> seconds (fetches)

    def path(self, ref: str) -> Path:
        """The folder for ``ref`` (a folder name or a Hub id whose last part is a folder name)."""
        for key in (ref, ref.split("/")[-1]):
            if key in self.models:
                return self.models[key]
        raise KeyError(ref)

    def record(self, key: str, folder: Path, origin: str) -> None:
        self.models[key] = folder
        self.origins[key] = origin

    def lines(self) -> list[str]:
        out = [f"weights: {name} ({self.origins[name]}): {_show(path)}" for name, path in self.models.items()]
        return out + [f"weights: warning: {w}" for w in self.warnings]


@dataclass
class _Scan:
    """The cache as it is: its manifest, each listed model's problems, the pipeline folders present."""

    manifest: dict | None
    problems: dict[str, list[str]]
    present: list[str]

    def usable(self, name: str) -> bool:
        return name in self.present and not self.problems.get(name)


def _scan(weights_dir: Path) -> _Scan:
    manifest = load_manifest(weights_dir)
    problems = _verify_models(weights_dir, manifest, False) if manifest else {}
    return _Scan(manifest, problems, pipeline_folders(weights_dir))


def _wanted(required: list[str] | None, scan: _Scan) -> list[str]:
    """The refs that must be usable: ``required``, else every model in the manifest."""
    if required is not None:
        return list(required)
    return list(scan.manifest["models"]) if scan.manifest else []


def _how_to_provide(folders: list[Path]) -> str:
    where = " and ".join(_show(f) for f in folders) if folders else "weights/<name>"
    return (
        f"Provide them one of these ways: put the diffusers folder at {where} "
        f"(then `python -m train.weights manifest`), set {BASE_WEIGHTS_ENV} to a .tar/.tar.gz/.zip URL "
        f"of it, or allow Hub downloads with an hf_token for gated repos."
    )


def per_base_source(source: str | None, ref: str) -> str | None:
    """The archive that holds the base ``ref`` (a folder name or a Hub id) when ``source``
    (ADVANCED_TRAINER_BASE_WEIGHTS) names one archive per base: a URL or path template with
    ``{name}`` (the base's folder name: ``FLUX.1-dev`` for ``black-forest-labs/FLUX.1-dev``), or a
    JSON object mapping folder names or Hub ids to archives. None for a single archive of every base,
    or a base the mapping does not name."""
    if not source:
        return None
    name = ref.rstrip("/").split("/")[-1]
    text = source.strip()
    if text.startswith("{"):
        try:
            mapping = json.loads(text)
        except ValueError as exc:
            raise WeightsError(f"{BASE_WEIGHTS_ENV}: not a JSON object of base -> archive ({exc})") from None
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise WeightsError(f"{BASE_WEIGHTS_ENV}: a mapping must be a JSON object of base -> archive URL")
        return mapping.get(ref) or mapping.get(name)
    if "{name}" in text:
        return text.replace("{name}", quote(name))
    return None


def _one_archive_per_base(source: str | None) -> bool:
    return bool(source) and (source.strip().startswith("{") or "{name}" in source)


def _fetch_per_base(
    source: str, weights_dir: Path, required: list[str] | None, scan: _Scan, status: WeightsStatus
) -> tuple[_Scan, set[str]]:
    """Each wanted base that is not in the cache, from its own archive (``per_base_source``); a base
    without one is left to the cache, the Hub, or the error that names it."""
    fetched: set[str] = set()
    for ref in required or []:
        name = ref.split("/")[-1]
        archive = per_base_source(source, ref)
        if scan.usable(name) or archive is None:
            continue
        started = time.monotonic()
        installed, _ = _fetch(archive, weights_dir)
        status.timings[f"fetch {name}"] = round(time.monotonic() - started, 2)
        fetched |= set(installed)
        scan = _scan(weights_dir)
    return scan, fetched


def _fetch_source(
    source: str, weights_dir: Path, required: list[str] | None, scan: _Scan, status: WeightsStatus
) -> tuple[_Scan, set[str]]:
    """Fetch the archive ``source`` unless every wanted model is already usable; returns the new scan and
    the names it installed."""
    if _one_archive_per_base(source):
        return _fetch_per_base(source, weights_dir, required, scan, status)
    names = [r.split("/")[-1] for r in _wanted(required, scan)]
    if names and all(scan.usable(n) for n in names):
        # it would only skip folders that exist: do not download gigabytes for nothing
        status.warnings.append(
            f"{BASE_WEIGHTS_ENV} {_describe_source(source)} not fetched: "
            f"{', '.join(names)} already in {_show(weights_dir)}"
        )
        return scan, set()
    started = time.monotonic()
    installed, _ = _fetch(source, weights_dir)
    status.timings["fetch"] = round(time.monotonic() - started, 2)
    return _scan(weights_dir), set(installed)


def _record_cache(status: WeightsStatus, scan: _Scan, fetched: set[str]) -> None:
    """Every usable folder in the cache goes into ``status``, with warnings for what was not checked."""
    weights_dir, manifest_path = status.weights_dir, status.weights_dir / MANIFEST_NAME
    status.manifest = manifest_path if scan.manifest is not None else None
    if scan.manifest is None and scan.present:
        status.warnings.append(
            f"{_show(manifest_path)} is missing, so file sizes were not checked; "
            f"write it with `python -m train.weights manifest`"
        )
    leftovers = sorted(p.name for p in weights_dir.glob(_FETCH_PREFIX + "*")) if weights_dir.is_dir() else []
    if leftovers:
        status.warnings.append(
            f"leftover temporary folders from an interrupted fetch in "
            f"{_show(weights_dir)}: "
            f"{', '.join(leftovers)} (safe to delete)"
        )
    for name in scan.present:
        if not scan.usable(name):
            continue
        status.record(name, weights_dir / name, "tarball" if name in fetched else "cache")
        if scan.manifest is not None and name not in scan.manifest["models"]:
            status.warnings.append(
                f"{_show(weights_dir / name)} is not in {_show(manifest_path)}, so its "
                f"files were not checked; run `python -m train.weights manifest`"
            )


def _local_problem(ref: str, scan: _Scan, weights_dir: Path) -> str | None:
    """Why the cache cannot serve ``ref``; None when it can."""
    name = ref.split("/")[-1]
    folder = weights_dir / name
    if not _safe_name(name):
        return f"{ref!r} is not a folder name or Hub id"
    if scan.usable(name):
        return None
    if not folder.is_dir():
        listed = scan.manifest is not None and name in scan.manifest["models"]
        where = f" (listed in {_show(weights_dir / MANIFEST_NAME)})" if listed else ""
        return f"base weights missing: {_show(folder)}{where}"
    problems = scan.problems.get(name)
    if problems:
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        return f"base weights damaged: {'; '.join(problems[:3])}{more}"
    return f"base weights unusable: {_show(folder)} has no model_index.json"


def _snapshot_download(ref: str, token: str | None) -> Path:
    # huggingface_hub: imported only when the Hub is actually used (an optional path in setup())
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(ref, token=token, allow_patterns=_HUB_ALLOW, ignore_patterns=_HUB_IGNORE))


def _from_hub(ref: str, local: str, hf_token: str | None, status: WeightsStatus) -> str | None:
    """Download ``ref`` from the Hub into ``status``; the failure message when that does not work."""
    if not _HUB_ID.match(ref):
        return f"{local}; {ref!r} is not a Hub id (owner/name), so it cannot be downloaded"
    token = hf_token or os.environ.get("HF_TOKEN") or None
    print(f"weights: downloading {ref} from the Hugging Face Hub", flush=True)
    try:
        path = _snapshot_download(ref, token)
    except Exception as exc:  # offline, gated repo without a token, no such repo
        why = " ".join(str(exc).split())[:300]
        tok = "an hf_token was given" if token else "no hf_token was given"
        return (
            f"{local}; the Hugging Face Hub download of {ref} failed ({type(exc).__name__}: {why}; {tok} "
            f"— a gated repo needs an hf_token with access to it)"
        )
    if not _is_pipeline(path):
        return f"{local}; the Hub repo {ref} has no model_index.json (not a diffusers pipeline)"
    if local.startswith("base weights damaged"):
        status.warnings.append(f"{local}; using the Hub copy of {ref} instead")
    status.record(ref, path, "hub")
    return None


def _provide(
    ref: str,
    status: WeightsStatus,
    scan: _Scan,
    *,
    source: str | None,
    fetched: set[str],
    allow_hub: bool,
    hf_token: str | None,
) -> str | None:
    """Make ``ref`` usable (the cache, else the Hub when allowed); the reason it is not, else None."""
    local = _local_problem(ref, scan, status.weights_dir)
    if local is None:
        return None
    if source and ref.split("/")[-1] not in fetched:
        local += f"; the {BASE_WEIGHTS_ENV} archive {_describe_source(source)} did not provide it"
    return _from_hub(ref, local, hf_token, status) if allow_hub else local


def prepare_weights(
    weights_dir: Path | None = None,
    *,
    source: str | None = None,
    required: list[str] | None = None,
    allow_hub: bool = False,
    hf_token: str | None = None,
) -> WeightsStatus:
    """Make the base weights usable for ``setup()``, or raise WeightsError saying what to provide.

    1. ``source`` (ADVANCED_TRAINER_BASE_WEIGHTS: an archive URL or path) is fetched into ``weights_dir``
       first.
    2. The manifest is loaded and every listed model's file sizes are checked.
    3. Each of ``required`` (folder names or Hub ids; default: every model in the manifest) must be
       in the cache and, if listed in the manifest, match it; otherwise, only when ``allow_hub``,
       a Hub id is downloaded with ``snapshot_download`` (token ``hf_token`` or ``HF_TOKEN``).
    Folders without a manifest entry are used with a warning. Nothing is ever deleted.
    """
    weights_dir = Path(weights_dir or WEIGHTS_DIR)
    status = WeightsStatus(weights_dir=weights_dir)
    scan, fetched = _scan(weights_dir), set()
    if source:
        scan, fetched = _fetch_source(source, weights_dir, required, scan, status)
    _record_cache(status, scan, fetched)
    failures: list[str] = []
    folders: list[Path] = []
    for ref in _wanted(required, scan):
        why = _provide(
            ref, status, scan, source=source, fetched=fetched, allow_hub=allow_hub, hf_token=hf_token
        )
        if why:
            failures.append(why)
            folders.append(weights_dir / ref.split("/")[-1])
    if required is not None:  # models nobody asked for may be broken: say so, do not fail
        asked = {r.split("/")[-1] for r in required}
        status.warnings += [
            f"{name} (not required) does not match the manifest: {'; '.join(probs[:3])}"
            for name, probs in scan.problems.items()
            if probs and name not in asked
        ]
    if failures:
        raise WeightsError("; ".join(failures) + ". " + _how_to_provide(folders))
    if not status.models and _one_archive_per_base(source):
        status.warnings.append(
            f"no base weights cached yet: each base is fetched when first needed from {BASE_WEIGHTS_ENV}"
        )
        return status
    if not status.models:
        what = (
            "no manifest.json and no diffusers pipeline folder"
            if scan.manifest is None
            else "a manifest listing no models and no diffusers pipeline folder"
        )
        raise WeightsError(f"no base weights: {_show(weights_dir)} has {what}. " + _how_to_provide([]))
    return status


def prepare_weights_from_env(
    required: list[str] | None = None, weights_dir: Path | None = None
) -> WeightsStatus:
    """``prepare_weights`` as the container's environment says (both Cog entries' setup()).

    ADVANCED_TRAINER_BASE_WEIGHTS: an archive (URL or path) of pipeline folders to fetch first, or
    one archive per base (a ``{name}`` template or a JSON mapping: ``per_base_source``), each fetched
    when a required base is missing;
    ADVANCED_TRAINER_REQUIRED_WEIGHTS: comma-separated folder names or Hub ids that must be usable
    (``required`` adds to them); ADVANCED_TRAINER_ALLOW_HUB=1: missing ones may come from the Hub
    (HF_TOKEN for gated repos).
    """
    env = [n.strip() for n in os.environ.get("ADVANCED_TRAINER_REQUIRED_WEIGHTS", "").split(",") if n.strip()]
    wanted = list(dict.fromkeys(env + list(required or []))) or None
    return prepare_weights(
        weights_dir or WEIGHTS_DIR,
        source=os.environ.get(BASE_WEIGHTS_ENV) or None,
        required=wanted,
        allow_hub=os.environ.get("ADVANCED_TRAINER_ALLOW_HUB", "") == "1",
        hf_token=os.environ.get("HF_TOKEN") or None,
    )


# --------------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.weights", description=(__doc__ or "").split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("manifest", help="record every file of the pipeline folders in manifest.json")
    p.add_argument("names", nargs="*", help="only these model folders (the rest of the manifest is kept)")
    p.add_argument("--no-hash", action="store_true", help="record sizes only (fast for multi-GB files)")
    p = sub.add_parser("verify", help="check the weights against manifest.json (sizes; --hash: sha256 too)")
    p.add_argument("--hash", action="store_true", help="also compare sha256 (reads every byte)")
    p = sub.add_parser("fetch", help="install the pipeline folders in a .tar/.tar.gz/.zip (URL or path)")
    p.add_argument("source")
    for p in sub.choices.values():
        p.add_argument("--weights-dir", type=Path, default=WEIGHTS_DIR, help=f"default: {WEIGHTS_DIR}")
    args = parser.parse_args(argv)
    try:
        if args.command == "manifest":
            path = write_manifest(args.weights_dir, names=args.names or None, sha256=not args.no_hash)
            data = load_manifest(path=path) or {"models": {}}
            n_files = sum(len(m["files"]) for m in data["models"].values())
            print(f"{_show(path)}: {len(data['models'])} models, {n_files} files")
            return 0
        if args.command == "verify":
            problems = verify_weights(args.weights_dir, full_hash=args.hash)
            if problems:
                for line in problems:
                    print(line, file=sys.stderr)
                print(f"{len(problems)} problem(s)", file=sys.stderr)
                return 1
            data = load_manifest(args.weights_dir) or {"models": {}}
            checked = "sizes and sha256" if args.hash else "sizes"
            print(f"ok: {', '.join(data['models']) or 'no models'} ({checked})")
            return 0
        names = fetch_weights_archive(args.source, args.weights_dir)
        print("models:", ", ".join(names))
        return 0
    except WeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
