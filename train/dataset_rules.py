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
- before/after pairs for edit models (docs/edit.md): which image is a control of which target
  (``control_target``, ``find_pairs``), and what a model accepts (``PairRule``, ``check_pairs``);
- the dataset hash written into the output's ``config.json``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

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
# Video clips (video models; docs/video.md): decoded with PyAV by ``train/clips.py``.
CLIP_EXTENSIONS = {".mp4", ".mov", ".webm", ".mkv"}
CAPTION_EXTENSION = ".txt"  # a same-stem caption: a.jpg + a.txt
CAPTION_FILES = {"metadata.jsonl", "captions.csv"}  # caption tables, read by these exact names
JUNK_NAMES = {".ds_store", "thumbs.db", "desktop.ini"}
MIN_IMAGE_SIDE = 16

# The container's defaults (the spec's ``dataset`` section may change them per training).
DEFAULT_MAX_FILES = 20_000
DEFAULT_MAX_BYTES = 8 * 2**30
DEFAULT_MAX_IMAGE_PIXELS = 80_000_000
# Clips: a clip over this many seconds is skipped (named); one listing more frames is refused as
# unsafe before any is decoded (an hour at 24 fps is 86 400 frames).
DEFAULT_MAX_CLIP_SECONDS = 600.0
DEFAULT_MAX_CLIP_FRAMES = 50_000

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
IMAGE, CLIP, CAPTION, TABLE, JUNK, OTHER = "image", "clip", "caption", "table", "junk", "other"
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
    """(kind, reason) for a file at ``rel``: kind is IMAGE, CLIP, CAPTION, TABLE, JUNK or OTHER.

    The reason says why a JUNK or OTHER file is left out (empty for the kinds that are used).
    """
    if is_junk(rel):
        return JUNK, next(r for part in rel.parts if (r := junk_reason(part)))
    ext = rel.suffix.lower()
    if ext in IMAGE_EXTENSIONS:
        return IMAGE, ""
    if ext in CLIP_EXTENSIONS:
        return CLIP, ""
    if ext == CAPTION_EXTENSION:
        return CAPTION, ""
    if rel.name in CAPTION_FILES:
        return TABLE, ""
    if rel.name.lower() in CAPTION_FILES:
        return OTHER, f"caption tables are read only when named {rel.name.lower()!r}; rename it"
    if ext in UNSUPPORTED_IMAGE_EXTENSIONS:
        return OTHER, f"unsupported image format {ext} (use JPEG, PNG, WebP, BMP or TIFF)"
    return OTHER, "not an image or a caption file"


def is_clip(name: str) -> bool:
    """The dataset entry ``name`` is a video clip (by its extension, any case)."""
    return PurePosixPath(name).suffix.lower() in CLIP_EXTENSIONS


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


@dataclass
class CaptionTable:
    """What one caption table says: captions and (metadata.jsonl only) control images, keyed by the
    target's path (``table_key``), and the rows that could not be read as (line or None, reason)."""

    captions: dict[str, str] = field(default_factory=dict)
    controls: dict[str, list[str]] = field(default_factory=dict)  # target -> control paths, as listed
    masks: dict[str, str] = field(default_factory=dict)  # target -> its loss mask's path (mask_file_name)
    problems: list[tuple[int | None, str]] = field(default_factory=list)


def parse_caption_table(
    kind: str, raw: bytes, base: PurePosixPath
) -> tuple[dict[str, str], list[tuple[int | None, str]]]:
    """Captions keyed by image path (see ``table_key``) from a metadata.jsonl or captions.csv.

    Returns (captions, problems); a problem is (line number or None for the whole file, reason).
    Rows that cannot be read are reported, never fatal: the other rows still count.
    ``parse_table`` also returns the control images a metadata.jsonl names.
    """
    table = parse_table(kind, raw, base)
    return table.captions, table.problems


def parse_table(kind: str, raw: bytes, base: PurePosixPath) -> CaptionTable:
    """A metadata.jsonl or captions.csv read by both sides' rules; later rows win for the same image.

    A metadata.jsonl row holds ``file_name`` and ``text``, or ``file_name`` and ``control_file_name``
    (a file name or a list of them, relative to the table's folder), or all three: a pair's row
    needs no ``text`` when its caption comes from a ``.txt`` (or the default caption). A row
    with a malformed ``control_file_name`` is a problem like any unreadable row: none of it counts.
    """
    text = raw.decode("utf-8-sig", errors="replace")
    table = CaptionTable()
    if kind == "metadata.jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                name, caption, controls, mask = _jsonl_row(line)
            except ValueError as exc:
                table.problems.append((lineno, str(exc)))
                continue
            key = table_key(base, name)
            if caption is not None:
                table.captions[key] = tidy(caption)
            if controls is not None:
                table.controls[key] = [table_key(base, c) for c in controls]
            if mask is not None:
                table.masks[key] = table_key(base, mask)
        return table
    reader = csv.reader(io.StringIO(text.replace("\r\n", "\n")))
    name_col, text_col = csv_columns(next(reader, None) or [])
    if name_col is None or text_col is None:
        table.problems.append(
            (None, "needs a header with file_name (or image) and text (or caption) columns")
        )
        return table
    for row in reader:
        name = row[name_col].strip() if name_col < len(row) else ""
        if name:
            table.captions[table_key(base, name)] = tidy(row[text_col] if text_col < len(row) else "")
    return table


def _jsonl_row(line: str) -> tuple[str, str | None, list[str] | None, str | None]:
    """(file_name, text or None, control file names or None, mask file name or None) of one
    metadata.jsonl line; ValueError with the reason for a row that cannot be read."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        row = None
    name = row.get("file_name") if isinstance(row, dict) else None
    caption = row.get("text") if isinstance(row, dict) else None
    has_controls = isinstance(row, dict) and "control_file_name" in row
    has_mask = isinstance(row, dict) and "mask_file_name" in row
    if not isinstance(name, str) or not (
        isinstance(caption, str) or (caption is None and (has_controls or has_mask))
    ):
        raise ValueError('not a JSON object with "file_name" and "text"')
    assert isinstance(row, dict)
    mask = row.get("mask_file_name")
    if has_mask and (not isinstance(mask, str) or not mask.strip()):
        raise ValueError(f"mask_file_name must be a file name, got {json.dumps(mask)[:80]}")
    if isinstance(mask, str) and mask.replace("\\", "/") == name.replace("\\", "/"):
        raise ValueError(f"mask_file_name names the row's own file_name ({name!r})")
    if not has_controls:
        return name, caption, None, mask
    controls = row["control_file_name"]
    if isinstance(controls, str):
        controls = [controls]
    if not isinstance(controls, list) or not all(isinstance(c, str) and c.strip() for c in controls):
        raise ValueError(
            f"control_file_name must be a file name or a list of file names, got {json.dumps(controls)[:80]}"
        )
    if not controls:
        raise ValueError("control_file_name is an empty list (name at least one control image)")
    norm = [c.replace("\\", "/") for c in controls]
    if name.replace("\\", "/") in norm:
        raise ValueError(f"control_file_name names the row's own file_name ({name!r})")
    if len(set(norm)) < len(norm):
        raise ValueError("control_file_name names the same file twice")
    return name, caption, controls, mask


def caption_source(has_txt: bool, name: str, tables: Mapping[str, Mapping[str, str]]) -> str:
    """Which caption an image gets: same-stem .txt > metadata.jsonl > captions.csv > "default".

    ``tables``: table kind -> {image path: caption}, merged over every table of that kind.
    """
    if has_txt:
        return "txt"
    return next((kind for kind in CAPTION_SOURCES[1:] if name in tables.get(kind, {})), "default")


# --------------------------------------------------------------------------------------------
# loss masks (docs/spec.md, "Masked loss")

_MASK_STEM = re.compile(r"(?P<stem>.+)_mask", flags=re.IGNORECASE)


def mask_target(rel: PurePosixPath) -> str | None:
    """The target key (``image_key``) whose loss mask ``rel`` is named as: ``dir/NAME_mask.ext`` masks
    ``dir/NAME``; None for any other name."""
    m = _MASK_STEM.fullmatch(rel.stem)
    return str(rel.parent / m.group("stem")) if m else None


def find_masks(
    images: Iterable[str], table_masks: Mapping[str, str] | None = None
) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """({target image: its mask image}, [(mask left out, why)]) among ``images`` (every image file's name).

    metadata.jsonl's ``mask_file_name`` (target path -> mask path, ``parse_table``) wins over the file
    name (``NAME_mask.ext``). A file merely named like a mask with no image of that name
    (``gas_mask.jpg`` alone) is an ordinary image; a mask the table names that is not in the dataset
    is reported by the caller's skip list through the target."""
    names = list(images)
    by_key = {image_key(PurePosixPath(n)): n for n in names}
    present = set(names)
    masks: dict[str, str] = {}
    left_out: list[tuple[str, str]] = []
    declared = dict(table_masks or {})
    declared_masks = set(declared.values())
    for target, mask in declared.items():
        if target in present and mask in present and mask != target:
            masks[target] = mask

    def named_as_mask(n: str) -> bool:
        key = mask_target(PurePosixPath(n))
        return key is not None and key in by_key

    for n in names:
        if n in declared_masks or n in masks:
            continue
        key = mask_target(PurePosixPath(n))
        target = by_key.get(key) if key else None
        if target is None or named_as_mask(target):  # no such image, or a mask's mask
            continue
        if target in masks:
            if masks[target] != n:
                left_out.append((n, f"{target} has a mask already ({masks[target]}); this one is not used"))
            continue
        masks[target] = n
    return masks, left_out


# --------------------------------------------------------------------------------------------
# pairs (edit models, docs/edit.md)

CONTROL_FOLDER = "control"  # dir/control/NAME.ext is the control of dir/NAME.ext
_CONTROL_STEM = re.compile(r"(?P<stem>.+)_control(?:_(?P<n>\d+))?", flags=re.IGNORECASE)
_FEW = 3  # control files named in a message


def control_target(rel: PurePosixPath) -> tuple[str, int] | None:
    """(target key, order) when ``rel`` is named as a control image, else None.

    ``dir/NAME_control.ext`` and ``dir/control/NAME.ext`` are the first control (order 0) of the
    target whose ``image_key`` is ``dir/NAME``; ``dir/NAME_control_1.ext``, ``_control_2``... are
    further references (order 1, 2...), after the first. Whether the target exists is for
    ``find_pairs`` to say.
    """
    if len(rel.parts) > 1 and rel.parent.name.lower() == CONTROL_FOLDER:
        return str(rel.parent.parent / rel.stem), 0
    m = _CONTROL_STEM.fullmatch(rel.stem)
    if m is None:
        return None
    return str(rel.parent / m["stem"]), int(m["n"]) if m["n"] else 0


@dataclass
class Pairing:
    """Which images are targets and which their controls, by name (relative path with extension).

    A set is *paired* when any target has a control. Then every control image is kept apart from
    the targets: a control without a target is *loose* (never trained on), and a target without a
    control is skipped by a model that takes pairs. In a set without pairs a file merely named like
    a control (``remote_control.jpg`` with no ``remote.jpg``) is an ordinary image.
    """

    controls: dict[str, list[str]] = field(default_factory=dict)  # target -> controls, in reference order
    missing: dict[str, list[str]] = field(default_factory=dict)  # target -> jsonl-named files not there
    loose: list[tuple[str, str]] = field(default_factory=list)  # (control without a target, reason)
    unused: list[tuple[str, str]] = field(default_factory=list)  # (control left out, reason)

    @property
    def paired(self) -> bool:
        return bool(self.controls or self.missing)

    @property
    def pair_count(self) -> int:
        return len(set(self.controls) | set(self.missing))

    def control_names(self) -> set[str]:
        """Every image that is a control (of a target, loose or left out): never a target itself."""
        paired = {c for cs in self.controls.values() for c in cs}
        return paired | {n for n, _ in self.loose} | {n for n, _ in self.unused}


def find_pairs(images: Iterable[str], table_controls: Mapping[str, Sequence[str]] | None = None) -> Pairing:
    """The pairs among ``images`` (every image file's name) by file name and by ``table_controls``
    (metadata.jsonl's ``control_file_name``, target -> controls, see ``parse_table``).

    metadata.jsonl wins: a target whose row names its controls takes those, in the row's order,
    and its file-name controls (``NAME_control.ext``...) are left out. A named control that is not
    in the dataset goes to ``missing`` (the pair is skipped). Controls by file name come in
    reference order; two for the same place (``a_control.png`` and ``control/a.png``) keep the first.
    """
    table_controls = table_controls or {}
    present = sorted(images, key=lambda n: PurePosixPath(n).parts)
    by_key = {image_key(PurePosixPath(n)): n for n in present}
    declared = {c for cs in table_controls.values() for c in cs}
    named: dict[str, tuple[str, int]] = {}  # control -> (target key, order), by file name
    for n in present:
        found = None if n in declared else control_target(PurePosixPath(n))
        if found is not None:
            named[n] = found
    matched = {n for n, (key, _) in named.items() if by_key.get(key) not in (None, n)}
    targets = set(present) - declared - matched
    pairing = Pairing()
    orphans: list[tuple[str, str]] = []
    by_target: dict[str, list[tuple[int, str]]] = {}
    for n, (key, order) in named.items():
        target = by_key.get(key)
        if target is None or target not in targets:
            what = f"{target} is a control image itself" if target else f"no {key}.<ext> in the dataset"
            orphans.append((n, f"control image has no target image ({what}); it is not trained on"))
        elif target in table_controls:
            reason = (
                f"metadata.jsonl names the control images of {target}; its file-name controls are not used"
            )
            pairing.unused.append((n, reason))
        else:
            by_target.setdefault(target, []).append((order, n))
    _order_named(by_target, pairing)
    _add_declared(table_controls, set(present), targets, pairing, orphans)
    used = {c for cs in pairing.controls.values() for c in cs}
    orphans = [(n, why) for n, why in orphans if n not in used]  # a control two rows share
    if pairing.paired:
        pairing.loose = sorted(orphans, key=lambda t: PurePosixPath(t[0]).parts)
    else:  # named-like files are ordinary images; files a table names as controls stay out
        pairing.unused += [(n, why) for n, why in orphans if n in declared]
    return pairing


def _order_named(by_target: dict[str, list[tuple[int, str]]], pairing: Pairing) -> None:
    for target, entries in sorted(by_target.items()):
        entries.sort(key=lambda e: (e[0], PurePosixPath(e[1]).parts))
        used: dict[int, str] = {}
        for order, n in entries:
            if order in used:
                pairing.unused.append(
                    (
                        n,
                        f"{used[order]} is already {target}'s control image in this place; name "
                        f"further references NAME_control_1, NAME_control_2, ...",
                    )
                )
            else:
                used[order] = n
                pairing.controls.setdefault(target, []).append(n)


def _add_declared(
    table_controls: Mapping[str, Sequence[str]],
    present: set[str],
    targets: set[str],
    pairing: Pairing,
    orphans: list[tuple[str, str]],
) -> None:
    """The pairs metadata.jsonl rows name; controls of a target that is not there are orphans."""
    for target, controls in sorted(table_controls.items()):
        there = [c for c in controls if c in present]
        if target in targets:
            if there:
                pairing.controls[target] = list(there)
            if len(there) < len(controls):
                pairing.missing[target] = [c for c in controls if c not in present]
            continue
        what = "is a control image itself" if target in present else "is not in the dataset"
        for c in there:
            if all(c != n for n, _ in orphans):
                orphans.append(
                    (
                        c,
                        f"control image has no target image (metadata.jsonl names it for {target}, "
                        f"which {what}); it is not trained on",
                    )
                )


def no_control_reason(target: str) -> str:
    """Why a target of a paired set is skipped when it has no control image."""
    rel = PurePosixPath(target)
    return (
        f"has no control image: expected {rel.stem}_control{rel.suffix}, control/{rel.name} or a "
        f"metadata.jsonl row with control_file_name"
    )


def missing_control_reason(missing: Sequence[str]) -> str:
    """Why a pair is skipped when its metadata.jsonl row names control images that are not there."""
    return (
        f"pair skipped: metadata.jsonl names control image {', '.join(missing)}, which is not in the dataset"
    )


@dataclass(frozen=True)
class VideoRule:
    """What a video model takes from a clip (docs/video.md): ``frames``, the frame counts a sample may
    have (frame-count buckets: a clip takes the most it can fill), drawn at ``fps`` by ``sampling``
    (``train/clips.py`` says how each draws). Clips longer than ``max_seconds`` are skipped; an image
    is a one-frame sample. ``None`` in its place: an image model, which skips clips."""

    model: str
    frames: tuple[int, ...]
    fps: float
    sampling: str = "start"
    windows: int = 1  # "random": windows cached per clip (each epoch trains the next)
    max_seconds: float = DEFAULT_MAX_CLIP_SECONDS


def clip_for_image_model_reason(model: str) -> str:
    who = f"model {model!r}" if model else "this model"
    return f"a video clip, and {who} trains on still images (the video models: docs/video.md)"


@dataclass(frozen=True)
class PairRule:
    """What a model takes: ``max_controls`` control images a sample (0: a text-to-image model, which
    trains on single images), and whether it trains only on pairs (``required``: an edit model).
    ``PairRule()`` is a plain model: a dataset without pairs stages exactly as before."""

    model: str = ""  # the model id, for messages
    max_controls: int = 0
    required: bool = False
    control_min_side: int = 0  # the model's pipeline refuses control images smaller (0: no limit)
    control_max_aspect: float = 0.0  # ... or longer than this ratio of their sides (0: no limit)

    @classmethod
    def of(cls, model: str, info: Any) -> PairRule:
        """The rule of ``model`` from its registry entry (``train.families.ModelInfo``)."""
        return cls(
            model=model,
            max_controls=info.max_controls,
            required=info.controls_required,
            control_min_side=info.control_min_side,
            control_max_aspect=info.control_max_aspect,
        )

    @property
    def who(self) -> str:
        return f"model {self.model!r}" if self.model else "the model"


def unexpected_pairs_message(rule: PairRule, pairing: Pairing) -> str | None:
    """The error for a text-to-image model given a paired set, or None."""
    if rule.max_controls > 0 or not pairing.paired:
        return None
    few = [c for cs in [*pairing.controls.values(), *pairing.missing.values()] for c in cs][:_FEW]
    n = pairing.pair_count
    return (
        f"{rule.who} trains on single images (text-to-image), but the dataset holds {n} before/after "
        f"pair{'s' if n != 1 else ''} (control images: {', '.join(few)}{', ...' if n > _FEW else ''}). "
        f"Edit models take pairs (docs/edit.md): choose one (flux1-kontext-dev, qwen-image-edit, ...), "
        f"or remove the control images and their control_file_name fields"
    )


def missing_pairs_message(rule: PairRule, pairing: Pairing) -> str | None:
    """The error for an edit model given a set without pairs, or None."""
    if not rule.required or pairing.paired:
        return None
    more = (
        ", NAME_control_1.ext, NAME_control_2.ext ... for further references" if rule.max_controls > 1 else ""
    )
    return (
        f"{rule.who} is an edit model: it trains on before/after pairs, and the dataset holds none. "
        f"Name each control (before) image after its target NAME.ext in one of three ways: "
        f"NAME_control.ext beside it{more}; control/NAME.ext in a folder named control beside it; or "
        f"a metadata.jsonl row with file_name, control_file_name and text (docs/edit.md)"
    )


def check_pairs(rule: PairRule, pairing: Pairing) -> str | None:
    """The error for a dataset the model cannot train on (pairs for a plain model, none for an edit model)."""
    return unexpected_pairs_message(rule, pairing) or missing_pairs_message(rule, pairing)


def too_many_controls_reason(rule: PairRule, count: int) -> str | None:
    """Why a pair with ``count`` control images is skipped for ``rule``'s model, or None."""
    if count <= rule.max_controls:
        return None
    return f"has {count} control images; {rule.who} takes at most {rule.max_controls}"


def control_shape_reason(rule: PairRule, width: int, height: int) -> str | None:
    """Why a control image of ``width`` x ``height`` is refused by ``rule``'s model (its pipeline's
    own limits: a run would fail when it renders with it), or None."""
    if rule.control_min_side and min(width, height) < rule.control_min_side:
        return f"is {width}x{height}; {rule.who} takes control images of at least {rule.control_min_side} px a side"
    if rule.control_max_aspect and max(width, height) > rule.control_max_aspect * min(width, height):
        return f"is {width}x{height}; {rule.who} takes control images up to {rule.control_max_aspect:g}:1"
    return None


# --------------------------------------------------------------------------------------------
# the dataset hash


class DatasetHash:
    """SHA-256 over what is trained on: each image's name, its file's bytes and its final caption,
    and its control images' names and bytes."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()

    def add(self, name: str, path: Path, caption: str) -> None:
        with open(path, "rb") as f:
            file_digest = hashlib.file_digest(f, "sha256").digest()  # streamed: images can be large
        self._digest.update(name.encode() + b"\0" + file_digest + caption.encode() + b"\0")

    def add_control(self, name: str, path: Path) -> None:
        """A control image of the target added last (a plain dataset never calls this: same hash)."""
        with open(path, "rb") as f:
            file_digest = hashlib.file_digest(f, "sha256").digest()
        self._digest.update(b"control\0" + name.encode() + b"\0" + file_digest)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()
