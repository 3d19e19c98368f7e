"""Pack a dataset folder into the canonical zip the trainer reads best, under the upload limit.

``pack_dataset(folder, out)`` writes a deterministic zip (same input, byte-identical archive)
holding what the container's staging (``train/data.py``) uses and nothing else:

- images (``IMAGE_EXTENSIONS``), and for a video model clips (``CLIP_EXTENSIONS``), with their
  same-stem ``.txt`` captions, plus ``metadata.jsonl``
  and ``captions.csv`` tables, at their relative paths; entries sorted, timestamps fixed at
  1980-01-01, permissions 0644, no extra fields; JPEG / PNG / WebP stored, the rest deflated
  at level 9;
- junk (``__MACOSX/``, ``._*``, ``.DS_Store``, ``Thumbs.db``, hidden files), unrelated files,
  symbolic links (never followed), unreadable and too-small images are left out, each
  listed in the result with the reason;
- before/after pairs for edit models (``NAME_control.ext``, ``control/NAME.ext``,
  ``NAME_control_1.ext``..., metadata.jsonl ``control_file_name``; docs/edit.md) are packed
  whole: when a target is left out its controls are too (and the reverse), each named; in a
  paired set a target without a control is left out, as the trainer would skip it; controls
  without a target are packed (validation renders on them) and named. Given the ``model``, a
  pair set for a text-to-image model or a set without pairs for an edit model is refused, and a
  pair with more controls than the model takes is left out.

What the container would refuse is refused here first, naming the file: a caption file or
caption table over its size cap, more files than the trainer accepts, an image over the pixel
cap, an entry that deflates beyond the compression-ratio bound (a flat-colour BMP or TIFF:
``fit`` re-encodes such images as JPEG). The rules are the container's own, imported from
``train/dataset_rules.py`` (standard library only).

Files are streamed into the archive in chunks (constant memory). The archive's size is
computed before anything is written (exactly: headers plus stored or deflated data), and a
set over ``limit_bytes`` (Replicate's upload limit, 100 MiB) is refused with the largest
files named, or, with ``fit=True``, reduced: images are re-encoded as JPEG (quality 90),
largest first, downscaled to a shorter side of ``min_side`` (the largest training
resolution) and never below it or upscaled, until the archive fits (control images as
targets; a caption table's ``file_name`` and ``control_file_name`` follow the new names).
Clips (video models, docs/video.md) are probed as the trainer probes them (``train/clips.py``): one
the trainer would skip is left out with its reason, one it would refuse is refused. ``fit``
re-encodes clips as H.264 (PyAV), largest first: at a lower quality, then with the shorter side
brought to ``min_side``, then at lower qualities still, from the original each time (frame times,
rotation and captions kept; a ``.mov`` / ``.webm`` / ``.mkv`` becomes ``.mp4``).
Re-encoded files live in a temporary folder; the input folder is never modified.

Torch-free and numpy-free: this runs on laptops.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image, UnidentifiedImageError

from train import clips as cliplib
from train import dataset_rules as rules
from train.dataset_rules import (  # noqa: F401 - IMAGE_EXTENSIONS is re-exported for callers
    DEFAULT_MAX_FILES,
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGE_EXTENSIONS,
    MIN_IMAGE_SIDE,
)
from train.inventory import LINK, Inventory, open_rgb, scan_folder, shown_size
from train.weights import file_sha256  # stdlib-only module: keeps the client torch- and numpy-free

MAX_IMAGE_PIXELS = DEFAULT_MAX_IMAGE_PIXELS  # the container refuses the whole set over it
UPLOAD_LIMIT = 100 * 2**20  # Replicate's upload limit for a file input
DEFAULT_MIN_SIDE = 1024  # the spec's default resolution, when fit is asked without min_side
JPEG_QUALITY = 90
# already compressed: deflate gains nothing
_STORED_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", *rules.CLIP_EXTENSIONS}
# ``fit``'s passes over clips, as (x264 crf, bring the shorter side to min_side): the first keeps the
# size, the later ones trade quality; each re-encodes from the original
CLIP_PASSES = ((28, False), (28, True), (34, True), (40, True))
_JPEG_EXTENSIONS = {".jpg", ".jpeg"}
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_FILE_MODE = (stat.S_IFREG | 0o644) << 16
_CHUNK = 1 << 20
_LOCAL_HEADER, _CENTRAL_HEADER, _END_RECORD = 30, 46, 22
_REENCODE_MIN_SAVING = 0.9  # a same-size re-encode is kept only when it saves at least 10 %


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
    images: int  # images (and clips) in the archive that are trained on (a pair's target; not its controls)
    captions: int  # of those, how many have a caption (txt, metadata.jsonl or captions.csv)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    changed: list[PackChange] = field(default_factory=list)
    caption_sources: dict[str, int] = field(
        default_factory=dict
    )  # txt / metadata.jsonl / captions.csv / none
    warnings: list[str] = field(default_factory=list)  # packed, but probably not what was meant
    limit_bytes: int = UPLOAD_LIMIT
    pairs: int = 0  # targets packed with their control images
    controls: int = 0  # control images in the archive (of pairs, and without a target)
    loose_controls: int = 0  # of those, how many have no target (validation renders on them)
    clips: int = 0  # of ``images``, how many are video clips
    masks: int = 0  # loss masks in the archive (NAME_mask.ext or metadata.jsonl's mask_file_name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (for ``--json`` output)."""
        return {
            "archive": str(self.archive),
            "bytes": self.size_bytes,
            "sha256": self.sha256,
            "images": self.images,
            "captions": self.captions,
            "caption_sources": dict(self.caption_sources),
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "changed": [
                {
                    "path": c.path,
                    "new_path": c.new_path,
                    "old_bytes": c.old_bytes,
                    "new_bytes": c.new_bytes,
                    "old_dimensions": list(c.old_dimensions),
                    "new_dimensions": list(c.new_dimensions),
                }
                for c in self.changed
            ],
            "warnings": list(self.warnings),
            "limit_bytes": self.limit_bytes,
            "pairs": self.pairs,
            "controls": self.controls,
            "loose_controls": self.loose_controls,
            "clips": self.clips,
            "masks": self.masks,
        }

    def summary(self) -> str:
        stills = self.images - self.clips
        what = f"{stills} image{'s' if stills != 1 else ''}"
        if self.clips:
            what += f" and {self.clips} clip{'s' if self.clips != 1 else ''}"
        lines = [
            f"packed {what} "
            f"({self.captions} with captions) into {self.archive.name}: "
            f"{_human(self.size_bytes)} of the {_human(self.limit_bytes)} limit, sha256 {self.sha256[:16]}"
        ]
        if self.controls:
            loose = self.loose_controls
            lines.append(
                f"pairs: {self.pairs} (with {self.controls - loose} control images)"
                + (
                    f"; {loose} control image{'s' if loose != 1 else ''} without a target, packed for "
                    f"validation renders, never trained on"
                    if loose
                    else ""
                )
            )
        if self.masks:
            lines.append(f"loss masks: {self.masks} (the trainer learns only their white parts)")
        sources = ", ".join(f"{k} {v}" for k, v in sorted(self.caption_sources.items()) if v and k != "none")
        if sources:
            lines.append(f"captions from: {sources}")
        if self.caption_sources.get("none"):
            lines.append(
                f"{self.caption_sources['none']} image(s) without a caption: the trainer gives them "
                f"the default caption and trigger word"
            )
        if self.changed:
            saved = sum(c.old_bytes - c.new_bytes for c in self.changed)
            lines.append(
                f"re-encoded {len(self.changed)} file{'s' if len(self.changed) != 1 else ''} "
                f"to fit (saved {_human(saved)}):"
            )
            for c in self.changed:
                name = c.path if c.new_path == c.path else f"{c.path} -> {c.new_path}"
                lines.append(
                    f"  {name}: {_human(c.old_bytes)} -> {_human(c.new_bytes)}, "
                    f"{c.old_dimensions[0]}x{c.old_dimensions[1]} -> "
                    f"{c.new_dimensions[0]}x{c.new_dimensions[1]}"
                )
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
    width: int  # after EXIF rotation (a clip's: as shown)
    height: int
    clip: cliplib.ClipInfo | None = None  # a video clip's frames and timing


@dataclass
class _Entry:
    arcname: str
    source: Path
    size: int
    compress: int
    packed: int  # bytes of data in the zip (stored: size; deflated: computed)

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


# --------------------------------------------------------------------------------------------
# caption tables (parsed by the container's own rules, train/dataset_rules.py)


@dataclass
class _Table:
    rel: PurePosixPath
    path: Path
    kind: str  # metadata.jsonl | captions.csv
    names: dict[str, str] = field(default_factory=dict)  # image key (relative path) -> caption text

    @property
    def base(self) -> PurePosixPath:
        return self.rel.parent


def _rewrite_table(table: _Table, renames: dict[str, str], dest: Path) -> bool:
    """Write ``table`` with image names renamed (old relative path -> new) to ``dest``; False: unchanged."""
    text = table.path.read_text(encoding="utf-8-sig", errors="replace")
    changed = False
    if table.kind == "metadata.jsonl":
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        for i, line in enumerate(lines):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "file_name" in row and _rename_row(row, table.base, renames):
                lines[i] = json.dumps(row, ensure_ascii=False)
                changed = True
        out = "\n".join(lines)
    else:
        rows = list(csv.reader(io.StringIO(text.replace("\r\n", "\n"))))
        name_col, _ = rules.csv_columns(rows[0] if rows else [])
        if name_col is None:
            return False
        for row in rows[1:]:
            if name_col < len(row):
                name = row[name_col].strip()
                if name and rules.table_key(table.base, name) in renames:
                    row[name_col] = _renamed_field(name, table.base, renames)
                    changed = True
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        out = buf.getvalue()
    if changed:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(out, encoding="utf-8", newline="")
    return changed


def _rename_row(row: dict, base: PurePosixPath, renames: dict[str, str]) -> bool:
    """A metadata.jsonl row's ``file_name``, ``control_file_name`` and ``mask_file_name`` renamed in
    place; False: unchanged."""
    changed = False

    def renamed(name: Any) -> Any:
        nonlocal changed
        if isinstance(name, str) and rules.table_key(base, name) in renames:
            changed = True
            return _renamed_field(name, base, renames)
        return name

    row["file_name"] = renamed(row["file_name"])
    if "mask_file_name" in row:
        row["mask_file_name"] = renamed(row["mask_file_name"])
    controls = row.get("control_file_name")
    if isinstance(controls, list):
        row["control_file_name"] = [renamed(c) for c in controls]
    elif controls is not None:
        row["control_file_name"] = renamed(controls)
    return changed


def _renamed_field(name: str, base: PurePosixPath, renames: dict[str, str]) -> str:
    """The table's file name for the renamed image, written as the user wrote it (folders, separators)."""
    new = renames[rules.table_key(base, name)]
    old_suffix, new_suffix = PurePosixPath(name.replace("\\", "/")).suffix, PurePosixPath(new).suffix
    return name[: len(name) - len(old_suffix)] + new_suffix


# --------------------------------------------------------------------------------------------
# re-encoding (fit)


def _target_size(
    width: int, height: int, min_side: int, max_pixels: int, downscale: bool, name: str
) -> tuple[int, int]:
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
            raise PackError(
                f"{name}: {width}x{height} cannot be brought under the trainer's cap of "
                f"{max_pixels} pixels without its shorter side going below {min(min_side, short)} px; "
                f"crop it or remove it"
            )
    return new_w, new_h


def _reencode(image: _Image, dest: Path, min_side: int, max_pixels: int, downscale: bool) -> tuple[int, int]:
    """Write ``image`` as JPEG to ``dest``, EXIF rotation applied; returns its new (width, height)."""
    name = image.rel.as_posix()
    target = _target_size(image.width, image.height, min_side, max_pixels, downscale, name)
    try:
        with Image.open(image.path) as src:
            icc = src.info.get("icc_profile") if src.mode in ("RGB", "RGBA") else None
        # JPEG: decoded at 1/2, 1/4 or 1/8 scale when that still covers the target (less memory)
        draft = target if target != (image.width, image.height) else None
        img = open_rgb(image.path, max(max_pixels, image.width * image.height), draft)
    except Image.DecompressionBombError as exc:
        raise PackError(f"{name}: too large for Pillow to open safely ({exc}); resize it yourself") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise PackError(
            f"{name}: cannot be read as an image to re-encode it ({type(exc).__name__}: {exc}); "
            f"fix or remove the file"
        ) from None
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
                if hasattr(info, "compress_level"):  # Python 3.13+
                    info.compress_level = 9
                else:
                    # the per-entry level before 3.13
                    info._compresslevel = 9  # noqa: SLF001  # pyright: ignore[reportAttributeAccessIssue]
            info.create_system = 3  # the same bytes on every OS
            info.external_attr = _FILE_MODE
            info.file_size = e.size
            with open(e.source, "rb") as src, zf.open(info, "w") as dst:
                while chunk := src.read(_CHUNK):
                    dst.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, total)


def _too_large(
    size: int, limit: int, entries: list[_Entry], fitted: bool, min_side: int | None
) -> PackTooLarge:
    largest = sorted(((e.arcname, e.size) for e in entries), key=lambda t: (-t[1], t[0]))[:5]
    listing = "; ".join(f"{n} ({_human(s)})" for n, s in largest)
    over = (
        f"Replicate's upload limit of 100 MiB ({limit:,} bytes)"
        if limit == UPLOAD_LIMIT
        else f"the limit of {_human(limit)} ({limit:,} bytes; Replicate's upload limit is 100 MiB)"
    )
    head = f"the dataset archive would be {_human(size)} ({size:,} bytes), over {over}"
    if fitted:
        msg = (
            f"{head} even with every image re-encoded as JPEG (quality {JPEG_QUALITY}) and downscaled to a "
            f"shorter side of {min_side} px: it cannot fit without going below min_side ({min_side} px, the "
            f"largest training resolution). Largest files after reduction: {listing}. Remove images, or "
            f"train at a smaller resolution."
        )
    else:
        msg = (
            f"{head}. Largest files: {listing}. Pack with --fit to re-encode and downscale images (never "
            f"below the largest training resolution), or remove images."
        )
    return PackTooLarge(msg, size, limit, largest)


# --------------------------------------------------------------------------------------------
# the packer


def pack_dataset(
    folder: Path,
    out: Path,
    *,
    limit_bytes: int = UPLOAD_LIMIT,
    fit: bool = False,
    min_side: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    max_files: int = DEFAULT_MAX_FILES,
    inspect_only: dict | None = None,
    model: str | None = None,
    video: rules.VideoRule | None = None,
) -> PackResult:
    """Pack ``folder`` into the zip ``out``; see the module docstring.

    ``min_side``: the shortest side ``fit`` may reduce an image to (pass ``largest_training_side(spec)``;
    default 1024, the spec's default resolution). ``progress(done, total)``: bytes of file data
    written so far and in all. ``max_image_pixels`` and ``max_files``: the trainer's limits (the
    spec's ``dataset.max_image_pixels`` and ``dataset.max_files``); an image over the pixel cap is
    refused, or downscaled under ``fit``. ``model``: the spec's model id; with it the packer refuses
    what that model cannot train on (pairs for a text-to-image model, none for an edit model) and
    leaves out pairs with more control images than it takes. ``video``: a video model's clip rule
    (``TrainingSpec.video_rule()``; default: the model's defaults); an image model leaves clips out,
    and without a ``model`` clips are only probed. Raises ``PackTooLarge`` (before writing anything)
    or ``PackError``.
    """
    folder, out = Path(folder), Path(out)
    min_side = _check_arguments(folder, out, min_side)
    rule = _pair_rule(model)
    clip_rule = _clip_rule(model, video)
    scan = _scan(folder, max_files)
    _probe_images(scan, max_image_pixels, clip_rule)
    _pair_up(scan, rule)
    _mask_up(scan)
    _leave_out_orphan_captions(scan)
    _refuse_what_the_trainer_refuses(folder, scan, fit, max_image_pixels, max_files)
    caption_sources, problems = _caption_summary(scan)

    with tempfile.TemporaryDirectory(prefix="advanced-trainer-pack-") as tmp_name:
        layout = _Layout.plan(scan, Path(tmp_name))
        must = scan.over_cap + [k for k in _too_compressible(layout, fit) if k not in scan.over_cap]
        size = layout.size()
        if inspect_only is not None:  # report what the archive would be, write nothing
            largest = sorted(((e.arcname, e.footprint) for e in layout.entries()), key=lambda t: -t[1])[:5]
            inspect_only.update(
                bytes=size,
                images=len(scan.trained()),
                pairs=scan.pairs,
                skipped=len(scan.skipped),
                largest=[{"path": n, "bytes": b} for n, b in largest],
            )
            return None  # type: ignore[return-value]
        changed: list[PackChange] = []
        if size > limit_bytes and not fit:
            raise _too_large(size, limit_bytes, layout.entries(), False, min_side)
        if size > limit_bytes or must:
            _fit(scan.images, layout, must, changed, limit_bytes, min_side, max_image_pixels)
        written, digest = _write_archive(
            layout.entries(), out, limit_bytes, progress, bool(changed), min_side
        )

    changed.sort(key=lambda c: _sort_key(c.path))
    return PackResult(
        archive=out,
        size_bytes=written,
        sha256=digest,
        images=len(scan.trained()),
        captions=len(scan.trained()) - caption_sources["none"],
        skipped=scan.skipped,
        changed=changed,
        caption_sources=caption_sources,
        warnings=problems,
        limit_bytes=limit_bytes,
        pairs=scan.pairs,
        controls=len(scan.controls),
        loose_controls=len(scan.loose),
        clips=sum(1 for img in scan.trained().values() if img.clip is not None),
        masks=len(scan.masks),
    )


# what _probe_images does with clips: the model's rule, "image model" (leave them out), or None (a
# set packed without a model: clips are only probed)
_IMAGE_MODEL = "image model"


def _clip_rule(model: str | None, video: rules.VideoRule | None) -> rules.VideoRule | str | None:
    if video is not None or not model:
        return video
    from train.families import model_info
    from train.spec import parse_spec

    if not model_info(model).video:
        return _IMAGE_MODEL
    return parse_spec({"model": model}).video_rule()


def _pair_rule(model: str | None) -> rules.PairRule | None:
    """What ``model`` takes (``train/families.py``, torch-free), or None when the model is not known."""
    if not model:
        return None
    from train.families import model_info

    try:
        info = model_info(model)
    except KeyError as exc:
        raise PackError(str(exc.args[0])) from None
    return rules.PairRule.of(model, info)


def inspect_folder(folder: Path) -> dict:
    """The size the packed archive would have (exact), its image count and largest entries — nothing written."""
    info: dict = {}
    with tempfile.TemporaryDirectory(prefix="advanced-trainer-inspect-") as tmp:
        pack_dataset(folder, Path(tmp) / "dataset.zip", inspect_only=info)
    return info


def _check_arguments(folder: Path, out: Path, min_side: int | None) -> int:
    """``min_side`` resolved; PackError for a missing folder or an output path inside it."""
    if not folder.exists():
        raise PackError(f"dataset folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise PackError(f"{str(folder)!r} is not a folder (pack a folder of images and captions)")
    if out.is_dir():
        raise PackError(f"{str(out)!r} is a folder; give the path of the zip to write")
    if out.resolve().is_relative_to(folder.resolve()):
        raise PackError(
            f"{str(out)!r} is inside the dataset folder; write the archive somewhere else "
            f"(the dataset folder is never modified)"
        )
    if min_side is None:
        min_side = DEFAULT_MIN_SIDE
    if min_side < MIN_IMAGE_SIDE:
        raise ValueError(f"min_side must be at least {MIN_IMAGE_SIDE}, got {min_side}")
    return min_side


@dataclass
class _Scan:
    """A dataset folder sorted by role, as the trainer sorts it (``train.inventory``), with what the
    packer learns from the images' headers; keys are ``dataset_rules.image_key``."""

    inventory: Inventory
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (shown path, reason)
    txts: dict[str, tuple[PurePosixPath, Path]] = field(default_factory=dict)
    tables: list[_Table] = field(default_factory=list)
    images: dict[str, _Image] = field(default_factory=dict)  # the images that can be used
    over_cap: list[str] = field(default_factory=list)  # images over the trainer's pixel cap
    unusable: set[str] = field(default_factory=set)  # images that cannot be read, or are too small
    problems: list[str] = field(default_factory=list)  # caption table rows the trainer ignores
    controls: set[str] = field(default_factory=set)  # keys of the images that are control images
    loose: set[str] = field(default_factory=set)  # of those, the controls without a target
    pairs: int = 0  # targets packed with their controls
    masks: set[str] = field(default_factory=set)  # keys of the images that are loss masks

    def trained(self) -> dict[str, _Image]:
        """The images the trainer trains on: every image but the control images and the loss masks."""
        return {k: img for k, img in self.images.items() if k not in self.controls and k not in self.masks}


def _scan(folder: Path, max_files: int) -> _Scan:
    inv = scan_folder(folder, max_files)
    scan = _Scan(inv, skipped=[*inv.junk, *((name, LINK) for name in inv.links), *inv.skipped])
    for key, file in inv.captions.items():
        assert file.path is not None
        scan.txts[key] = (PurePosixPath(file.name), file.path)
    for file, table in inv.tables:
        assert file.path is not None
        rel = PurePosixPath(file.name)
        scan.tables.append(_Table(rel, file.path, rel.name, table.captions))
    for table, line, why in inv.table_problems:
        where, what = (f"{table}:{line}", "row") if line else (table, "file")
        scan.problems.append(f"{where}: {why}; the trainer ignores this {what}")
    return scan


def _probe_images(
    scan: _Scan, max_image_pixels: int, clip_rule: rules.VideoRule | str | None, max_clip_frames: int = 0
) -> None:
    """Fill ``scan.images`` with the images whose headers can be read and the clips the trainer would
    use, leaving the rest out with a reason."""
    for key, file in scan.inventory.images.items():
        rel, path, shown = PurePosixPath(file.name), file.path, file.name
        assert path is not None
        if rules.is_clip(shown):
            _probe_clip(scan, key, rel, path, file.size, max_image_pixels, clip_rule, max_clip_frames)
            continue
        try:
            width, height = shown_size(path)
        except Image.DecompressionBombError:
            scan.skipped.append((shown, "too large for Pillow to open safely; the trainer refuses it too"))
            scan.unusable.add(shown)
            continue
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            scan.skipped.append((shown, f"cannot be read as an image ({type(exc).__name__}: {exc})"[:300]))
            scan.unusable.add(shown)
            continue
        if min(width, height) < MIN_IMAGE_SIDE:
            scan.skipped.append((shown, f"too small ({width}x{height}; at least {MIN_IMAGE_SIDE} px a side)"))
            scan.unusable.add(shown)
            continue
        scan.images[key] = _Image(rel, path, file.size, width, height)
        if width * height > max_image_pixels:
            scan.over_cap.append(key)


def _probe_clip(
    scan: _Scan,
    key: str,
    rel: PurePosixPath,
    path: Path,
    size: int,
    max_image_pixels: int,
    clip_rule: rules.VideoRule | str | None,
    max_clip_frames: int,
) -> None:
    shown = rel.as_posix()
    if clip_rule == _IMAGE_MODEL:
        scan.skipped.append((shown, rules.clip_for_image_model_reason("")))
        scan.unusable.add(shown)
        return
    try:
        info = cliplib.probe(path, max_image_pixels, max_clip_frames or rules.DEFAULT_MAX_CLIP_FRAMES)
    except cliplib.ClipRefused as exc:
        raise PackError(f"{exc}; the trainer would refuse the whole dataset. Remove it, or cut it") from None
    except cliplib.ClipError as exc:
        scan.skipped.append((shown, str(exc)))
        scan.unusable.add(shown)
        return
    if isinstance(clip_rule, rules.VideoRule):
        frames, why = cliplib.sample_frames_or_reason(info, clip_rule)
        if frames is None:
            scan.skipped.append((shown, why))
            scan.unusable.add(shown)
            return
    scan.images[key] = _Image(rel, path, size, info.width, info.height, info)


def _pair_up(scan: _Scan, rule: rules.PairRule | None) -> None:
    """Pairs kept whole, as the trainer pairs them (the inventory's pairing): what it would skip of
    a paired set is left out, named; a pair with a file left out is left out whole."""
    pairing = scan.inventory.pairing
    problem = rules.check_pairs(rule, pairing) if rule is not None else None
    if problem:
        raise PackError(problem)
    by_name = {img.rel.as_posix(): key for key, img in scan.images.items()}
    for name, _ in pairing.unused:  # named in the inventory's skipped already
        scan.images.pop(by_name.get(name, ""), None)

    def leave_out(name: str, why: str) -> None:
        key = by_name.get(name)
        if key in scan.images:
            del scan.images[key]
            scan.skipped.append((name, why))

    if not pairing.paired:
        return
    controls = pairing.control_names()
    targets = [n for n in scan.inventory.names() if n not in controls]
    sizes = {img.rel.as_posix(): (img.width, img.height) for img in scan.images.values()}
    failed = {n: why for n in targets if (why := _pair_problem(n, pairing, rule, scan.unusable, sizes))}
    kept = {c for n in targets if n not in failed for c in pairing.controls.get(n, [])}
    for name, why in failed.items():
        leave_out(name, why)
        for c in pairing.controls.get(name, []):
            if c not in kept:
                leave_out(c, f"control image of {name}: its pair was left out ({name} {why})")
    for name, why in pairing.loose:
        if name in by_name:
            scan.problems.append(f"{name}: {why}; packed for validation renders")
    scan.controls = {by_name[c] for c in controls if by_name.get(c) in scan.images}
    scan.loose = {by_name[n] for n, _ in pairing.loose if by_name.get(n) in scan.images}
    scan.pairs = sum(1 for n in targets if n not in failed and n in by_name)
    scan.over_cap = [k for k in scan.over_cap if k in scan.images]


def _mask_up(scan: _Scan) -> None:
    """Loss masks kept with their images, as the trainer matches them (the inventory's masks): a mask
    whose image is left out goes too, and an image whose mask cannot be read, or has another shape,
    is left out with it (the trainer would skip the image), each named."""
    inv = scan.inventory
    by_name = {img.rel.as_posix(): key for key, img in scan.images.items()}
    for name in inv.masks_left_out:  # named in the inventory's skipped already
        scan.images.pop(by_name.get(name, ""), None)
    for target, mask in inv.masks.items():
        t, m = scan.images.get(by_name.get(target, "")), scan.images.get(by_name.get(mask, ""))
        why = ""
        if t is None:
            why = f"loss mask of {target}, which is left out"
        elif rules.is_clip(target):
            why = f"loss masks apply to images; the clip {target} trains unmasked"
        elif m is None:
            why = f"its loss mask {mask} cannot be read"
        elif abs(m.width / m.height - t.width / t.height) > 0.01 * t.width / t.height:
            why = f"its loss mask {mask} is {m.width}x{m.height} and the image {t.width}x{t.height}: a mask must have the image's shape"
        if not why:
            scan.masks.add(by_name[mask])
            continue
        for name in (mask,) if t is None or rules.is_clip(target) else (target, mask):
            key = by_name.get(name)
            if key in scan.images:
                del scan.images[key]
                scan.skipped.append(
                    (
                        name,
                        why
                        if name == target or t is None or rules.is_clip(target)
                        else f"loss mask of {target}, which is left out ({why})",
                    )
                )
    scan.over_cap = [k for k in scan.over_cap if k in scan.images]


def _pair_problem(
    target: str,
    pairing: rules.Pairing,
    rule: rules.PairRule | None,
    unusable: set[str],
    sizes: dict[str, tuple[int, int]],
) -> str | None:
    """Why the trainer would skip ``target``'s pair (the same reasons, in the same order), or None."""
    if target in unusable:
        return "cannot be used (see its entry)"
    if target in pairing.missing:
        return rules.missing_control_reason(pairing.missing[target])
    controls = pairing.controls.get(target, [])
    if not controls:
        return rules.no_control_reason(target)
    too_many = rules.too_many_controls_reason(rule, len(controls)) if rule is not None else None
    if too_many:
        return too_many
    bad = [c for c in controls if c in unusable]
    if bad:
        return f"pair left out: its control image {bad[0]} cannot be used"
    for c in controls:  # the model's pipeline's own limits (Flux.2: 64 px a side, 8:1)
        shape = rules.control_shape_reason(rule, *sizes[c]) if rule is not None and c in sizes else None
        if shape:
            return f"pair left out: its control image {c} {shape}"
    return None


def _leave_out_orphan_captions(scan: _Scan) -> None:
    """Captions whose image was left out (captions without any image are the inventory's to name)."""
    for key, (rel, _) in sorted(scan.txts.items()):
        if key not in scan.images:
            del scan.txts[key]
            scan.skipped.append((rel.as_posix(), "its image was left out"))
    scan.skipped.sort(key=lambda t: _sort_key(t[0].rstrip("/")))


def _refuse_what_the_trainer_refuses(
    folder: Path, scan: _Scan, fit: bool, max_image_pixels: int, max_files: int
) -> None:
    """PackError, naming the file, for a set the container would refuse (or find empty)."""
    if not scan.trained():
        reasons = "; ".join(f"{n}: {r}" for n, r in scan.skipped[:10]) or "the folder holds no files"
        raise PackError(f"no usable image in {str(folder)!r} ({reasons})")
    if scan.over_cap and not fit:
        img = scan.images[scan.over_cap[0]]
        raise PackError(
            f"{img.rel.as_posix()}: {img.width}x{img.height} is over the trainer's cap of "
            f"{max_image_pixels} pixels an image (the whole dataset would be refused); "
            f"pack with --fit to downscale it, or resize it"
        )
    captions = [(rules.CAPTION, rel, path) for key, (rel, path) in scan.txts.items() if key in scan.images]
    for kind, rel, path in [*captions, *((rules.TABLE, t.rel, t.path) for t in scan.tables)]:
        why = rules.oversize_reason(kind, path.stat().st_size, max_files)
        if why:
            raise PackError(
                f"{rel.as_posix()}: {why}; the trainer would refuse the whole dataset. "
                f"Shorten it, or remove it"
            )
    files = len(scan.images) + len(captions) + len(scan.tables)
    if files > max_files:
        raise PackError(
            f"{str(folder)!r}: the archive would hold {files} files, more than the trainer's "
            f"limit of {max_files} (dataset.max_files); remove images or raise the limit"
        )


def _caption_summary(scan: _Scan) -> tuple[dict[str, int], list[str]]:
    """How many images get each caption source (in the trainer's order), and table problems to warn about."""
    problems = list(scan.problems)
    merged = {
        kind: {n: text for t in scan.tables if t.kind == kind for n, text in t.names.items()}
        for kind in rules.CAPTION_FILES
    }
    sources = {"txt": 0, "metadata.jsonl": 0, "captions.csv": 0, "none": 0}
    for key, img in scan.trained().items():
        name = img.rel.as_posix()
        source = rules.caption_source(key in scan.txts, name, merged)
        if source == "default" or (source in merged and not merged[source][name]):
            source = "none"  # no caption, or an empty one in a table: the default caption and trigger word
        sources[source] += 1
    inv = scan.inventory  # every image file, used or not: those left out are named already
    known = set(inv.names()) | {
        n for n, _ in inv.skipped if rules.classify(PurePosixPath(n))[0] in (rules.IMAGE, rules.CLIP)
    }
    for table in scan.tables:
        orphans = sorted(n for n in table.names if n not in known)
        if orphans:
            problems.append(
                f"{table.rel}: {len(orphans)} row(s) name no image in the dataset "
                f"(first: {orphans[0]!r}); names are relative to the table's folder"
            )
    return sources, problems


@dataclass
class _Layout:
    """The archive being planned: its entries, and the renames re-encoding made (the tables follow them)."""

    tables: list[_Table]
    tmp: Path  # re-encoded images and rewritten tables
    images: dict[str, _Entry]  # image key -> entry
    captions: list[_Entry]
    renames: dict[str, str] = field(default_factory=dict)  # old image path -> new (a .png became .jpg)
    table_entries: list[_Entry] = field(default_factory=list)

    @classmethod
    def plan(cls, scan: _Scan, tmp: Path) -> _Layout:
        images = {key: _entry(img.rel.as_posix(), img.path) for key, img in scan.images.items()}
        captions = [
            _entry(rel.as_posix(), path) for key, (rel, path) in scan.txts.items() if key in scan.images
        ]
        layout = cls(scan.tables, tmp, images, captions)
        layout.render_tables()
        return layout

    def render_tables(self) -> None:
        """The caption tables' entries, rewritten under ``tmp`` where an image they name was renamed."""
        self.table_entries = []
        for i, t in enumerate(self.tables):
            dest = self.tmp / "tables" / str(i) / t.rel.name
            source = dest if self.renames and _rewrite_table(t, self.renames, dest) else t.path
            self.table_entries.append(_entry(t.rel.as_posix(), source))

    def entries(self) -> list[_Entry]:
        return sorted(
            [*self.images.values(), *self.captions, *self.table_entries], key=lambda e: _sort_key(e.arcname)
        )

    def size(self) -> int:
        return _archive_size(self.entries())


def _too_compressible(layout: _Layout, fit: bool) -> list[str]:
    """Images that deflate past the trainer's compression-ratio bound (``fit`` re-encodes them as JPEG).

    The trainer refuses such an entry as a decompression bomb, so without ``fit`` they, and any
    other entry over the bound, are refused here, named.
    """
    keys = [key for key, e in layout.images.items() if rules.ratio_reason(e.size, e.packed)]
    others = [e for e in [*layout.captions, *layout.table_entries] if rules.ratio_reason(e.size, e.packed)]
    if others or (keys and not fit):
        e = others[0] if others else layout.images[keys[0]]
        hint = "" if others else "; pack with --fit to re-encode it as JPEG, or save it as PNG"
        raise PackError(
            f"{e.arcname}: deflates from {e.size} to {e.packed} bytes, over the trainer's limit "
            f"of {rules.MAX_COMPRESSION_RATIO}x (it would refuse the whole dataset as a "
            f"decompression bomb){hint}"
        )
    return keys


def _write_archive(
    entries: list[_Entry],
    out: Path,
    limit: int,
    progress: Callable[[int, int], None] | None,
    fitted: bool,
    min_side: int,
) -> tuple[int, str]:
    """Write the zip next to ``out`` and move it into place; returns (bytes, sha256)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    try:
        _write_zip(entries, partial, progress)
        written = partial.stat().st_size
        if written > limit:  # the computed size is exact; this guards against files changing meanwhile
            raise _too_large(written, limit, entries, fitted, min_side)
        digest = file_sha256(partial)
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return written, digest


# one step of ``fit``: (image key, downscale, required, x264 crf for a clip or None for an image)
_Step = tuple[str, bool, bool, "int | None"]


def _fit_plan(images: dict[str, _Image], required: list[str], min_side: int) -> list[_Step]:
    """The order ``fit`` tries: 1. required images; clips at a lower quality; 2. images larger than
    ``min_side``, downscaled to it; clips brought to ``min_side``; 3. the other images re-encoded at
    their size (kept only when that saves at least 10 %); clips at lower qualities still."""
    stills = {k: img for k, img in images.items() if img.clip is None}
    clips = {k: img for k, img in images.items() if img.clip is not None}
    by_size = sorted(stills, key=lambda k: (-stills[k].size, stills[k].rel.parts))
    clips_by_size = sorted(clips, key=lambda k: (-clips[k].size, clips[k].rel.parts))

    def clip_pass(i: int) -> list[_Step]:
        crf, downscale = CLIP_PASSES[i]
        return [(k, downscale, False, crf) for k in clips_by_size]

    def large(k: str) -> bool:
        return min(stills[k].width, stills[k].height) > min_side

    return (
        [(k, True, True, None) for k in by_size if k in required]
        + clip_pass(0)
        + [(k, True, False, None) for k in by_size if k not in required and large(k)]
        + clip_pass(1)
        + [(k, False, False, None) for k in by_size if k not in required and not large(k)]
        + [step for i in range(2, len(CLIP_PASSES)) for step in clip_pass(i)]
    )


def _fit(
    images: dict[str, _Image],
    layout: _Layout,
    required: list[str],
    changed: list[PackChange],
    limit: int,
    min_side: int,
    max_pixels: int,
) -> int:
    """Re-encode images and clips, largest first (``_fit_plan``), until the archive fits; returns its
    exact size. ``required``: images that must be re-encoded whatever the size (over the pixel cap,
    or over the compression-ratio bound)."""
    done: set[str] = set()
    originals: dict[str, _Entry] = {}  # a clip's entry before its first re-encode
    size = layout.size()
    for key, downscale, must, crf in _fit_plan(images, required, min_side):
        if size <= limit and not must:
            layout.render_tables()  # renames change the tables; the loop goes on if they tip it over
            size = layout.size()
            if size <= limit:
                return size
        if key in done:
            continue
        img, old = images[key], layout.images[key]
        step = _fit_step(img, old, layout, min_side, max_pixels, downscale, must, crf)
        if step is None:
            continue
        new_rel, new, new_dims = step
        if crf is None:
            done.add(key)
        first = originals.setdefault(key, old)
        layout.images[key] = new
        size += new.footprint - old.footprint
        if new_rel != img.rel:
            layout.renames[img.rel.as_posix()] = new_rel.as_posix()
        changed[:] = [c for c in changed if c.path != img.rel.as_posix()]  # a clip's last pass is what counts
        changed.append(
            PackChange(
                img.rel.as_posix(),
                new_rel.as_posix(),
                first.size,
                new.size,
                (img.width, img.height),
                new_dims,
            )
        )
    layout.render_tables()
    size = layout.size()
    if size > limit:
        raise _too_large(size, limit, layout.entries(), True, min_side)
    return size


def _fit_step(
    img: _Image,
    old: _Entry,
    layout: _Layout,
    min_side: int,
    max_pixels: int,
    downscale: bool,
    must: bool,
    crf: int | None,
) -> tuple[PurePosixPath, _Entry, tuple[int, int]] | None:
    """One re-encode: (its path in the archive, its entry, its size as shown), or None when it does not
    pay (a clip every pass starts from the original, and keeps a pass only when it is smaller)."""
    if crf is not None:
        new_rel = img.rel.with_suffix(".mp4")
        dest = layout.tmp / "clips" / f"{crf}-{int(downscale)}" / new_rel
        new_dims = _reencode_clip(img, dest, min_side, crf, downscale)
        new = _entry(new_rel.as_posix(), dest)
        keep = new.footprint < old.footprint
    else:
        new_rel = img.rel if img.rel.suffix.lower() in _JPEG_EXTENSIONS else img.rel.with_suffix(".jpg")
        dest = layout.tmp / "images" / new_rel
        new_dims = _reencode(img, dest, min_side, max_pixels, downscale)
        new = _entry(new_rel.as_posix(), dest)
        keep = must or (
            new.footprint < old.footprint if downscale else new.size <= old.size * _REENCODE_MIN_SAVING
        )
    if not keep:
        dest.unlink()
        return None
    return new_rel, new, new_dims


def _reencode_clip(clip: _Image, dest: Path, min_side: int, crf: int, downscale: bool) -> tuple[int, int]:
    """Write ``clip`` as H.264 at ``crf`` to ``dest`` (its shorter side brought to ``min_side`` when
    ``downscale`` and larger); returns its (width, height) as shown."""
    short = min(clip.width, clip.height)
    longest = max(clip.width, clip.height)
    side = round(longest * min_side / short) if downscale and short > min_side else longest
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        w, h = cliplib.reencode(clip.path, dest, side, crf)
    except cliplib.ClipError as exc:
        raise PackError(
            f"{clip.rel.as_posix()}: cannot be re-encoded ({exc}); fix or remove the file"
        ) from None
    return (h, w) if clip.clip is not None and clip.clip.rotation in (90, 270) else (w, h)
