"""Data staging: an uploaded archive (or a folder) -> checked images with captions.

What people upload is messy, and what an attacker uploads is hostile. This module:
- detects zip / tar / tar.gz by magic bytes, never by extension;
- refuses unsafe archives with a message naming the entry: path traversal, absolute
  paths, links and device files, more entries or uncompressed bytes than the limits,
  decompression bombs (an entry that unpacks to over 200x its compressed size, checked from
  the declared sizes before extracting and again while streaming), caption files over their
  size cap, images over the pixel cap;
- extracts only images and caption files: anything else is never written to disk, only named
  in the report; junk (``__MACOSX/``, ``._*``, ``.DS_Store``, ``Thumbs.db``) is left out silently;
- tolerates one nested top folder, upper-case extensions, EXIF rotation, RGBA / CMYK / P /
  L / 16-bit images;
- pairs captions: same-stem ``.txt`` > ``metadata.jsonl`` (``file_name``, ``text``) >
  ``captions.csv`` > the default caption / trigger word, and puts the trigger word into
  captions that lack it;
- pairs targets with their control images for edit models (``NAME_control.ext``,
  ``control/NAME.ext``, ``NAME_control_1.ext``..., or ``metadata.jsonl``'s ``control_file_name``;
  docs/edit.md): control images are never trained as targets and have no captions of their own;
  in a paired set a target without its control, or with more than the model takes, is skipped,
  and a control without a target is kept apart (``loose_controls``); a pair set for a
  text-to-image model, or a set without pairs for an edit model, is refused (``PairRule``);
- skips files it cannot use, naming each with the reason, and fails only when no usable
  image is left.

The rules shared with the client's packer (what an entry is, caption precedence, size caps,
the dataset hash) live in ``train/dataset_rules.py``. Extraction writes only below the job's
own dataset folder.
"""

from __future__ import annotations

import gzip
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import IO, BinaryIO, TypeVar

from PIL import Image, UnidentifiedImageError

from . import clips as cliplib
from . import dataset_rules as rules
from . import inventory
from .dataset_rules import (  # noqa: F401 - re-exported: the names other modules import from here
    CAPTION_FILES,
    IMAGE_EXTENSIONS,
    MIN_IMAGE_SIDE,
    UNSUPPORTED_IMAGE_EXTENSIONS,
    PairRule,
    VideoRule,
)
from .inventory import Inventory, OverPixelCap, dataset_root, open_rgb, scan_folder, to_rgb  # noqa: F401

T = TypeVar("T")

_COPY_CHUNK = 1 << 20
# tar.gz: the compressed bytes an entry used are measured from the file position, which runs
# ahead of (or, for the entry's first bytes, behind) what was decompressed by a read buffer or
# two (8 KiB each). Counting this much more never refuses an honest entry.
_RATIO_SLACK = 64 << 10


class UnsafeArchiveError(ValueError):
    """The archive is refused as a whole; the message names the entry."""


class DatasetError(ValueError):
    """The dataset cannot be used (unreadable archive, no usable image)."""


@dataclass(frozen=True)
class DataLimits:
    max_files: int = rules.DEFAULT_MAX_FILES
    max_bytes: int = rules.DEFAULT_MAX_BYTES
    max_image_pixels: int = rules.DEFAULT_MAX_IMAGE_PIXELS
    max_clip_frames: int = rules.DEFAULT_MAX_CLIP_FRAMES  # a clip listing more is refused (unsafe)
    clips: bool = True  # extract video clips (an image model's staging sets False: named, left out)


@dataclass(frozen=True)
class ControlRecord:
    """A control ("before") or reference image of a pair, or one without a target."""

    path: Path  # the staged file
    name: str  # its path inside the dataset, for messages
    width: int  # after EXIF rotation (may differ from its target's)
    height: int


@dataclass(frozen=True)
class ImageRecord:
    path: Path  # the staged file
    name: str  # its path inside the dataset, for messages
    caption: str
    caption_source: str  # txt | metadata.jsonl | captions.csv | default
    width: int  # after EXIF rotation
    height: int
    controls: tuple[ControlRecord, ...] = ()  # in reference order; () for a plain image
    # video models: the frames a sample of it takes (1 for an image); 0 for an image model's image
    frames: int = 0
    clip: cliplib.ClipInfo | None = None  # a video clip's timing and size (None for an image)
    mask: Path | None = None  # its loss mask (white learns, black is ignored); None: learns everywhere


@dataclass
class StagedDataset:
    root: Path
    images: list[ImageRecord]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    dataset_hash: str = ""
    loose_controls: list[ControlRecord] = field(default_factory=list)  # controls without a target

    @property
    def paired(self) -> bool:
        """Any image has control images (an edit model's before/after pairs)."""
        return any(r.controls for r in self.images)

    def report(self) -> dict:
        paired = self.paired
        images = []
        for r in self.images:
            entry: dict = {
                "name": r.name,
                "size": [r.width, r.height],
                "caption": r.caption,
                "caption_source": r.caption_source,
            }
            if r.clip is not None:
                entry["frames"] = r.frames
                entry["clip"] = r.clip.describe()
            if paired:
                entry["controls"] = [c.name for c in r.controls]
            if r.mask is not None:
                entry["mask"] = r.mask.relative_to(self.root).as_posix()
            images.append(entry)
        report: dict = {"images_used": len(self.images), "dataset_hash": self.dataset_hash, "images": images}
        if paired:
            report["pairs"] = sum(1 for r in self.images if r.controls)
            report["loose_controls"] = [c.name for c in self.loose_controls]
        report["skipped"] = [{"name": n, "reason": why} for n, why in self.skipped]
        return report


# --------------------------------------------------------------------------------------------
# archives


def archive_kind(path: Path) -> str:
    """``zip``, ``tar.gz`` or ``tar`` from the file's first bytes; DatasetError otherwise."""
    kind = inventory.archive_kind(path)
    if kind is None:
        with open(path, "rb") as f:
            head = f.read(8)
        raise DatasetError(f"{path.name}: not a zip, tar or tar.gz archive (its first bytes are {head!r})")
    return kind


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


def _inside(dest: Path, rel: PurePosixPath) -> Path:
    target = (dest / rel).resolve()
    if not target.is_relative_to(dest.resolve()):
        raise UnsafeArchiveError(f"archive entry {str(rel)!r}: resolves outside the dataset folder")
    return target


class _Budget:
    """The uncompressed bytes an archive may still unpack to (``DataLimits.max_bytes``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.left = limit

    def check(self, n: int, entry: str) -> None:
        if n > self.left:
            raise UnsafeArchiveError(
                f"archive entry {entry!r}: the archive unpacks to more than {self.limit} bytes (limit)"
            )

    def spend(self, n: int, entry: str) -> None:
        self.check(n, entry)
        self.left -= n


@dataclass(frozen=True)
class _Source:
    """One archive entry to copy out: its stream, what it declares, and how to see its compressed bytes."""

    stream: IO[bytes]
    name: str  # as written in the archive, for messages
    declared: int  # the uncompressed size the archive declares
    compressed_pos: Callable[[], int] | None = None  # the compressed stream's position (tar.gz only)


def _copy_entry(src: _Source, dst_path: Path, budget: _Budget) -> None:
    """Stream one entry to ``dst_path``, counting the bytes actually written.

    Stops, and removes the partial file, when the entry goes past the size it declared, past
    the compression-ratio bound (measured as it streams) or past the archive's byte budget.
    """
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    start = src.compressed_pos() if src.compressed_pos else 0
    written = 0
    try:
        with open(dst_path, "wb") as dst:
            while chunk := src.stream.read(_COPY_CHUNK):
                written += len(chunk)
                if written > src.declared:
                    raise UnsafeArchiveError(
                        f"archive entry {src.name!r}: holds more than the {src.declared} bytes it declares"
                    )
                if src.compressed_pos:
                    why = rules.ratio_reason(written, src.compressed_pos() - start + _RATIO_SLACK)
                    if why:
                        raise UnsafeArchiveError(f"archive entry {src.name!r}: {why}")
                budget.spend(len(chunk), src.name)
                dst.write(chunk)
    except BaseException:
        dst_path.unlink(missing_ok=True)
        raise


def _screen(
    name: str, rel: PurePosixPath, size: int, compressed: int | None, limits: DataLimits
) -> str | None:
    """A dataset entry's fate from its declared sizes, before any byte is extracted.

    Returns None to extract it, "" to leave junk out silently, or the reason a file that is
    neither an image nor a caption is left out (never written to disk). Raises
    UnsafeArchiveError for a caption over its cap or an entry over the compression-ratio bound.
    """
    kind, reason = rules.classify(rel)
    why = rules.oversize_reason(kind, size, limits.max_files)
    if why is None and compressed is not None:
        why = rules.ratio_reason(size, compressed)
    if why:
        raise UnsafeArchiveError(f"archive entry {name!r}: {why}")
    if kind == rules.JUNK:
        return ""
    if kind == rules.CLIP and not limits.clips:
        return rules.clip_for_image_model_reason("")
    return reason if kind == rules.OTHER else None


def extract_archive(
    archive: Path, dest: Path, limits: DataLimits, *, dataset_only: bool = False
) -> list[tuple[str, str]]:
    """Extract ``archive`` into ``dest`` (which must not exist yet) after checking every entry.

    ``dataset_only``: extract images and caption files only, refusing caption files over their
    cap and entries over the compression-ratio bound (``train/dataset_rules.py``). Returns the
    entries left out as (path, reason); junk is left out without a reason and not listed.
    Without it every regular file is extracted (weights and checkpoint archives).
    """
    kind = archive_kind(archive)
    budget = _Budget(limits.max_bytes)
    if kind == "zip":
        return _guarded(
            dest, archive.name, kind, lambda: _extract_zip(archive, dest, limits, budget, dataset_only)
        )
    compressed_total = archive.stat().st_size if kind == "tar.gz" else None
    with open(archive, "rb") as raw:
        return _guarded(
            dest,
            archive.name,
            kind,
            lambda: _extract_tar(
                raw, archive.name, dest, limits, budget, dataset_only, kind, compressed_total
            ),
        )


def extract_tar_stream(raw: BinaryIO, name: str, dest: Path, limits: DataLimits, *, gz: bool) -> None:
    """A ``.tar`` (``gz``: ``.tar.gz``) read from a stream that cannot seek, e.g. an archive still
    arriving over the network (``train.fetch.RangeStream``), into ``dest`` (which must not exist yet):
    every entry is checked as for a file before a byte of it is written (no escapes, links, special
    files, or more bytes or entries than ``limits``); a refusal leaves nothing behind."""
    kind = "tar.gz" if gz else "tar"
    budget = _Budget(limits.max_bytes)
    _guarded(dest, name, kind, lambda: _extract_tar(raw, name, dest, limits, budget, False, kind, None))


def _guarded(dest: Path, name: str, kind: str, extract: Callable[[], T]) -> T:
    """``extract()`` into the new folder ``dest``; on any failure nothing half-extracted stays behind,
    and an archive that cannot be read is a DatasetError naming it."""
    dest.mkdir(parents=True)
    try:
        return extract()
    except UnsafeArchiveError:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    # NotImplementedError: a compression method Python cannot read (Deflate64 from Windows Explorer,
    # AES); ValueError: e.g. a name flagged UTF-8 that is not. Both are unusable uploads, not crashes.
    except (
        zipfile.BadZipFile,
        tarfile.TarError,
        EOFError,
        zlib.error,
        OSError,
        NotImplementedError,
        ValueError,
    ) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise DatasetError(f"{name}: the {kind} archive cannot be unpacked ({exc})") from None
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _zip_plan(
    archive: Path,
    infos: list[zipfile.ZipInfo],
    limits: DataLimits,
    dataset_only: bool,
    skipped: list[tuple[str, str]],
) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """The entries to extract; every entry is checked (and the archive refused) before any is."""
    if len(infos) > limits.max_files:
        raise UnsafeArchiveError(
            f"{archive.name}: {len(infos)} entries, more than the limit of {limits.max_files}"
        )
    declared = 0
    for info in infos:  # name the entry that crosses the limit, as the tar path does
        declared += info.file_size
        if declared > limits.max_bytes:
            raise UnsafeArchiveError(
                f"archive entry {info.filename!r}: the archive unpacks to more than "
                f"{limits.max_bytes} bytes (limit)"
            )
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
        if info.is_dir() or str(rel) == ".":
            continue
        reason = None
        if dataset_only:
            reason = _screen(info.filename, rel, info.file_size, info.compress_size, limits)
        if reason is None:
            plan.append((info, rel))
        elif reason:
            skipped.append((rel.as_posix(), reason))
    return plan


def _extract_zip(
    archive: Path, dest: Path, limits: DataLimits, budget: _Budget, dataset_only: bool
) -> list[tuple[str, str]]:
    skipped: list[tuple[str, str]] = []
    with zipfile.ZipFile(archive) as zf:
        for info, rel in _zip_plan(archive, zf.infolist(), limits, dataset_only, skipped):
            # zipfile reads at most the declared compressed size and returns at most the declared
            # size, so the ratio checked in the plan holds while streaming too.
            with zf.open(info) as stream:
                _copy_entry(_Source(stream, info.filename, info.file_size), _inside(dest, rel), budget)
    return skipped


def _extract_tar(
    raw: BinaryIO,
    name: str,
    dest: Path,
    limits: DataLimits,
    budget: _Budget,
    dataset_only: bool,
    kind: str,
    compressed_total: int | None,
) -> list[tuple[str, str]]:
    skipped: list[tuple[str, str]] = []
    count = 0
    gz = kind == "tar.gz"
    # The gzip layer is opened here, not by tarfile, so the compressed stream's position can be read:
    # it is what an entry's compression ratio is measured against while it streams. "r|": the
    # archive is read once, front to back (a stream from the network cannot seek).
    with _gunzip(raw, gz) as stream, tarfile.open(fileobj=stream, mode="r|") as tf:
        for member in tf:  # streaming: a tar.gz is checked as it decompresses
            count += 1
            if count > limits.max_files:
                raise UnsafeArchiveError(f"{name}: more entries than the limit of {limits.max_files}")
            rel = _safe_member_path(member.name)
            if member.issym() or member.islnk():
                raise UnsafeArchiveError(f"archive entry {member.name!r}: links are not allowed")
            if member.isdir():
                continue
            if not member.isfile():
                raise UnsafeArchiveError(f"archive entry {member.name!r}: special files are not allowed")
            budget.check(member.size, member.name)
            # No entry can use more compressed bytes than the whole file holds: a bound from the header.
            reason = None
            if dataset_only:
                reason = _screen(member.name, rel, member.size, compressed_total, limits)
            if reason is not None:
                budget.spend(member.size, member.name)  # declared bytes count even when left out
                if reason:
                    skipped.append((rel.as_posix(), reason))
                continue
            src = tf.extractfile(member)
            assert src is not None
            position = raw.tell if gz and dataset_only else None
            _copy_entry(_Source(src, member.name, member.size, position), _inside(dest, rel), budget)
    return skipped


def _gunzip(raw: BinaryIO, gz: bool) -> gzip.GzipFile | nullcontext[BinaryIO]:
    return gzip.GzipFile(fileobj=raw, mode="rb") if gz else nullcontext(raw)


# --------------------------------------------------------------------------------------------
# images


def load_rgb(path: Path, max_pixels: int) -> Image.Image:
    """Open an image, apply EXIF orientation and convert it to 8-bit RGB (``inventory.open_rgb``).

    Raises UnsafeArchiveError over the pixel cap (checked from the header, before decoding)
    and OSError / UnidentifiedImageError / ValueError for files that cannot be decoded.
    """
    try:
        return open_rgb(path, max_pixels)
    except OverPixelCap as exc:
        raise UnsafeArchiveError(str(exc)) from None
    except Image.DecompressionBombError as exc:
        # Pillow refuses headers over 2x its own MAX_IMAGE_PIXELS inside open(), before our check
        # runs; without this a real bomb escaped as a bare PIL error instead of a refusal.
        raise UnsafeArchiveError(
            f"image {path.name!r}: over the cap of {max_pixels} pixels ({exc})"
        ) from None


# --------------------------------------------------------------------------------------------
# captions


def read_caption_file(path: Path) -> str:
    """A caption file's text: BOM removed, CRLF/CR normalised, lines joined, whitespace tidied."""
    return rules.decode_caption(path.read_bytes())


def add_trigger_word(caption: str, trigger: str, position: str = "prepend") -> str:
    """Put ``trigger`` into ``caption`` unless it is already there as a word (any case)."""
    if not trigger:
        return caption
    if re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption, flags=re.IGNORECASE):
        return caption
    if not caption:
        return trigger
    return f"{trigger}, {caption}" if position == "prepend" else f"{caption}, {trigger}"


def swap_trigger_word(caption: str, trigger: str, replacement: str) -> str:
    """``caption`` with every ``trigger`` (as a word, any case) replaced by ``replacement``: a caption's
    output-preservation prompt ("sks style, a red circle" -> "style, a red circle" ... with the class
    word in its place)."""
    return re.sub(rf"(?<!\w){re.escape(trigger)}(?!\w)", replacement, caption, flags=re.IGNORECASE)


# --------------------------------------------------------------------------------------------
# staging


def stage_dataset(
    source: Path,
    job_dir: Path,
    limits: DataLimits = DataLimits(),
    trigger_word: str = "",
    default_caption: str = "",
    trigger_position: str = "prepend",
    pairs: PairRule = PairRule(),
    video: VideoRule | None = None,
) -> StagedDataset:
    """Stage ``source`` (an archive or a folder) for training and describe what was found.

    Archives are extracted under ``job_dir/dataset`` (images and caption files only); folders
    are read in place. ``pairs``: what the model takes (``dataset_rules.PairRule``); the default,
    a text-to-image model, stages a set without pairs exactly as before and refuses one with pairs.
    ``video``: what a video model takes from a clip (``dataset_rules.VideoRule``); None, an image
    model, skips clips naming why.
    """
    source = Path(source)
    if not source.exists():
        raise DatasetError(f"dataset {str(source)!r} does not exist")
    captions = _CaptionRules(trigger_word, default_caption, trigger_position, pairs, video)
    if source.is_dir():
        return _stage_folder(source, limits, captions)
    folder = Path(job_dir) / "dataset"
    if folder.exists():
        shutil.rmtree(folder)
    left_out = extract_archive(source, folder, replace(limits, clips=video is not None), dataset_only=True)
    try:
        return _stage_folder(folder, limits, captions, left_out)
    except BaseException:
        # An archive refused after unpacking (an image over the pixel cap, too many files) or one
        # with no usable image leaves nothing extracted behind. A user's folder is never removed.
        shutil.rmtree(folder, ignore_errors=True)
        raise


@dataclass(frozen=True)
class _CaptionRules:
    trigger_word: str
    default_caption: str
    trigger_position: str
    pairs: PairRule = PairRule()
    video: VideoRule | None = None


def _stage_folder(
    folder: Path, limits: DataLimits, captions: _CaptionRules, left_out: Sequence[tuple[str, str]] = ()
) -> StagedDataset:
    root = dataset_root(folder)
    inv = scan_folder(root, limits.max_files)
    # archives were checked while extracting; a folder given in place is checked here
    if inv.links:
        raise UnsafeArchiveError(f"dataset entry {inv.links[0]!r}: links are not allowed")
    if inv.files > limits.max_files:
        raise UnsafeArchiveError(f"dataset: more than {limits.max_files} files (limit)")
    if inv.oversize:
        name, why = inv.oversize[0]
        raise UnsafeArchiveError(f"dataset entry {name!r}: {why}")
    # entries left out of the archive are named as the rest are: relative to the dataset root
    prefix = root.relative_to(folder).as_posix() + "/" if root != folder else ""
    rows = [(f"{table}:{line}" if line else table, why) for table, line, why in inv.table_problems]
    skipped = [(n.removeprefix(prefix), why) for n, why in left_out] + inv.skipped + rows
    problem = rules.check_pairs(captions.pairs, inv.pairing)
    if problem:
        raise DatasetError(problem)
    records, digest = _image_records(inv, limits, captions, skipped)
    if not records:
        reasons = "; ".join(f"{n}: {r}" for n, r in skipped[:10]) or "the dataset holds no files"
        raise DatasetError(f"no usable image in the dataset ({reasons})")
    loose = _loose_controls(root, inv.pairing, captions.pairs, limits, skipped)
    return StagedDataset(
        root=root, images=records, skipped=skipped, dataset_hash=digest, loose_controls=loose
    )


def _image_records(
    inv: Inventory, limits: DataLimits, captions: _CaptionRules, skipped: list[tuple[str, str]]
) -> tuple[list[ImageRecord], str]:
    """The usable images (with their controls in a paired set) with their final captions, and the
    dataset hash over them."""
    records: list[ImageRecord] = []
    digest = rules.DatasetHash()
    pairing = inv.pairing
    is_control = pairing.control_names() | inv.mask_names()
    paths = {f.name: f.path for f in inv.images.values() if f.path is not None}
    tables = inv.table_captions()
    for key in sorted(inv.images):
        name = inv.images[key].name
        if name in is_control:
            continue
        path = paths[name]
        if rules.is_clip(name):
            if name in inv.masks:
                skipped.append(
                    (inv.masks[name], f"loss masks apply to images; the clip {name} trains unmasked")
                )
            rule = captions.video
            if rule is None:
                skipped.append((name, rules.clip_for_image_model_reason("")))
                continue
            clip, frames, why = _usable_clip(path, rule, limits)
            if clip is None:
                skipped.append((name, why))
                continue
            caption, origin = inv.caption(name, captions.default_caption, tables)
            caption = add_trigger_word(caption, captions.trigger_word, captions.trigger_position)
            records.append(
                ImageRecord(path, name, caption, origin, clip.width, clip.height, frames=frames, clip=clip)
            )
            digest.add(name, path, caption)
            continue
        img, why = _usable(path, limits)
        mask_name = inv.masks.get(name)
        if img is not None and mask_name is not None:
            why = _unusable_mask(paths[mask_name], mask_name, img, limits)
            img = None if why else img
        if img is None:
            skipped.append((name, why))
            _skip_controls(name, pairing.controls.get(name, []), "its target image was skipped", skipped)
            if mask_name is not None:
                skipped.append((mask_name, f"loss mask of {name}, which was skipped"))
            continue
        controls: tuple[ControlRecord, ...] = ()
        if pairing.paired:
            controls, why = _pair_controls(name, paths, pairing, captions.pairs, limits, skipped)
            if why:
                skipped.append((name, why))
                continue
        caption, origin = inv.caption(name, captions.default_caption, tables)
        caption = add_trigger_word(caption, captions.trigger_word, captions.trigger_position)
        frames = 0 if captions.video is None else 1  # a video model's image: a one-frame sample
        mask = paths[mask_name] if mask_name is not None else None
        records.append(
            ImageRecord(path, name, caption, origin, img.width, img.height, controls, frames, mask=mask)
        )
        digest.add(name, path, caption)
        for c in controls:
            digest.add_control(c.name, c.path)
        if mask_name is not None and mask is not None:
            digest.add_control(mask_name, mask)
    return records, digest.hexdigest()


def load_mask(path: Path, max_pixels: int) -> Image.Image:
    """A loss mask as 8-bit grey (its EXIF rotation applied, as the image's is): 255 learns, 0 is ignored."""
    return load_rgb(path, max_pixels).convert("L")


def _unusable_mask(path: Path, name: str, img: Image.Image, limits: DataLimits) -> str:
    """Why the image cannot train with its loss mask ``name``, or "" when it can."""
    try:
        mask = load_mask(path, limits.max_image_pixels)
    except UnsafeArchiveError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        return f"its loss mask {name} cannot be decoded ({type(exc).__name__}: {exc})"[:300]
    aspect, mask_aspect = img.width / img.height, mask.width / mask.height
    if abs(mask_aspect - aspect) > 0.01 * aspect:
        return (
            f"its loss mask {name} is {mask.width}x{mask.height} and the image {img.width}x{img.height}: "
            "a mask must have the image's shape (any size of it)"
        )
    if mask.getextrema()[1] == 0:
        return f"its loss mask {name} is black everywhere: nothing of the image would be learned"
    return ""


def _usable(path: Path, limits: DataLimits) -> tuple[Image.Image | None, str]:
    """(the image, "") or (None, why it cannot be used); UnsafeArchiveError over the pixel cap."""
    try:
        img = load_rgb(path, limits.max_image_pixels)
    except UnsafeArchiveError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        return None, f"cannot be decoded as an image ({type(exc).__name__}: {exc})"[:300]
    if min(img.size) < MIN_IMAGE_SIDE:
        return None, f"too small ({img.width}x{img.height}; at least {MIN_IMAGE_SIDE} px a side)"
    return img, ""


def _usable_clip(path: Path, rule: VideoRule, limits: DataLimits) -> tuple[cliplib.ClipInfo | None, int, str]:
    """(the clip, the frames a sample of it takes, "") or (None, 0, why it cannot be used): probed
    (``UnsafeArchiveError`` for what ``clips.probe`` refuses), its length checked, and the frames of
    its first sample decoded, so a clip that breaks there is named now rather than while caching."""
    try:
        clip = cliplib.probe(path, limits.max_image_pixels, limits.max_clip_frames)
    except cliplib.ClipRefused as exc:
        raise UnsafeArchiveError(str(exc)) from None
    except cliplib.ClipError as exc:
        return None, 0, str(exc)
    frames, why = cliplib.sample_frames_or_reason(clip, rule)
    if frames is None:
        return None, 0, why
    first = "start" if rule.sampling == "random" else rule.sampling
    try:
        cliplib.decode_frames(
            path, clip, cliplib.pick_frames(clip, frames, rule.fps, first), limits.max_image_pixels
        )
    except cliplib.ClipRefused as exc:
        raise UnsafeArchiveError(str(exc)) from None
    except cliplib.ClipError as exc:
        return None, 0, str(exc)
    return clip, frames, ""


def _pair_controls(
    target: str,
    paths: dict[str, Path],
    pairing: rules.Pairing,
    rule: PairRule,
    limits: DataLimits,
    skipped: list[tuple[str, str]],
) -> tuple[tuple[ControlRecord, ...], str]:
    """A target's control records, or ((), why the pair is skipped); the pair's control files that
    are left out are named in ``skipped``."""
    names = pairing.controls.get(target, [])
    why = ""
    if target in pairing.missing:
        why = rules.missing_control_reason(pairing.missing[target])
    elif not names:
        why = rules.no_control_reason(target)
    else:
        why = rules.too_many_controls_reason(rule, len(names)) or ""
    if why:
        _skip_controls(target, names, f"its pair was skipped ({target} {why})", skipped)
        return (), why
    records = []
    for i, name in enumerate(names):
        img, bad = _usable(paths[name], limits)
        if img is not None and (bad := rules.control_shape_reason(rule, img.width, img.height) or ""):
            img = None
        if img is None:
            skipped.append((name, bad))
            _skip_controls(
                target, names[:i] + names[i + 1 :], f"its pair was skipped ({name}: {bad})", skipped
            )
            return (), f"pair skipped: its control image {name} {bad}"
        records.append(ControlRecord(paths[name], name, img.width, img.height))
    return tuple(records), ""


def _skip_controls(target: str, controls: Sequence[str], why: str, skipped: list[tuple[str, str]]) -> None:
    skipped += [(c, f"control image of {target}: {why}") for c in controls]


def _loose_controls(
    root: Path, pairing: rules.Pairing, rule: PairRule, limits: DataLimits, skipped: list[tuple[str, str]]
) -> list[ControlRecord]:
    """The controls without a target (a paired set only): named in ``skipped``, never trained on."""
    loose = []
    for name, why in pairing.loose:
        path = root / name
        img, bad = _usable(path, limits)
        if img is not None and (bad := rules.control_shape_reason(rule, img.width, img.height) or ""):
            img = None
        skipped.append((name, why if img is not None else f"{why}; {bad}"))
        if img is not None:
            loose.append(ControlRecord(path, name, img.width, img.height))
    return loose


def dataset_report_lines(ds: StagedDataset, buckets: dict[str, int] | None = None) -> list[str]:
    """Human lines for the log: images used, skipped files with reasons, buckets and counts."""
    clips = sum(1 for r in ds.images if r.clip is not None)
    used = f"{len(ds.images) - clips} images and {clips} clips" if clips else f"{len(ds.images)} images"
    lines = [f"dataset: {used} used, {len(ds.skipped)} files skipped"]
    if ds.paired:
        pairs = [r for r in ds.images if r.controls]
        lines.append(
            f"dataset: {len(pairs)} pairs ({sum(len(r.controls) for r in pairs)} control images), "
            f"{len(ds.loose_controls)} control images without a target (not trained on)"
        )
    sources: dict[str, int] = {}
    for r in ds.images:
        sources[r.caption_source] = sources.get(r.caption_source, 0) + 1
    lines.append("dataset: captions from " + ", ".join(f"{k} ({v})" for k, v in sorted(sources.items())))
    lines += [f"dataset: skipped {name}: {reason}" for name, reason in ds.skipped]
    if buckets:
        lines.append("dataset: buckets " + ", ".join(f"{k}: {v}" for k, v in buckets.items()))
    return lines
