"""Pack a dataset folder into the canonical zip the trainer reads best, under the upload limit.

``pack_dataset(folder, out)`` writes a deterministic zip (same input, byte-identical archive)
holding what the container's staging (``train/data.py``) uses and nothing else:

- images (``IMAGE_EXTENSIONS``) and their same-stem ``.txt`` captions, plus ``metadata.jsonl``
  and ``captions.csv`` tables, at their relative paths; entries sorted, timestamps fixed at
  1980-01-01, permissions 0644, no extra fields; JPEG / PNG / WebP stored, the rest deflated
  at level 9;
- junk (``__MACOSX/``, ``._*``, ``.DS_Store``, ``Thumbs.db``, hidden files), unrelated files,
  symbolic links (never followed), unreadable and too-small images are left out, each
  listed in the result with the reason.

Files are streamed into the archive in chunks (constant memory). The archive's size is
computed before anything is written (exactly: headers plus stored or deflated data), and a
set over ``limit_bytes`` (Replicate's upload limit, 100 MiB) is refused with the largest
files named, or, with ``fit=True``, reduced: images are re-encoded as JPEG (quality 90),
largest first, downscaled to a shorter side of ``min_side`` (the largest training
resolution) and never below it or upscaled, until the archive fits. Re-encoded images live
in a temporary folder; the input folder is never modified.

Torch-free and numpy-free: this runs on laptops. The staging rules are mirrored here, not
imported (``train.data`` needs numpy); ``tests/test_pack.py`` checks both agree.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import stat
import tempfile
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

from PIL import Image, ImageOps, UnidentifiedImageError

from train.weights import file_sha256  # stdlib-only module: keeps the client torch- and numpy-free

# --- mirrored from train/data.py (kept equal by tests/test_pack.py) ---------------------------
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
UNSUPPORTED_IMAGE_EXTENSIONS = {".gif", ".heic", ".heif", ".avif", ".svg", ".psd", ".jxl", ".raw", ".cr2",
                                ".nef", ".dng", ".arw", ".ico", ".exr"}
CAPTION_FILES = {"metadata.jsonl", "captions.csv"}
MIN_IMAGE_SIDE = 16
MAX_IMAGE_PIXELS = 80_000_000  # DataLimits.max_image_pixels: the container refuses the whole set over it
_JUNK_NAMES = {".ds_store", "thumbs.db", "desktop.ini"}
# ----------------------------------------------------------------------------------------------

UPLOAD_LIMIT = 100 * 2**20       # Replicate's upload limit for a file input
DEFAULT_MIN_SIDE = 1024          # the spec's default resolution, when fit is asked without min_side
JPEG_QUALITY = 90
_STORED_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp"}  # already compressed: deflate gains nothing
_JPEG_EXTENSIONS = {".jpg", ".jpeg"}
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_FILE_MODE = (stat.S_IFREG | 0o644) << 16
_CHUNK = 1 << 20
_LOCAL_HEADER, _CENTRAL_HEADER, _END_RECORD = 30, 46, 22
_REENCODE_MIN_SAVING = 0.9       # a same-size re-encode is kept only when it saves at least 10 %


class PackError(ValueError):
    """The folder cannot be packed; the message names the file and what to do."""


class PackTooLarge(PackError):
    """The archive would exceed the limit. ``size`` and ``limit`` in bytes, ``largest``: [(path, bytes)]."""

    def __init__(self, message: str, size: int, limit: int, largest: list[tuple[str, int]]):
        super().__init__(message)
        self.size = size
        self.limit = limit
        self.largest = largest


@dataclass(frozen=True)
class PackChange:
    """One image re-encoded by ``fit``: sizes in bytes, dimensions as (width, height) after EXIF rotation."""

    path: str
    new_path: str
    old_bytes: int
    new_bytes: int
    old_dimensions: tuple[int, int]
    new_dimensions: tuple[int, int]


@dataclass
class PackResult:
    archive: Path
    size_bytes: int
    sha256: str
    images: int                      # images in the archive
    captions: int                    # of those, how many have a caption (txt, metadata.jsonl or captions.csv)
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (relative path, reason)
    changed: list[PackChange] = field(default_factory=list)
    caption_sources: dict[str, int] = field(default_factory=dict)  # txt / metadata.jsonl / captions.csv / none
    warnings: list[str] = field(default_factory=list)              # packed, but probably not what was meant
    limit_bytes: int = UPLOAD_LIMIT

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (for ``--json`` output)."""
        return {"archive": str(self.archive), "bytes": self.size_bytes, "sha256": self.sha256,
                "images": self.images, "captions": self.captions, "caption_sources": dict(self.caption_sources),
                "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
                "changed": [{"path": c.path, "new_path": c.new_path, "old_bytes": c.old_bytes,
                             "new_bytes": c.new_bytes, "old_dimensions": list(c.old_dimensions),
                             "new_dimensions": list(c.new_dimensions)} for c in self.changed],
                "warnings": list(self.warnings), "limit_bytes": self.limit_bytes}

    def summary(self) -> str:
        lines = [f"packed {self.images} image{'s' if self.images != 1 else ''} "
                 f"({self.captions} with captions) into {self.archive.name}: "
                 f"{_human(self.size_bytes)} of the {_human(self.limit_bytes)} limit, sha256 {self.sha256[:16]}"]
        sources = ", ".join(f"{k} {v}" for k, v in sorted(self.caption_sources.items()) if v and k != "none")
        if sources:
            lines.append(f"captions from: {sources}")
        if self.caption_sources.get("none"):
            lines.append(f"{self.caption_sources['none']} image(s) without a caption: the trainer gives them "
                         f"the default caption and trigger word")
        if self.changed:
            saved = sum(c.old_bytes - c.new_bytes for c in self.changed)
            lines.append(f"re-encoded {len(self.changed)} image{'s' if len(self.changed) != 1 else ''} "
                         f"to fit (saved {_human(saved)}):")
            for c in self.changed:
                name = c.path if c.new_path == c.path else f"{c.path} -> {c.new_path}"
                lines.append(f"  {name}: {_human(c.old_bytes)} -> {_human(c.new_bytes)}, "
                             f"{c.old_dimensions[0]}x{c.old_dimensions[1]} -> "
                             f"{c.new_dimensions[0]}x{c.new_dimensions[1]}")
        if self.skipped:
            lines.append(f"left out {len(self.skipped)} file{'s' if len(self.skipped) != 1 else ''}:")
            lines += [f"  {name}: {reason}" for name, reason in self.skipped]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def largest_training_side(spec: Any) -> int:
    """The largest training resolution: the smallest shorter side ``fit`` may reduce an image to.

    ``spec`` is a ``TrainingSpec`` (or anything with ``resolutions``), or what ``parse_spec``
    accepts (a dict, a JSON string or a path); pydantic only, never torch.
    """
    resolutions = getattr(spec, "resolutions", None)
    if resolutions is None:
        from train.spec import parse_spec

        resolutions = parse_spec(spec).resolutions
    return int(max(resolutions))


# --------------------------------------------------------------------------------------------
# scanning


@dataclass
class _Image:
    rel: PurePosixPath
    path: Path
    size: int
    width: int      # after EXIF rotation
    height: int


@dataclass
class _Entry:
    arcname: str
    source: Path
    size: int
    compress: int
    packed: int     # bytes of data in the zip (stored: size; deflated: computed)

    @property
    def footprint(self) -> int:
        return _entry_overhead(self.arcname) + self.packed


def _entry_overhead(arcname: str) -> int:
    return _LOCAL_HEADER + _CENTRAL_HEADER + 2 * len(arcname.encode("utf-8"))


def _human(n: int) -> str:
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    if n >= 2**10:
        return f"{n / 2**10:.1f} KiB"
    return f"{n} B"


def _junk_reason(name: str, is_dir: bool) -> str | None:
    lower = name.lower()
    if name == "__MACOSX":
        return "macOS archive metadata (__MACOSX)"
    if name.startswith("._"):
        return "macOS resource fork (._ file)"
    if lower == ".ds_store":
        return "macOS folder metadata (.DS_Store)"
    if lower in ("thumbs.db", "desktop.ini"):
        return "Windows folder metadata"
    if name.startswith("."):
        return "hidden folder" if is_dir else "hidden file"
    return None


def _walk(folder: Path) -> Iterator[tuple[PurePosixPath, Path, str | None]]:
    """Every entry below ``folder`` as (relative path, path, reason to leave it out or None).

    Links are reported, never followed; junk folders are reported once, not entered.
    """
    stack = [(folder, PurePosixPath())]
    while stack:
        directory, rel_dir = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            yield rel_dir, directory, f"folder cannot be read ({exc.strerror or exc})"
            continue
        subdirs = []
        for e in entries:
            rel, path = rel_dir / e.name, Path(e.path)
            try:
                if e.is_symlink():
                    yield rel, path, "symbolic link (links are not followed)"
                    continue
                is_dir = e.is_dir(follow_symlinks=False)
                is_file = e.is_file(follow_symlinks=False)
            except OSError as exc:
                yield rel, path, f"cannot be read ({exc.strerror or exc})"
                continue
            junk = _junk_reason(e.name, is_dir)
            if junk:
                yield rel, path, junk
            elif is_dir:
                subdirs.append((path, rel))
            elif not is_file:
                yield rel, path, "not a regular file"
            else:
                yield rel, path, None
        stack.extend(reversed(subdirs))


def _probe(path: Path) -> tuple[int, int]:
    """An image's (width, height) after EXIF rotation, from its header (nothing decoded)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            w, h = img.size
            if _exif_swaps(img):
                w, h = h, w
            return w, h


def _exif_swaps(img: Image.Image) -> bool:
    try:
        return img.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except Exception:  # noqa: BLE001 - a broken EXIF block is ignored, as exif_transpose would
        return False


def _key(rel: PurePosixPath) -> str:
    return str(rel.with_suffix(""))


# --------------------------------------------------------------------------------------------
# caption tables (parsed as train/data.py's _caption_table does)


@dataclass
class _Table:
    rel: PurePosixPath
    path: Path
    kind: str                               # metadata.jsonl | captions.csv
    names: dict[str, str] = field(default_factory=dict)   # image key (relative path) -> caption text

    @property
    def base(self) -> PurePosixPath:
        return self.rel.parent


def _table_key(base: PurePosixPath, name: str) -> str:
    return str(base / name.replace("\\", "/"))


def _parse_table(table: _Table, problems: list[str]) -> None:
    text = table.path.read_text(encoding="utf-8-sig", errors="replace")
    if table.kind == "metadata.jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name, caption = row["file_name"], row["text"]
                assert isinstance(name, str) and isinstance(caption, str)
            except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
                problems.append(f'{table.rel}:{lineno}: not a JSON object with "file_name" and "text"; '
                                f"the trainer ignores this row")
                continue
            table.names[_table_key(table.base, name)] = caption.strip()
        return
    reader = csv.reader(io.StringIO(text.replace("\r\n", "\n")))
    header = next(reader, None) or []
    name_col, text_col = _csv_columns(header)
    if name_col is None or text_col is None:
        problems.append(f"{table.rel}: needs a header with file_name (or image) and text (or caption) columns; "
                        f"the trainer ignores this file")
        return
    for row in reader:
        name = row[name_col].strip() if name_col < len(row) else ""
        if name:
            table.names[_table_key(table.base, name)] = (row[text_col] if text_col < len(row) else "").strip()


def _csv_columns(header: list[str]) -> tuple[int | None, int | None]:
    # DictReader keeps the last column of a repeated name; so does this.
    cols = {h.lower().strip(): i for i, h in enumerate(header)}
    name_col = next((cols[k] for k in ("file_name", "filename", "image", "file") if k in cols), None)
    text_col = next((cols[k] for k in ("text", "caption", "prompt") if k in cols), None)
    return name_col, text_col


def _rewrite_table(table: _Table, renames: dict[str, str], dest: Path) -> bool:
    """Write ``table`` with image names renamed (old relative path -> new) to ``dest``; False: unchanged."""
    text = table.path.read_text(encoding="utf-8-sig", errors="replace")
    changed = False
    if table.kind == "metadata.jsonl":
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        for i, line in enumerate(lines):
            try:
                row = json.loads(line)
                name = row["file_name"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
            if isinstance(name, str) and _table_key(table.base, name) in renames:
                row["file_name"] = _renamed_field(name, table.base, renames)
                lines[i] = json.dumps(row, ensure_ascii=False)
                changed = True
        out = "\n".join(lines)
    else:
        rows = list(csv.reader(io.StringIO(text.replace("\r\n", "\n"))))
        name_col, _ = _csv_columns(rows[0] if rows else [])
        if name_col is None:
            return False
        for row in rows[1:]:
            if name_col < len(row):
                name = row[name_col].strip()
                if name and _table_key(table.base, name) in renames:
                    row[name_col] = _renamed_field(name, table.base, renames)
                    changed = True
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        out = buf.getvalue()
    if changed:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(out, encoding="utf-8", newline="")
    return changed


def _renamed_field(name: str, base: PurePosixPath, renames: dict[str, str]) -> str:
    """The table's file name for the renamed image, written as the user wrote it (folders, separators)."""
    new = renames[_table_key(base, name)]
    old_suffix, new_suffix = PurePosixPath(name.replace("\\", "/")).suffix, PurePosixPath(new).suffix
    return name[: len(name) - len(old_suffix)] + new_suffix


# --------------------------------------------------------------------------------------------
# re-encoding (fit)


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB as train.data.to_rgb makes it (alpha and colour keys flattened on white), without numpy."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        lo, hi = img.convert("F").getextrema() if mode != "F" else img.getextrema()
        top = 65535.0 if mode.startswith("I;16") or hi > 255 else 255.0
        if mode == "F" and hi <= 1.0:
            top = 1.0
        scaled = img.convert("F").point(lambda v: v * (255.0 / top) + 0.5)
        return scaled.convert("L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return img
    return img.convert("RGB")


def _target_size(width: int, height: int, min_side: int, max_pixels: int, downscale: bool,
                 name: str) -> tuple[int, int]:
    """(width, height) after the reduction: shorter side ``min_side`` (when larger), under the pixel cap."""
    short = min(width, height)
    new_w, new_h = width, height
    if downscale and short > min_side:
        scale = min_side / short
        if width <= height:
            new_w, new_h = min_side, max(min_side, round(height * scale))
        else:
            new_w, new_h = max(min_side, round(width * scale)), min_side
    if new_w * new_h > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
        new_w, new_h = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
        while new_w * new_h > max_pixels:
            new_w, new_h = max(1, new_w - 1), max(1, new_h - 1)
        if min(new_w, new_h) < min(min_side, short):
            raise PackError(f"{name}: {width}x{height} cannot be brought under the trainer's cap of "
                            f"{max_pixels} pixels without its shorter side going below {min(min_side, short)} px; "
                            f"crop it or remove it")
    return new_w, new_h


def _reencode(image: _Image, dest: Path, min_side: int, max_pixels: int, downscale: bool) -> tuple[int, int]:
    """Write ``image`` as JPEG to ``dest``, EXIF rotation applied; returns its new (width, height)."""
    name = image.rel.as_posix()
    target = _target_size(image.width, image.height, min_side, max_pixels, downscale, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(image.path) as src:
                icc = src.info.get("icc_profile") if src.mode in ("RGB", "RGBA") else None
                if target != (image.width, image.height):
                    # JPEG: decode at 1/2, 1/4 or 1/8 scale when that still covers the target (less memory)
                    stored = (target[1], target[0]) if _exif_swaps(src) else target
                    src.draft(None, stored)
                src.load()
                img = _to_rgb(ImageOps.exif_transpose(src))
    except Image.DecompressionBombError as exc:
        raise PackError(f"{name}: too large for Pillow to open safely ({exc}); resize it yourself") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise PackError(f"{name}: cannot be read as an image to re-encode it ({type(exc).__name__}: {exc}); "
                        f"fix or remove the file") from None
    if img.size != target:
        img = img.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
    dest.parent.mkdir(parents=True, exist_ok=True)
    save: dict[str, Any] = {"quality": JPEG_QUALITY, "optimize": True}
    if icc:
        save["icc_profile"] = icc
    img.save(dest, "JPEG", **save)
    return img.size


# --------------------------------------------------------------------------------------------
# archive


def _deflated_size(path: Path) -> int:
    """Bytes zipfile will write for ``path`` deflated at level 9 (same compressor, same chunks)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            n += len(comp.compress(chunk))
    return n + len(comp.flush())


def _entry(arcname: str, source: Path) -> _Entry:
    size = source.stat().st_size
    if PurePosixPath(arcname).suffix.lower() in _STORED_EXTENSIONS:
        return _Entry(arcname, source, size, zipfile.ZIP_STORED, size)
    return _Entry(arcname, source, size, zipfile.ZIP_DEFLATED, _deflated_size(source))


def _archive_size(entries: list[_Entry]) -> int:
    return sum(e.footprint for e in entries) + _END_RECORD


def _sort_key(arcname: str) -> tuple[str, ...]:
    return PurePosixPath(arcname).parts


def _write_zip(entries: list[_Entry], out: Path, progress: Callable[[int, int], None] | None) -> None:
    total = sum(e.size for e in entries)
    done = 0
    if progress:
        progress(0, total)
    with zipfile.ZipFile(out, "w", allowZip64=True) as zf:
        for e in entries:
            info = zipfile.ZipInfo(e.arcname, date_time=_ZIP_EPOCH)
            info.compress_type = e.compress
            if e.compress == zipfile.ZIP_DEFLATED:
                if hasattr(info, "compress_level"):   # Python 3.13+
                    info.compress_level = 9
                else:
                    info._compresslevel = 9  # noqa: SLF001 - the per-entry level before 3.13
            info.create_system = 3       # the same bytes on every OS
            info.external_attr = _FILE_MODE
            info.file_size = e.size
            with open(e.source, "rb") as src, zf.open(info, "w") as dst:
                while chunk := src.read(_CHUNK):
                    dst.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, total)


def _too_large(size: int, limit: int, entries: list[_Entry], fitted: bool, min_side: int | None) -> PackTooLarge:
    largest = sorted(((e.arcname, e.size) for e in entries), key=lambda t: (-t[1], t[0]))[:5]
    listing = "; ".join(f"{n} ({_human(s)})" for n, s in largest)
    over = (f"Replicate's upload limit of 100 MiB ({limit:,} bytes)" if limit == UPLOAD_LIMIT else
            f"the limit of {_human(limit)} ({limit:,} bytes; Replicate's upload limit is 100 MiB)")
    head = f"the dataset archive would be {_human(size)} ({size:,} bytes), over {over}"
    if fitted:
        msg = (f"{head} even with every image re-encoded as JPEG (quality {JPEG_QUALITY}) and downscaled to a "
               f"shorter side of {min_side} px: it cannot fit without going below min_side ({min_side} px, the "
               f"largest training resolution). Largest files after reduction: {listing}. Remove images, or "
               f"train at a smaller resolution.")
    else:
        msg = (f"{head}. Largest files: {listing}. Pack with --fit to re-encode and downscale images (never "
               f"below the largest training resolution), or remove images.")
    return PackTooLarge(msg, size, limit, largest)


# --------------------------------------------------------------------------------------------
# the packer


def pack_dataset(folder: Path, out: Path, *, limit_bytes: int = UPLOAD_LIMIT, fit: bool = False,
                 min_side: int | None = None, progress: Callable[[int, int], None] | None = None,
                 max_image_pixels: int = MAX_IMAGE_PIXELS, inspect_only: dict | None = None) -> PackResult:
    """Pack ``folder`` into the zip ``out``; see the module docstring.

    ``min_side``: the shortest side ``fit`` may reduce an image to (pass ``largest_training_side(spec)``;
    default 1024, the spec's default resolution). ``progress(done, total)``: bytes of file data
    written so far and in all. ``max_image_pixels``: the trainer's per-image cap (the spec's
    ``dataset.max_image_pixels``); an image over it is refused, or downscaled under ``fit``.
    Raises ``PackTooLarge`` (before writing anything) or ``PackError``.
    """
    folder, out = Path(folder), Path(out)
    if not folder.exists():
        raise PackError(f"dataset folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise PackError(f"{str(folder)!r} is not a folder (pack a folder of images and captions)")
    if out.is_dir():
        raise PackError(f"{str(out)!r} is a folder; give the path of the zip to write")
    if out.resolve().is_relative_to(folder.resolve()):
        raise PackError(f"{str(out)!r} is inside the dataset folder; write the archive somewhere else "
                        f"(the dataset folder is never modified)")
    if min_side is None:
        min_side = DEFAULT_MIN_SIDE
    if min_side < MIN_IMAGE_SIDE:
        raise ValueError(f"min_side must be at least {MIN_IMAGE_SIDE}, got {min_side}")

    skipped: list[tuple[str, str]] = []
    problems: list[str] = []
    images: dict[str, _Image] = {}
    txts: dict[str, tuple[PurePosixPath, Path]] = {}
    tables: list[_Table] = []
    candidates: list[tuple[PurePosixPath, Path]] = []
    for rel, path, reason in sorted(_walk(folder), key=lambda t: t[0].parts):
        shown = rel.as_posix() + ("/" if reason and path.is_dir() and not path.is_symlink() else "")
        if reason:
            skipped.append((shown, reason))
            continue
        ext = rel.suffix.lower()
        if ext in IMAGE_EXTENSIONS:
            candidates.append((rel, path))
        elif ext == ".txt":
            txts[_key(rel)] = (rel, path)
        elif rel.name in CAPTION_FILES:
            tables.append(_Table(rel, path, rel.name))
        elif rel.name.lower() in CAPTION_FILES:
            skipped.append((shown, f"the trainer reads this table only when it is named {rel.name.lower()!r}; "
                                   f"rename it"))
        elif ext in UNSUPPORTED_IMAGE_EXTENSIONS:
            skipped.append((shown, f"unsupported image format {ext} (use JPEG, PNG, WebP, BMP or TIFF)"))
        else:
            skipped.append((shown, "not an image or a caption file"))

    over_cap: list[str] = []
    for rel, path in candidates:
        key, shown = _key(rel), rel.as_posix()
        if key in images:
            skipped.append((shown, f"another image has the same name ({images[key].rel.name}) and was used"))
            continue
        try:
            width, height = _probe(path)
        except Image.DecompressionBombError:
            skipped.append((shown, "too large for Pillow to open safely; the trainer refuses it too"))
            continue
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            skipped.append((shown, f"cannot be read as an image ({type(exc).__name__}: {exc})"[:300]))
            continue
        if min(width, height) < MIN_IMAGE_SIDE:
            skipped.append((shown, f"too small ({width}x{height}; at least {MIN_IMAGE_SIDE} px a side)"))
            continue
        images[key] = _Image(rel, path, path.stat().st_size, width, height)
        if width * height > max_image_pixels:
            over_cap.append(key)

    candidate_keys = {_key(rel) for rel, _ in candidates}
    for key, (rel, _) in sorted(txts.items()):
        if key not in images:
            why = "its image was left out" if key in candidate_keys else "caption has no image with the same name"
            skipped.append((rel.as_posix(), why))
    skipped.sort(key=lambda t: _sort_key(t[0].rstrip("/")))
    if not images:
        reasons = "; ".join(f"{n}: {r}" for n, r in skipped[:10]) or "the folder holds no files"
        raise PackError(f"no usable image in {str(folder)!r} ({reasons})")
    if over_cap and not fit:
        img = images[over_cap[0]]
        raise PackError(f"{img.rel.as_posix()}: {img.width}x{img.height} is over the trainer's cap of "
                        f"{max_image_pixels} pixels an image (the whole dataset would be refused); "
                        f"pack with --fit to downscale it, or resize it")

    for table in tables:
        _parse_table(table, problems)
    # which caption the trainer will use, in its order: same-stem .txt > metadata.jsonl > captions.csv
    merged = {kind: {n: text for t in tables if t.kind == kind for n, text in t.names.items()}
              for kind in ("metadata.jsonl", "captions.csv")}
    caption_sources = {"txt": 0, "metadata.jsonl": 0, "captions.csv": 0, "none": 0}
    for key, img in images.items():
        name = img.rel.as_posix()
        source = "txt" if key in txts else next((k for k, names in merged.items() if name in names), "none")
        if source in merged and not merged[source][name]:
            source = "none"  # an empty caption in the table
        caption_sources[source] += 1
    known = {img.rel.as_posix() for img in images.values()}
    for table in tables:
        orphans = sorted(n for n in table.names if n not in known)
        if orphans:
            problems.append(f"{table.rel}: {len(orphans)} row(s) name no image in the dataset "
                            f"(first: {orphans[0]!r}); names are relative to the table's folder")

    with tempfile.TemporaryDirectory(prefix="advanced-trainer-pack-") as tmp_name:
        tmp = Path(tmp_name)
        image_entries = {key: _entry(img.rel.as_posix(), img.path) for key, img in images.items()}
        fixed = [_entry(rel.as_posix(), path) for key, (rel, path) in txts.items() if key in images]
        renames: dict[str, str] = {}
        table_entries: list[_Entry] = []

        def render_tables() -> None:
            table_entries.clear()
            for i, t in enumerate(tables):
                dest = tmp / "tables" / str(i) / t.rel.name
                source = dest if renames and _rewrite_table(t, renames, dest) else t.path
                table_entries.append(_entry(t.rel.as_posix(), source))

        def all_entries() -> list[_Entry]:
            return sorted([*image_entries.values(), *fixed, *table_entries], key=lambda e: _sort_key(e.arcname))

        render_tables()
        size = _archive_size(all_entries())
        if inspect_only is not None:  # report what the archive would be, write nothing
            largest = sorted(((e.arcname, e.footprint) for e in all_entries()), key=lambda t: -t[1])[:5]
            inspect_only.update(bytes=size, images=len(images), skipped=len(skipped),
                                largest=[{"path": n, "bytes": b} for n, b in largest])
            return None  # type: ignore[return-value]
        changed: list[PackChange] = []
        if size > limit_bytes and not fit:
            raise _too_large(size, limit_bytes, all_entries(), False, min_side)
        if size > limit_bytes or over_cap:
            size = _fit(images, image_entries, over_cap, renames, changed, render_tables, all_entries,
                        tmp, limit_bytes, min_side, max_image_pixels)

        entries = all_entries()
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(f".{out.name}.partial")
        try:
            _write_zip(entries, partial, progress)
            written = partial.stat().st_size
            if written > limit_bytes:  # the computed size is exact; this guards against files changing meanwhile
                raise _too_large(written, limit_bytes, entries, bool(changed), min_side)
            digest = file_sha256(partial)
            os.replace(partial, out)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise

    changed.sort(key=lambda c: _sort_key(c.path))
    return PackResult(archive=out, size_bytes=written, sha256=digest, images=len(images),
                      captions=len(images) - caption_sources["none"], skipped=skipped, changed=changed,
                      caption_sources=caption_sources, warnings=problems, limit_bytes=limit_bytes)


def inspect_folder(folder: Path) -> dict:
    """The size the packed archive would have (exact), its image count and largest entries — nothing written."""
    info: dict = {}
    with tempfile.TemporaryDirectory(prefix="advanced-trainer-inspect-") as tmp:
        pack_dataset(folder, Path(tmp) / "dataset.zip", inspect_only=info)
    return info


def _fit(images: dict[str, _Image], image_entries: dict[str, _Entry], over_cap: list[str],
         renames: dict[str, str], changed: list[PackChange], render_tables: Callable[[], None],
         all_entries: Callable[[], list[_Entry]], tmp: Path, limit: int, min_side: int,
         max_pixels: int) -> int:
    """Re-encode images, largest first, until the archive fits; returns its exact size."""
    by_size = sorted(images, key=lambda k: (-images[k].size, images[k].rel.parts))
    # 1. images over the pixel cap (required); 2. images larger than min_side, downscaled to it;
    # 3. the rest re-encoded at their size, kept only when that saves at least 10 %.
    plan = ([(k, True, True) for k in by_size if k in over_cap]
            + [(k, True, False) for k in by_size
               if k not in over_cap and min(images[k].width, images[k].height) > min_side]
            + [(k, False, False) for k in by_size
               if k not in over_cap and min(images[k].width, images[k].height) <= min_side])
    done: set[str] = set()
    size = _archive_size(all_entries())
    for key, downscale, required in plan:
        if size <= limit and not required:
            render_tables()  # renames change the tables; the loop goes on if they tip it over
            size = _archive_size(all_entries())
            if size <= limit:
                return size
        if key in done:
            continue
        img, old = images[key], image_entries[key]
        new_rel = img.rel if img.rel.suffix.lower() in _JPEG_EXTENSIONS else img.rel.with_suffix(".jpg")
        dest = tmp / "images" / new_rel
        new_dims = _reencode(img, dest, min_side, max_pixels, downscale)
        new = _entry(new_rel.as_posix(), dest)
        keep = required or (new.footprint < old.footprint if downscale
                            else new.size <= old.size * _REENCODE_MIN_SAVING)
        if not keep:
            dest.unlink()
            continue
        done.add(key)
        image_entries[key] = new
        size += new.footprint - old.footprint
        if new_rel != img.rel:
            renames[img.rel.as_posix()] = new_rel.as_posix()
        changed.append(PackChange(img.rel.as_posix(), new_rel.as_posix(), old.size, new.size,
                                  (img.width, img.height), new_dims))
    render_tables()
    size = _archive_size(all_entries())
    if size > limit:
        raise _too_large(size, limit, all_entries(), True, min_side)
    return size
