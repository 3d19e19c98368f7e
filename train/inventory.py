"""The dataset inventory: what a dataset folder or archive holds, read once, by the same code for
the client's packer (``client/pack.py``) and the container's staging (``train/data.py``); and the
one function that turns any image into 8-bit RGB.

``scan_folder`` walks a folder (links and unreadable folders reported, never followed; junk folders
not entered); ``scan_archive`` reads an archive's listing (names and sizes; only caption tables are
read, nothing is extracted). Both build an ``Inventory``:

- every file by role (``dataset_rules.classify``): images and video clips, both in ``images`` (of
  two with the same name but for the extension, the first is used and the other named), same-stem ``.txt`` captions, caption tables
  (parsed; rows that cannot be read are listed), junk (kept apart: the packer names it, the
  staging ignores it), links, and other files with the reason they are left out;
- the before/after pairs (``dataset_rules.find_pairs``), the controls they leave out, and control
  images' own captions (named, never used: a pair's caption is its target's);
- the caption each image gets (``caption_source``, ``caption``), and captions without an image.

Decoding images is each side's own business (the packer reads headers, the staging decodes), and so
is what to do with what is found (the staging refuses links, the packer leaves them out).

Standard library and Pillow only: the client runs on laptops without torch or numpy.
"""

from __future__ import annotations

import os
import tarfile
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image, ImageOps

from . import dataset_rules as rules

# --------------------------------------------------------------------------------------------
# images


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB: alpha and colour keys flattened on white, 16-bit / 32-bit / float grey scaled to
    8 bits (by 65535 for 16-bit, else by 255 unless the values say otherwise), every other mode
    (CMYK, YCbCr, P, L, 1, LAB, HSV) converted by Pillow."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        grey = img.convert("F")
        hi = grey.getextrema()[1]
        assert isinstance(hi, (int, float))  # one band: (min, max) numbers, not per-band tuples
        top = 65535.0 if mode.startswith("I;16") or hi > 255 else 255.0
        if mode == "F" and hi <= 1.0:
            top = 1.0
        scaled = grey.point(lambda v: v * (255.0 / top) + 0.5)
        return scaled.convert("L").convert("RGB")  # "L" clips to 0..255 and truncates: round half up
    # "transparency" in info: a P palette entry or an RGB / L colour key (PNG tRNS), which is as
    # transparent as an alpha channel and must come out white too, not as the key colour.
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return img
    return img.convert("RGB")


def exif_swaps_sides(img: Image.Image) -> bool:
    """The image's EXIF orientation turns it by 90 degrees (its shown width is its stored height)."""
    try:
        return img.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except Exception:  # noqa: BLE001 - a broken EXIF block is ignored, as exif_transpose would
        return False


def shown_size(path: Path) -> tuple[int, int]:
    """An image's (width, height) as shown, EXIF rotation applied, from its header (nothing decoded).
    Raises what Pillow raises for a file it cannot read (``DecompressionBombError`` for a header
    far over Pillow's own pixel cap)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            w, h = img.size
            return (h, w) if exif_swaps_sides(img) else (w, h)


class OverPixelCap(ValueError):
    """An image whose header says more pixels than the cap; the message names the file."""


def open_rgb(path: Path, max_pixels: int, draft: tuple[int, int] | None = None) -> Image.Image:
    """The image at ``path`` decoded to 8-bit RGB, EXIF rotation applied. ``OverPixelCap`` when its
    header says more than ``max_pixels`` (checked before decoding); ``draft``: a JPEG may be decoded
    at a reduced scale that still covers this (width, height) as shown."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(path)
    with img:  # close the file on every path (a refused or undecodable image too)
        if img.width * img.height > max_pixels:
            raise OverPixelCap(
                f"image {path.name!r}: {img.width}x{img.height} pixels is over the cap of {max_pixels} pixels"
            )
        if draft is not None:
            img.draft(None, (draft[1], draft[0]) if exif_swaps_sides(img) else draft)
        img.load()
        # exif_transpose returns a new image (a copy when there is nothing to do), so the result
        # outlives the closed original.
        return to_rgb(ImageOps.exif_transpose(img))


# --------------------------------------------------------------------------------------------
# the inventory

LINK = "symbolic link (links are not followed)"


@dataclass(frozen=True)
class DatasetFile:
    name: str  # its path inside the dataset (POSIX, relative to the dataset root)
    size: int  # bytes
    path: Path | None = None  # on disk (a folder's file); None in an archive's listing


@dataclass(frozen=True)
class _Found:
    """One entry of a walk or a listing: a file, or what cannot be one and why."""

    name: str
    size: int = 0
    path: Path | None = None
    problem: str = ""  # why it is not read: unreadable, not a regular file, a link (LINK), junk
    junk: bool = False


@dataclass
class Inventory:
    """A dataset's files by role, and what is left out with the reason; see the module docstring."""

    images: dict[str, DatasetFile] = field(default_factory=dict)  # image key -> the image used
    captions: dict[str, DatasetFile] = field(default_factory=dict)  # image key -> its .txt
    tables: list[tuple[DatasetFile, rules.CaptionTable]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason), in the walk's order
    junk: list[tuple[str, str]] = field(default_factory=list)  # (name, reason): never part of a dataset
    links: list[str] = field(default_factory=list)  # symbolic links met (never followed)
    oversize: list[tuple[str, str]] = field(default_factory=list)  # captions / tables over their cap
    table_problems: list[tuple[str, int | None, str]] = field(default_factory=list)  # (table, line, why)
    pairing: rules.Pairing = field(default_factory=rules.Pairing)
    masks: dict[str, str] = field(default_factory=dict)  # target image name -> its loss mask's name
    masks_left_out: set[str] = field(default_factory=set)  # a second mask of one image (named in skipped)
    files: int = 0  # regular files met outside junk folders, junk files included

    def names(self) -> list[str]:
        """Every image's name, in the walk's order."""
        return [f.name for f in self.images.values()]

    def targets(self) -> list[str]:
        """The images trained on: every image but the control images and the loss masks."""
        controls = self.pairing.control_names() | self.mask_names()
        return [n for n in self.names() if n not in controls]

    def mask_names(self) -> set[str]:
        """Every image file that is a loss mask (used or left out): never trained on as an image."""
        return set(self.masks.values()) | self.masks_left_out

    def table_captions(self) -> dict[str, dict[str, str]]:
        """Table kind -> {image name: caption}, merged over every table of that kind (a later table wins)."""
        merged: dict[str, dict[str, str]] = {kind: {} for kind in rules.CAPTION_FILES}
        for file, table in self.tables:
            merged[PurePosixPath(file.name).name].update(table.captions)
        return merged

    def caption_source(self, name: str, tables: dict[str, dict[str, str]] | None = None) -> str:
        """Where image ``name``'s caption comes from: txt, metadata.jsonl, captions.csv or default."""
        has_txt = rules.image_key(PurePosixPath(name)) in self.captions
        return rules.caption_source(has_txt, name, self.table_captions() if tables is None else tables)

    def caption(
        self, name: str, default: str, tables: dict[str, dict[str, str]] | None = None
    ) -> tuple[str, str]:
        """(caption, source) of image ``name`` of a folder inventory, before the trigger word."""
        tables = self.table_captions() if tables is None else tables
        source = self.caption_source(name, tables)
        if source == "txt":
            return rules.decode_caption(
                read_file(self.captions[rules.image_key(PurePosixPath(name))])
            ), source
        if source == "default":
            return default.strip(), source
        return tables[source][name], source


def read_file(file: DatasetFile) -> bytes:
    """A folder inventory's file's bytes."""
    assert file.path is not None, f"{file.name}: not on disk"
    return file.path.read_bytes()


def _build(found: list[_Found], read: Callable[[DatasetFile], bytes], max_files: int) -> Inventory:
    """The inventory of ``found`` (sorted as the trainer walks); ``read`` reads a caption table's
    bytes, which is done only for tables within their cap (``max_files``: the spec's
    ``dataset.max_files``, which sets it)."""
    inv = Inventory()
    txts: dict[str, DatasetFile] = {}
    for f in found:
        if f.problem == LINK:
            inv.links.append(f.name)
        elif f.junk:
            inv.junk.append((f.name, f.problem))
        elif f.problem:
            inv.skipped.append((f.name, f.problem))
        else:
            inv.files += 1
            _sort_file(inv, txts, DatasetFile(f.name, f.size, f.path), read, max_files)
    for key, file in txts.items():
        if key in inv.images:
            inv.captions[key] = file
        else:
            inv.skipped.append((file.name, "caption has no image with the same name"))
    for file, table in inv.tables:
        inv.table_problems += [(file.name, line, why) for line, why in table.problems]
    _pair(inv)
    return inv


def _sort_file(
    inv: Inventory,
    txts: dict[str, DatasetFile],
    file: DatasetFile,
    read: Callable[[DatasetFile], bytes],
    max_files: int,
) -> None:
    rel = PurePosixPath(file.name)
    kind, reason = rules.classify(rel)
    if kind == rules.JUNK:
        inv.junk.append((file.name, reason))
        return
    if kind == rules.OTHER:
        inv.skipped.append((file.name, reason))
        return
    too_big = rules.oversize_reason(kind, file.size, max_files)
    if too_big:
        inv.oversize.append((file.name, too_big))
    key = rules.image_key(rel)
    if kind in (rules.IMAGE, rules.CLIP):  # a clip is a moving image: the same keys, captions, pairs
        if key in inv.images:
            used = PurePosixPath(inv.images[key].name).name
            inv.skipped.append((file.name, f"another image has the same name ({used}) and was used"))
        else:
            inv.images[key] = file
    elif kind == rules.CAPTION:
        txts[key] = file
    else:  # a caption table, parsed unless it is over its cap (the caller refuses the set then)
        table = rules.CaptionTable() if too_big else rules.parse_table(rel.name, read(file), rel.parent)
        inv.tables.append((file, table))


def _pair(inv: Inventory) -> None:
    """Loss masks (``NAME_mask.ext`` or metadata.jsonl's mask_file_name), then pairs by file name and by
    metadata.jsonl's control_file_name; the masks and controls they leave out and their own captions
    are named."""
    declared: dict[str, list[str]] = {}
    declared_masks: dict[str, str] = {}
    for _, table in inv.tables:  # a later table wins
        declared.update(table.controls)
        declared_masks.update(table.masks)
    inv.masks, unused_masks = rules.find_masks(inv.names(), declared_masks)
    inv.skipped += unused_masks
    inv.masks_left_out = {n for n, _ in unused_masks}
    mask_names = inv.mask_names()
    inv.pairing = rules.find_pairs([n for n in inv.names() if n not in mask_names], declared)
    inv.skipped += inv.pairing.unused
    for key in sorted({rules.image_key(PurePosixPath(n)) for n in mask_names} & set(inv.captions)):
        inv.skipped.append(
            (inv.captions.pop(key).name, "caption of a loss mask: a mask has no caption of its own")
        )
    controls = {rules.image_key(PurePosixPath(n)) for n in inv.pairing.control_names()}
    for key in sorted(controls & set(inv.captions)):
        inv.skipped.append(
            (
                inv.captions.pop(key).name,
                "caption of a control image: control images have no captions of their own "
                "(the pair's instruction is its target's caption)",
            )
        )


def _walk_order(found: list[_Found]) -> list[_Found]:
    return sorted(found, key=lambda f: PurePosixPath(f.name.rstrip("/")).parts)


# --------------------------------------------------------------------------------------------
# folders


def dataset_root(folder: Path) -> Path:
    """Descend through single nested top folders (``data.zip`` -> ``data/`` -> images)."""
    root = folder
    while True:
        entries = [p for p in root.iterdir() if not rules.is_junk(PurePosixPath(p.name))]
        if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
            root = entries[0]
        else:
            return root


def walk_folder(folder: Path) -> Iterator[_Found]:
    """Every entry below ``folder``. Links are reported (``LINK``), never followed; junk folders are
    reported once (named with a trailing ``/``), not entered."""
    stack = [(folder, PurePosixPath())]
    while stack:
        directory, rel_dir = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            yield _Found(
                f"{rel_dir.as_posix()}/",
                path=directory,
                problem=f"folder cannot be read ({exc.strerror or exc})",
            )
            continue
        subdirs = []
        for e in entries:
            rel, path = rel_dir / e.name, Path(e.path)
            try:
                if e.is_symlink():
                    yield _Found(rel.as_posix(), path=path, problem=LINK)
                    continue
                is_dir, is_file = e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False)
                size = e.stat(follow_symlinks=False).st_size if is_file else 0
            except OSError as exc:
                yield _Found(rel.as_posix(), path=path, problem=f"cannot be read ({exc.strerror or exc})")
                continue
            junk = rules.junk_reason(e.name, is_dir)
            if junk and is_dir:
                yield _Found(f"{rel.as_posix()}/", path=path, problem=junk, junk=True)
            elif is_dir:
                subdirs.append((path, rel))
            elif not is_file:
                yield _Found(rel.as_posix(), path=path, problem="not a regular file")
            else:
                yield _Found(rel.as_posix(), size, path)
        stack.extend(reversed(subdirs))


def scan_folder(folder: Path, max_files: int = rules.DEFAULT_MAX_FILES) -> Inventory:
    """The inventory of a dataset folder, read where it is (the caller picks its root)."""
    return _build(_walk_order(list(walk_folder(Path(folder)))), read_file, max_files)


# --------------------------------------------------------------------------------------------
# archives


def archive_kind(path: Path) -> str | None:
    """``zip``, ``tar.gz`` or ``tar`` from the file's first bytes (never its name); None otherwise."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"):
        return "zip"
    if head[:2] == b"\x1f\x8b":
        return "tar.gz"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    return None


def scan_archive(path: Path, max_files: int = rules.DEFAULT_MAX_FILES) -> Inventory:
    """The inventory of a dataset archive from its listing, as the staging will see it once extracted
    (one nested top folder descended); only caption tables are read. Whether the archive is safe to
    extract is the staging's to say: names that would escape are left out here. ``ValueError`` for a
    file that is not a zip, tar or tar.gz, or one that cannot be read."""
    kind = archive_kind(path)
    if kind is None:
        raise ValueError(f"{path.name}: not a zip, tar or tar.gz archive")
    try:
        if kind == "zip":
            with zipfile.ZipFile(path) as zf:
                listing = [(i.filename, i.file_size) for i in zf.infolist() if not i.is_dir()]
                return _scan_listing(listing, zf.read, max_files)
        with tarfile.open(path, "r:gz" if kind == "tar.gz" else "r:") as tf:
            members = {m.name: m for m in tf.getmembers() if m.isfile()}

            def read(name: str) -> bytes:
                stream = tf.extractfile(members[name])
                assert stream is not None
                return stream.read()

            return _scan_listing([(m.name, m.size) for m in members.values()], read, max_files)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        raise ValueError(f"{path.name}: the {kind} archive cannot be read ({exc})") from None


def _scan_listing(listing: list[tuple[str, int]], read: Callable[[str], bytes], max_files: int) -> Inventory:
    rels = {name: PurePosixPath(name.replace("\\", "/")) for name, _ in listing}
    rels = {n: r for n, r in rels.items() if not r.is_absolute() and ".." not in r.parts}
    top = _top_folder([r for r in rels.values() if not rules.is_junk(r)])
    inside = {n: r.relative_to(top).as_posix() for n, r in rels.items() if r.is_relative_to(top)}
    original = {shown: n for n, shown in inside.items()}
    found = []
    for name, size in listing:
        if name in inside:
            rel = PurePosixPath(inside[name])
            junk = rules.is_junk(rel)
            found.append(
                _Found(inside[name], size, problem=rules.classify(rel)[1] if junk else "", junk=junk)
            )
    return _build(_walk_order(found), lambda f: read(original[f.name]), max_files)


def _top_folder(rels: list[PurePosixPath]) -> PurePosixPath:
    """The single nested folder every entry lies in, descended as ``dataset_root`` does (or none)."""
    top = PurePosixPath()
    while rels and all(len(r.parts) > len(top.parts) + 1 for r in rels):
        heads = {r.parts[len(top.parts)] for r in rels}
        if len(heads) != 1:
            break
        top = top / heads.pop()
    return top
