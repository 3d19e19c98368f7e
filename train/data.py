"""Data staging: an uploaded archive (or a folder) -> checked images with captions.

What people upload is messy, and what an attacker uploads is hostile. This module:
- detects zip / tar / tar.gz by magic bytes, never by extension;
- refuses unsafe archives with a message naming the entry: path traversal, absolute
  paths, links and device files, more entries or uncompressed bytes than the limits,
  images over the pixel cap (decompression bombs);
- tolerates junk (``__MACOSX/``, ``._*``, ``.DS_Store``, ``Thumbs.db``), one nested top
  folder, upper-case extensions, EXIF rotation, RGBA / CMYK / P / L / 16-bit images;
- pairs captions: same-stem ``.txt`` > ``metadata.jsonl`` (``file_name``, ``text``) >
  ``captions.csv`` > the default caption / trigger word, and puts the trigger word into
  captions that lack it;
- skips files it cannot use, naming each with the reason, and fails only when no usable
  image is left.

Extraction writes only below the job's own dataset folder.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import shutil
import stat
import tarfile
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
UNSUPPORTED_IMAGE_EXTENSIONS = {".gif", ".heic", ".heif", ".avif", ".svg", ".psd", ".jxl", ".raw", ".cr2",
                                ".nef", ".dng", ".arw", ".ico", ".exr"}
CAPTION_FILES = {"metadata.jsonl", "captions.csv"}
MIN_IMAGE_SIDE = 16
_JUNK_NAMES = {".ds_store", "thumbs.db", "desktop.ini"}
_COPY_CHUNK = 1 << 20


class UnsafeArchiveError(ValueError):
    """The archive is refused as a whole; the message names the entry."""


class DatasetError(ValueError):
    """The dataset cannot be used (unreadable archive, no usable image)."""


@dataclass(frozen=True)
class DataLimits:
    max_files: int = 20_000
    max_bytes: int = 8 * 2**30
    max_image_pixels: int = 80_000_000


@dataclass(frozen=True)
class ImageRecord:
    path: Path          # the staged file
    name: str           # its path inside the dataset, for messages
    caption: str
    caption_source: str  # txt | metadata.jsonl | captions.csv | default
    width: int          # after EXIF rotation
    height: int


@dataclass
class StagedDataset:
    root: Path
    images: list[ImageRecord]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    dataset_hash: str = ""

    def report(self) -> dict:
        return {
            "images_used": len(self.images),
            "dataset_hash": self.dataset_hash,
            "images": [{"name": r.name, "size": [r.width, r.height], "caption": r.caption,
                        "caption_source": r.caption_source} for r in self.images],
            "skipped": [{"name": n, "reason": why} for n, why in self.skipped],
        }


# --------------------------------------------------------------------------------------------
# archives


def archive_kind(path: Path) -> str:
    """``zip``, ``tar.gz`` or ``tar`` from the file's first bytes; DatasetError otherwise."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"):
        return "zip"
    if head[:2] == b"\x1f\x8b":
        return "tar.gz"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    raise DatasetError(f"{path.name}: not a zip, tar or tar.gz archive (its first bytes are {head[:8]!r})")


def _safe_member_path(name: str) -> PurePosixPath:
    """The entry's relative path, or UnsafeArchiveError for absolute or escaping names."""
    if any(ord(c) < 32 for c in name):
        raise UnsafeArchiveError(f"archive entry {name!r}: control characters in the name")
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        raise UnsafeArchiveError(f"archive entry {name!r}: absolute paths are not allowed")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"archive entry {name!r}: path traversal ('..') is not allowed")
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def _copy_bounded(src: IO[bytes], dst_path: Path, budget: list[int], name: str, limits: DataLimits) -> None:
    """Stream ``src`` into ``dst_path`` and stop when the archive's byte budget runs out."""
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    with open(dst_path, "wb") as dst:
        while chunk := src.read(_COPY_CHUNK):
            budget[0] -= len(chunk)
            if budget[0] < 0:
                raise UnsafeArchiveError(
                    f"archive entry {name!r}: the archive unpacks to more than {limits.max_bytes} bytes (limit)")
            dst.write(chunk)


def _inside(dest: Path, rel: PurePosixPath) -> Path:
    target = (dest / rel).resolve()
    if not target.is_relative_to(dest.resolve()):
        raise UnsafeArchiveError(f"archive entry {str(rel)!r}: resolves outside the dataset folder")
    return target


def extract_archive(archive: Path, dest: Path, limits: DataLimits) -> None:
    """Extract ``archive`` into ``dest`` (which must not exist yet) after checking every entry."""
    kind = archive_kind(archive)
    dest.mkdir(parents=True)
    budget = [limits.max_bytes]
    try:
        if kind == "zip":
            _extract_zip(archive, dest, limits, budget)
        else:
            _extract_tar(archive, dest, limits, budget)
    except UnsafeArchiveError:
        shutil.rmtree(dest, ignore_errors=True)  # nothing half-extracted stays behind
        raise
    # NotImplementedError: a compression method Python cannot read (Deflate64 from Windows Explorer,
    # AES); ValueError: e.g. a name flagged UTF-8 that is not. Both are unusable uploads, not crashes.
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError, NotImplementedError,
            ValueError) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise DatasetError(f"{archive.name}: the {kind} archive cannot be unpacked ({exc})") from None
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _extract_zip(archive: Path, dest: Path, limits: DataLimits, budget: list[int]) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        if len(infos) > limits.max_files:
            raise UnsafeArchiveError(f"{archive.name}: {len(infos)} entries, more than the limit of {limits.max_files}")
        declared = 0
        for info in infos:  # name the entry that crosses the limit, as the tar path does
            declared += info.file_size
            if declared > limits.max_bytes:
                raise UnsafeArchiveError(f"archive entry {info.filename!r}: the archive unpacks to more than "
                                         f"{limits.max_bytes} bytes (limit)")
        plan = []
        for info in infos:
            rel = _safe_member_path(info.filename)
            kind = (info.external_attr >> 16) & 0o170000
            if kind == stat.S_IFLNK:
                raise UnsafeArchiveError(f"archive entry {info.filename!r}: links are not allowed")
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise UnsafeArchiveError(f"archive entry {info.filename!r}: special files are not allowed")
            if info.flag_bits & 0x1:
                raise UnsafeArchiveError(f"archive entry {info.filename!r}: encrypted entries are not supported")
            plan.append((info, rel))
        for info, rel in plan:
            if info.is_dir() or str(rel) == ".":
                continue
            with zf.open(info) as src:
                _copy_bounded(src, _inside(dest, rel), budget, info.filename, limits)


def _extract_tar(archive: Path, dest: Path, limits: DataLimits, budget: list[int]) -> None:
    count = 0
    with tarfile.open(archive, mode="r:*") as tf:
        for member in tf:  # streaming: a tar.gz is checked as it decompresses
            count += 1
            if count > limits.max_files:
                raise UnsafeArchiveError(f"{archive.name}: more entries than the limit of {limits.max_files}")
            rel = _safe_member_path(member.name)
            if member.issym() or member.islnk():
                raise UnsafeArchiveError(f"archive entry {member.name!r}: links are not allowed")
            if member.isdir():
                continue
            if not member.isfile():
                raise UnsafeArchiveError(f"archive entry {member.name!r}: special files are not allowed")
            if member.size > budget[0]:
                raise UnsafeArchiveError(
                    f"archive entry {member.name!r}: the archive unpacks to more than {limits.max_bytes} bytes (limit)")
            src = tf.extractfile(member)
            assert src is not None
            _copy_bounded(src, _inside(dest, rel), budget, member.name, limits)


# --------------------------------------------------------------------------------------------
# images


def load_rgb(path: Path, max_pixels: int) -> Image.Image:
    """Open an image, apply EXIF orientation and convert it to 8-bit RGB.

    Raises UnsafeArchiveError over the pixel cap (checked from the header, before decoding)
    and OSError / UnidentifiedImageError / ValueError for files that cannot be decoded.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
        except Image.DecompressionBombError as exc:
            # Pillow refuses headers over 2x its own MAX_IMAGE_PIXELS inside open(), before our check
            # runs; without this a real bomb escaped as a bare PIL error instead of a refusal.
            raise UnsafeArchiveError(f"image {path.name!r}: over the cap of {max_pixels} pixels ({exc})") from None
    with img:  # close the file on every path (a refused or undecodable image too)
        if img.width * img.height > max_pixels:
            raise UnsafeArchiveError(
                f"image {path.name!r}: {img.width}x{img.height} pixels is over the cap of {max_pixels} pixels")
        img.load()
        # exif_transpose returns a new image (a copy when there is nothing to do), so the result
        # outlives the closed original.
        return to_rgb(ImageOps.exif_transpose(img))


def to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if mode == "F" and arr.max(initial=0) <= 1.0:
            top = 1.0
        arr8 = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    # "transparency" in info: a P palette entry or an RGB / L colour key (PNG tRNS), which is as
    # transparent as an alpha channel and must come out white too, not as the key colour.
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return img
    return img.convert("RGB")  # CMYK, YCbCr, P, L, 1, LAB, HSV


# --------------------------------------------------------------------------------------------
# captions


def read_caption_file(path: Path) -> str:
    """A caption file's text: BOM removed, CRLF/CR normalised, lines joined, whitespace tidied."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    lines = [ln.strip() for ln in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\s+", " ", " ".join(ln for ln in lines if ln)).strip()


def _caption_table(root: Path, skipped: list[tuple[str, str]]) -> tuple[dict[str, str], dict[str, str]]:
    """Captions keyed by the image's relative path, from metadata.jsonl and captions.csv files."""
    from_jsonl: dict[str, str] = {}
    from_csv: dict[str, str] = {}
    for meta in sorted(root.rglob("metadata.jsonl")):
        base = meta.parent.relative_to(root)
        for lineno, line in enumerate(meta.read_text(encoding="utf-8-sig", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name, text = row["file_name"], row["text"]
                assert isinstance(name, str) and isinstance(text, str)
            except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
                skipped.append((f"{meta.relative_to(root)}:{lineno}", 'not a JSON object with "file_name" and "text"'))
                continue
            from_jsonl[str(base / name.replace("\\", "/"))] = _tidy(text)
    for table in sorted(root.rglob("captions.csv")):
        base = table.parent.relative_to(root)
        text = table.read_text(encoding="utf-8-sig", errors="replace").replace("\r\n", "\n")
        reader = csv.DictReader(io.StringIO(text))
        fields = {f.lower().strip(): f for f in reader.fieldnames or []}
        name_col = next((fields[k] for k in ("file_name", "filename", "image", "file") if k in fields), None)
        text_col = next((fields[k] for k in ("text", "caption", "prompt") if k in fields), None)
        if not name_col or not text_col:
            skipped.append((str(table.relative_to(root)),
                            "needs a header with file_name (or image) and text (or caption) columns"))
            continue
        for row in reader:
            if row.get(name_col):
                from_csv[str(base / row[name_col].strip().replace("\\", "/"))] = _tidy(row.get(text_col) or "")
    return from_jsonl, from_csv


def _tidy(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def add_trigger_word(caption: str, trigger: str, position: str = "prepend") -> str:
    """Put ``trigger`` into ``caption`` unless it is already there as a word (any case)."""
    if not trigger:
        return caption
    if re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption, flags=re.IGNORECASE):
        return caption
    if not caption:
        return trigger
    return f"{trigger}, {caption}" if position == "prepend" else f"{caption}, {trigger}"


# --------------------------------------------------------------------------------------------
# staging


def _is_junk(rel: PurePosixPath) -> bool:
    return (any(p == "__MACOSX" or p.startswith(".") for p in rel.parts)
            or rel.name.lower() in _JUNK_NAMES)


def _dataset_root(folder: Path) -> Path:
    """Descend through single nested top folders (``data.zip`` -> ``data/`` -> images)."""
    root = folder
    while True:
        entries = [p for p in root.iterdir() if not _is_junk(PurePosixPath(p.name))]
        if len(entries) == 1 and entries[0].is_dir():
            root = entries[0]
        else:
            return root


def _walk(root: Path) -> Iterator[tuple[Path, PurePosixPath]]:
    for path in sorted(root.rglob("*")):
        rel = PurePosixPath(path.relative_to(root).as_posix())
        if path.is_symlink():
            yield path, rel  # only reachable for a folder given by a user; refused below
        elif path.is_file():
            yield path, rel


def stage_dataset(source: Path, job_dir: Path, limits: DataLimits = DataLimits(), trigger_word: str = "",
                  default_caption: str = "", trigger_position: str = "prepend") -> StagedDataset:
    """Stage ``source`` (an archive or a folder) for training and describe what was found.

    Archives are extracted under ``job_dir/dataset``; folders are read in place.
    """
    source = Path(source)
    if not source.exists():
        raise DatasetError(f"dataset {str(source)!r} does not exist")
    if source.is_dir():
        return _stage_folder(source, limits, trigger_word, default_caption, trigger_position)
    folder = Path(job_dir) / "dataset"
    if folder.exists():
        shutil.rmtree(folder)
    extract_archive(source, folder, limits)
    try:
        return _stage_folder(folder, limits, trigger_word, default_caption, trigger_position)
    except BaseException:
        # An archive refused after unpacking (an image over the pixel cap, too many files) or one
        # with no usable image leaves nothing extracted behind. A user's folder is never removed.
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _stage_folder(folder: Path, limits: DataLimits, trigger_word: str, default_caption: str,
                  trigger_position: str) -> StagedDataset:
    root = _dataset_root(folder)

    skipped: list[tuple[str, str]] = []
    images: dict[str, Path] = {}
    txt_captions: dict[str, Path] = {}
    n_files = 0
    for path, rel in _walk(root):
        n_files += 1
        if n_files > limits.max_files:
            raise UnsafeArchiveError(f"dataset: more than {limits.max_files} files (limit)")
        if path.is_symlink():
            raise UnsafeArchiveError(f"dataset entry {str(rel)!r}: links are not allowed")
        if _is_junk(rel):
            continue
        ext = rel.suffix.lower()
        key = str(rel.with_suffix(""))
        if ext in IMAGE_EXTENSIONS:
            if key in images:
                skipped.append((str(rel), f"another image has the same name ({images[key].name}) and was used"))
                continue
            images[key] = path
        elif ext == ".txt":
            txt_captions[key] = path
        elif rel.name.lower() in CAPTION_FILES:
            continue
        elif ext in UNSUPPORTED_IMAGE_EXTENSIONS:
            skipped.append((str(rel), f"unsupported image format {ext} (use JPEG, PNG, WebP, BMP or TIFF)"))
        else:
            skipped.append((str(rel), "not an image or a caption file"))

    for key in sorted(set(txt_captions) - set(images)):
        skipped.append((str(txt_captions[key].relative_to(root)), "caption has no image with the same name"))
    from_jsonl, from_csv = _caption_table(root, skipped)

    records: list[ImageRecord] = []
    digest = hashlib.sha256()
    for key in sorted(images):
        path = images[key]
        name = path.relative_to(root).as_posix()
        try:
            img = load_rgb(path, limits.max_image_pixels)
        except UnsafeArchiveError:
            raise
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            skipped.append((name, f"cannot be decoded as an image ({type(exc).__name__}: {exc})"[:300]))
            continue
        if min(img.size) < MIN_IMAGE_SIDE:
            skipped.append((name, f"too small ({img.width}x{img.height}; at least {MIN_IMAGE_SIDE} px a side)"))
            continue
        if key in txt_captions:
            caption, origin = read_caption_file(txt_captions[key]), "txt"
        elif name in from_jsonl:
            caption, origin = from_jsonl[name], "metadata.jsonl"
        elif name in from_csv:
            caption, origin = from_csv[name], "captions.csv"
        else:
            caption, origin = default_caption.strip(), "default"
        caption = add_trigger_word(caption, trigger_word, trigger_position)
        records.append(ImageRecord(path, name, caption, origin, img.width, img.height))
        digest.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest() + caption.encode() + b"\0")

    if not records:
        reasons = "; ".join(f"{n}: {r}" for n, r in skipped[:10]) or "the dataset holds no files"
        raise DatasetError(f"no usable image in the dataset ({reasons})")
    return StagedDataset(root=root, images=records, skipped=skipped, dataset_hash=digest.hexdigest())


def dataset_report_lines(ds: StagedDataset, buckets: dict[str, int] | None = None) -> list[str]:
    """Human lines for the log: images used, skipped files with reasons, buckets and counts."""
    lines = [f"dataset: {len(ds.images)} images used, {len(ds.skipped)} files skipped"]
    sources: dict[str, int] = {}
    for r in ds.images:
        sources[r.caption_source] = sources.get(r.caption_source, 0) + 1
    lines.append("dataset: captions from " + ", ".join(f"{k} ({v})" for k, v in sorted(sources.items())))
    lines += [f"dataset: skipped {name}: {reason}" for name, reason in ds.skipped]
    if buckets:
        lines.append("dataset: buckets " + ", ".join(f"{k}: {v}" for k, v in buckets.items()))
    return lines

