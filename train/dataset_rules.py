"""The dataset rules the container's staging and the client's packer share, in one place.

``train/data.py`` (which unpacks what Replicate hands the container) and ``client/pack.py``
(which builds what the client uploads) must agree on what a dataset entry is, which caption
wins and which sizes are refused, or the client uploads archives the container rejects. Both
import this module. Standard library only: the client runs on laptops without torch, numpy
or Pillow's decoders in the loop.

What is here:
- which file is an image, a caption, a caption table, junk, or something else (``classify``);
- the size rules: a cap for caption files and caption tables, and a per-entry
  compression-ratio bound that refuses decompression bombs from the sizes an archive declares;
- caption tables (``metadata.jsonl``, ``captions.csv``) parsed the same way on both sides, and
  the precedence between caption sources;
- the dataset hash written into the output's ``config.json``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
UNSUPPORTED_IMAGE_EXTENSIONS = {
    ".gif",
    ".heic",
    ".heif",
    ".avif",
    ".svg",
    ".psd",
    ".jxl",
    ".raw",
    ".cr2",
    ".nef",
    ".dng",
    ".arw",
    ".ico",
    ".exr",
}
CAPTION_EXTENSION = ".txt"  # a same-stem caption: a.jpg + a.txt
CAPTION_FILES = {"metadata.jsonl", "captions.csv"}  # caption tables, read by these exact names
JUNK_NAMES = {".ds_store", "thumbs.db", "desktop.ini"}
MIN_IMAGE_SIDE = 16

# The container's defaults (the spec's ``dataset`` section may change them per training).
DEFAULT_MAX_FILES = 20_000
DEFAULT_MAX_BYTES = 8 * 2**30
DEFAULT_MAX_IMAGE_PIXELS = 80_000_000

# A caption is a sentence or a paragraph; text encoders read at most 512 tokens. 1 MiB is a
# thousand times more than any real caption and small enough to read into memory.
MAX_CAPTION_BYTES = 1 * 2**20
# A caption table holds one row per image: 4 KiB a row covers a 512-token caption in any script
# (JSON-escaped), times the most files an archive may hold; never less than one caption's cap.
TABLE_BYTES_PER_FILE = 4 * 2**10
# Deflate reaches ~1000x only on degenerate data (zeros, one repeated byte). Real images are
# already compressed (PNG, JPEG, WebP: ~1x) and even raw BMP / TIFF photos or caption tables
# stay far below 200x, so an entry over it is refused as a decompression bomb. Entries up to
# the floor are exempt: they cannot fill a disk however well they compress.
MAX_COMPRESSION_RATIO = 200
RATIO_FLOOR_BYTES = 1 * 2**20

# what ``classify`` returns
IMAGE, CAPTION, TABLE, JUNK, OTHER = "image", "caption", "table", "junk", "other"
CAPTION_SOURCES = ("txt", "metadata.jsonl", "captions.csv")  # highest precedence first; else "default"


# --------------------------------------------------------------------------------------------
# what an entry is


def junk_reason(name: str, is_dir: bool = False) -> str | None:
    """Why a file or folder name is operating-system junk (never part of a dataset), or None."""
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


def is_junk(rel: PurePosixPath) -> bool:
    """True when any part of the relative path is junk (a file inside ``__MACOSX/`` is junk too)."""
    return any(junk_reason(part) for part in rel.parts)


def classify(rel: PurePosixPath) -> tuple[str, str]:
    """(kind, reason) for a file at ``rel``: kind is IMAGE, CAPTION, TABLE, JUNK or OTHER.

    The reason says why a JUNK or OTHER file is left out (empty for the kinds that are used).
    """
    if is_junk(rel):
        return JUNK, next(r for part in rel.parts if (r := junk_reason(part)))
    ext = rel.suffix.lower()
    if ext in IMAGE_EXTENSIONS:
        return IMAGE, ""
    if ext == CAPTION_EXTENSION:
        return CAPTION, ""
    if rel.name in CAPTION_FILES:
        return TABLE, ""
    if rel.name.lower() in CAPTION_FILES:
        return OTHER, f"caption tables are read only when named {rel.name.lower()!r}; rename it"
    if ext in UNSUPPORTED_IMAGE_EXTENSIONS:
        return OTHER, f"unsupported image format {ext} (use JPEG, PNG, WebP, BMP or TIFF)"
    return OTHER, "not an image or a caption file"


def image_key(rel: PurePosixPath) -> str:
    """The name an image and its same-stem caption share: the relative path without the extension."""
    return str(rel.with_suffix(""))


# --------------------------------------------------------------------------------------------
# sizes


def caption_size_cap(kind: str, max_files: int = DEFAULT_MAX_FILES) -> int | None:
    """The most bytes a caption (CAPTION) or a caption table (TABLE) may hold; None for other kinds."""
    if kind == CAPTION:
        return MAX_CAPTION_BYTES
    if kind == TABLE:
        return max(MAX_CAPTION_BYTES, max_files * TABLE_BYTES_PER_FILE)
    return None


def oversize_reason(kind: str, size: int, max_files: int = DEFAULT_MAX_FILES) -> str | None:
    """Why a caption file or table of ``size`` bytes is refused, or None when it is within its cap."""
    cap = caption_size_cap(kind, max_files)
    if cap is None or size <= cap:
        return None
    what = "a caption file" if kind == CAPTION else "a caption table"
    return f"{size} bytes is over the cap of {cap} bytes for {what}"


def ratio_reason(size: int, compressed: int) -> str | None:
    """Why an entry that unpacks to ``size`` bytes from ``compressed`` bytes is refused, or None.

    ``compressed`` is what the archive declares (zip) or what was read so far (tar.gz).
    """
    if size <= RATIO_FLOOR_BYTES or size <= MAX_COMPRESSION_RATIO * max(compressed, 1):
        return None
    return (
        f"unpacks to {size} bytes from {compressed} compressed bytes, a ratio over the limit of "
        f"{MAX_COMPRESSION_RATIO}x (a decompression bomb); no real image or caption compresses that well"
    )


# --------------------------------------------------------------------------------------------
# captions


def tidy(text: str) -> str:
    """Whitespace runs (newlines, tabs) collapsed to single spaces, ends stripped."""
    return re.sub(r"\s+", " ", text).strip()


def decode_caption(raw: bytes) -> str:
    """A caption file's text: BOM removed, CRLF/CR normalised, lines joined, whitespace tidied.

    UTF-8 first; anything else is read as Latin-1, which decodes every byte (older Windows editors).
    """
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return tidy(" ".join(ln.strip() for ln in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")))


def table_key(base: PurePosixPath, name: str) -> str:
    """The image a table row names: relative to the table's own folder, Windows separators allowed."""
    return str(base / name.replace("\\", "/"))


def csv_columns(header: list[str]) -> tuple[int | None, int | None]:
    """(file name column, caption column) in a captions.csv header; the last of a repeated name wins."""
    cols = {h.lower().strip(): i for i, h in enumerate(header)}
    name_col = next((cols[k] for k in ("file_name", "filename", "image", "file") if k in cols), None)
    text_col = next((cols[k] for k in ("text", "caption", "prompt") if k in cols), None)
    return name_col, text_col


def parse_caption_table(
    kind: str, raw: bytes, base: PurePosixPath
) -> tuple[dict[str, str], list[tuple[int | None, str]]]:
    """Captions keyed by image path (see ``table_key``) from a metadata.jsonl or captions.csv.

    Returns (captions, problems); a problem is (line number or None for the whole file, reason).
    Rows that cannot be read are reported, never fatal: the other rows still count.
    """
    text = raw.decode("utf-8-sig", errors="replace")
    captions: dict[str, str] = {}
    problems: list[tuple[int | None, str]] = []
    if kind == "metadata.jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name, caption = row["file_name"], row["text"]
                assert isinstance(name, str) and isinstance(caption, str)
            except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
                problems.append((lineno, 'not a JSON object with "file_name" and "text"'))
                continue
            captions[table_key(base, name)] = tidy(caption)
        return captions, problems
    reader = csv.reader(io.StringIO(text.replace("\r\n", "\n")))
    name_col, text_col = csv_columns(next(reader, None) or [])
    if name_col is None or text_col is None:
        return {}, [(None, "needs a header with file_name (or image) and text (or caption) columns")]
    for row in reader:
        name = row[name_col].strip() if name_col < len(row) else ""
        if name:
            captions[table_key(base, name)] = tidy(row[text_col] if text_col < len(row) else "")
    return captions, problems


def caption_source(has_txt: bool, name: str, tables: Mapping[str, Mapping[str, str]]) -> str:
    """Which caption an image gets: same-stem .txt > metadata.jsonl > captions.csv > "default".

    ``tables``: table kind -> {image path: caption}, merged over every table of that kind.
    """
    if has_txt:
        return "txt"
    return next((kind for kind in CAPTION_SOURCES[1:] if name in tables.get(kind, {})), "default")


# --------------------------------------------------------------------------------------------
# the dataset hash


class DatasetHash:
    """SHA-256 over what is trained on: each image's name, its file's bytes and its final caption."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()

    def add(self, name: str, path: Path, caption: str) -> None:
        with open(path, "rb") as f:
            file_digest = hashlib.file_digest(f, "sha256").digest()  # streamed: images can be large
        self._digest.update(name.encode() + b"\0" + file_digest + caption.encode() + b"\0")

    def hexdigest(self) -> str:
        return self._digest.hexdigest()
