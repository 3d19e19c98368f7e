"""Dataset staging (train/data.py): messy-but-valid uploads are used, hostile ones refused.

Every fixture is built in code under ``tmp_path``; images are tiny so the file runs in seconds.
"""

from __future__ import annotations

import io
import os
import random
import struct
import tarfile
import time
import zipfile
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
from PIL import Image

from train.data import (
    DataLimits,
    DatasetError,
    UnsafeArchiveError,
    add_trigger_word,
    archive_kind,
    dataset_report_lines,
    load_rgb,
    read_caption_file,
    stage_dataset,
)

# --------------------------------------------------------------------------------------------
# fixture builders


def img_bytes(
    fmt: str = "PNG", size: tuple[int, int] = (32, 32), mode: str = "RGB", color=(200, 30, 30), **save
) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, fmt, **save)
    return buf.getvalue()


def jpg(size=(32, 32), color=(200, 30, 30)) -> bytes:
    return img_bytes("JPEG", size, "RGB", color)


def png(size=(32, 32), color=(30, 200, 30)) -> bytes:
    return img_bytes("PNG", size, "RGB", color)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, raw_rows: bytes) -> bytes:
    """A PNG written by hand (IHDR / IDAT / IEND), for what Pillow cannot save itself."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(raw_rows))
        + _png_chunk(b"IEND", b"")
    )


def png_rgb16(width: int, height: int, rgb16: tuple[int, int, int]) -> bytes:
    """A 16-bit-per-channel RGB PNG (bit depth 16, colour type 2) filled with one colour."""
    row = b"\x00" + struct.pack(">HHH", *rgb16) * width  # filter byte 0, then big-endian samples
    return raw_png(width, height, 16, 2, row * height)


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A PNG whose header claims a huge canvas; the tiny IDAT would never fill it."""
    return raw_png(width, height, 8, 2, b"\x00" * 64)


def make_zip(path: Path, entries: dict[str, bytes] | list, compression=zipfile.ZIP_DEFLATED) -> Path:
    """``entries``: name -> bytes (a name ending in "/" is a folder), or a list of (ZipInfo | name, bytes)."""
    items = entries.items() if isinstance(entries, dict) else entries
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in items:
            zf.writestr(name, data)
    return path


def tar_member(
    name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, linkname: str = ""
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.mtime = 1_700_000_000
    return info, data


def make_tar(path: Path, entries: dict[str, bytes] | list, mode: Literal["w", "w:gz"] = "w:gz") -> Path:
    """``entries``: name -> bytes, or a list of (TarInfo, bytes) from ``tar_member``."""
    items = [tar_member(n, d) for n, d in entries.items()] if isinstance(entries, dict) else entries
    with tarfile.open(path, mode) as tf:
        for info, data in items:
            tf.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def stage(
    source: Path,
    tmp_path: Path,
    limits: DataLimits = DataLimits(),
    trigger_word: str = "",
    default_caption: str = "",
    job: str = "job",
):
    job_dir = tmp_path / job
    job_dir.mkdir(exist_ok=True)
    return stage_dataset(source, job_dir, limits, trigger_word=trigger_word, default_caption=default_caption)


def by_name(ds) -> dict:
    return {r.name: r for r in ds.images}


# --------------------------------------------------------------------------------------------
# messy but valid


def test_nested_top_folder_and_mac_junk_are_handled(tmp_path):
    archive = make_zip(
        tmp_path / "upload.zip",
        {
            "my photos/": b"",
            "my photos/a.jpg": jpg(),
            "my photos/b.png": png(),
            "my photos/a.txt": b"a red square",
            "my photos/._b.png": b"\x00\x05\x16\x07AppleDouble junk",
            "my photos/.DS_Store": b"\x00\x00\x00\x01Bud1 junk",
            "__MACOSX/": b"",
            "__MACOSX/my photos/._a.jpg": b"\x00\x05\x16\x07AppleDouble junk",
            "__MACOSX/._my photos": b"\x00\x05\x16\x07AppleDouble junk",
        },
    )
    ds = stage(archive, tmp_path, trigger_word="sks")

    assert sorted(by_name(ds)) == ["a.jpg", "b.png"]  # names relative to the nested folder
    assert ds.skipped == []  # junk is ignored silently, not reported
    assert ds.root.name == "my photos"
    assert by_name(ds)["a.jpg"].caption == "sks, a red square"
    for rec in ds.images:
        assert rec.path.is_file() and rec.path.is_relative_to(tmp_path / "job" / "dataset")


def test_upper_case_extensions_are_used(tmp_path):
    archive = make_zip(tmp_path / "upload.zip", {"A.JPG": jpg(), "B.PNG": png(), "c.JpEg": jpg()})
    ds = stage(archive, tmp_path)
    assert sorted(by_name(ds)) == ["A.JPG", "B.PNG", "c.JpEg"]
    assert ds.skipped == []


def _mode_images() -> dict[str, bytes]:
    g16 = np.zeros((32, 32), np.uint16)
    g16[:, :8] = 65535
    g16[:, 8:16] = 32768
    g16[:, 16:] = np.linspace(0, 65535, 16, dtype=np.uint16)[None, :]  # values spanning 0..65535
    g16_img = Image.fromarray(g16)
    assert g16_img.mode == "I;16"
    buf16 = io.BytesIO()
    g16_img.save(buf16, "PNG")

    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[:, :16] = (255, 0, 0, 255)  # opaque red left half, right half fully transparent black
    buf_rgba = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf_rgba, "PNG")

    pal = Image.new("P", (32, 32), 0)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    for x in range(16):
        for y in range(32):
            pal.putpixel((x, y), 1)  # left half blue; right half index 0, which is transparent
    buf_p = io.BytesIO()
    pal.save(buf_p, "PNG", transparency=0)

    key = Image.new("RGB", (32, 32), (0, 0, 0))
    key.paste((0, 200, 0), (0, 0, 16, 32))
    buf_key = io.BytesIO()
    key.save(buf_key, "PNG", transparency=(0, 0, 0))  # RGB with a tRNS colour key: black is transparent

    return {
        "cmyk.jpg": img_bytes("JPEG", (32, 32), "CMYK", (0, 255, 255, 0)),  # red in CMYK
        "gray16.png": buf16.getvalue(),
        "rgba.png": buf_rgba.getvalue(),
        "palette.png": buf_p.getvalue(),
        "gray.png": img_bytes("PNG", (32, 32), "L", 100),
        "rgb16.png": png_rgb16(32, 32, (65535, 0, 32768)),
        "colorkey.png": buf_key.getvalue(),
        "la.png": img_bytes("PNG", (32, 32), "LA", (90, 0)),  # fully transparent grey
    }


def test_image_modes_all_become_8bit_rgb(tmp_path):
    archive = make_zip(tmp_path / "upload.zip", _mode_images())
    ds = stage(archive, tmp_path)
    assert ds.skipped == []
    recs = by_name(ds)
    assert sorted(recs) == sorted(_mode_images())

    rgb = {}
    for name, rec in recs.items():
        img = load_rgb(rec.path, DataLimits().max_image_pixels)
        assert img.mode == "RGB", name
        assert img.size == (32, 32) == (rec.width, rec.height), name
        rgb[name] = np.asarray(img).astype(int)

    r, g, b = rgb["cmyk.jpg"][16, 16]
    assert r > 200 and g < 60 and b < 60  # still red, not inverted

    g16 = rgb["gray16.png"]
    assert (g16[:, :8] == 255).all()  # 65535 -> 255
    assert (abs(g16[:, 8:16] - 128) <= 1).all()  # mid value -> ~128
    assert g16[:, 16].max() == 0 and g16[:, 31].min() == 255  # the full 16-bit range maps to 0..255
    assert (np.diff(g16[0, 16:, 0]) >= 0).all()  # and stays ordered

    assert (rgb["rgba.png"][:, :16] == (255, 0, 0)).all()
    assert (rgb["rgba.png"][:, 16:] == 255).all()  # transparent comes out white, not black
    assert (rgb["palette.png"][:, :16] == (0, 0, 255)).all()
    assert (rgb["palette.png"][:, 16:] == 255).all()
    assert (rgb["colorkey.png"][:, :16] == (0, 200, 0)).all()
    assert (rgb["colorkey.png"][:, 16:] == 255).all()
    assert (rgb["la.png"] == 255).all()
    assert (rgb["gray.png"] == 100).all()
    assert (rgb["rgb16.png"] == (255, 0, 128)).all()


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    img = Image.new("RGB", (40, 20), (10, 10, 10))
    img.paste((250, 250, 250), (0, 0, 20, 20))  # the left half is bright
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    archive = make_zip(tmp_path / "upload.zip", {"rotated.jpg": buf.getvalue()})

    ds = stage(archive, tmp_path)
    rec = by_name(ds)["rotated.jpg"]
    assert (rec.width, rec.height) == (20, 40)
    loaded = load_rgb(rec.path, DataLimits().max_image_pixels)
    assert loaded.size == (20, 40)
    arr = np.asarray(loaded).astype(int)
    assert arr[:20].mean() > 200 and arr[20:].mean() < 60  # rotated clockwise: the bright half is on top


def test_caption_sources_precedence_and_trigger_word(tmp_path):
    metadata = (
        "\n".join(
            [
                '{"file_name": "a.jpg", "text": "from jsonl a"}',
                '{"file_name": "b.jpg", "text": "from  jsonl\\tb"}',
                "",
                "not json",
            ]
        )
        + "\n"
    )
    captions_csv = 'file_name,text\r\na.jpg,from csv a\r\nb.jpg,from csv b\r\nc.jpg,"from csv, c"\r\n'
    archive = make_zip(
        tmp_path / "upload.zip",
        {
            "a.jpg": jpg(),
            "b.jpg": jpg(),
            "c.jpg": jpg(),
            "d.jpg": jpg(),
            "e.jpg": jpg(),
            "f.jpg": jpg(),
            "a.txt": b"\xef\xbb\xbfa photo of\r\na dog \r\n",  # UTF-8 BOM and CRLF
            "e.txt": b"SKS dog",
            "f.txt": b"",
            "metadata.jsonl": metadata.encode(),
            "captions.csv": captions_csv.encode(),
        },
    )
    ds = stage(archive, tmp_path, trigger_word="sks", default_caption="a photo")
    got = {n: (r.caption, r.caption_source) for n, r in by_name(ds).items()}
    assert got == {
        "a.jpg": ("sks, a photo of a dog", "txt"),  # .txt beats metadata.jsonl and captions.csv
        "b.jpg": ("sks, from jsonl b", "metadata.jsonl"),  # metadata.jsonl beats captions.csv
        "c.jpg": ("sks, from csv, c", "captions.csv"),
        "d.jpg": ("sks, a photo", "default"),
        "e.jpg": ("SKS dog", "txt"),  # trigger already there: not duplicated
        "f.jpg": ("sks", "txt"),  # empty caption: the trigger word alone
    }
    for caption, _ in got.values():
        assert "\ufeff" not in caption and "\r" not in caption and "\n" not in caption
    # the caption tables themselves are not reported as skipped; the bad jsonl line is, with its line number
    assert [n for n, _ in ds.skipped] == ["metadata.jsonl:4"]


def test_default_caption_empty_gives_trigger_word_alone(tmp_path):
    archive = make_zip(tmp_path / "upload.zip", {"a.png": png()})
    assert by_name(stage(archive, tmp_path, trigger_word="ohwx"))["a.png"].caption == "ohwx"
    ds = stage(archive, tmp_path, job="job2")
    assert by_name(ds)["a.png"].caption == "" and by_name(ds)["a.png"].caption_source == "default"


def test_captions_in_nested_folder_with_jsonl_paths(tmp_path):
    """metadata.jsonl file names are relative to the jsonl's own folder."""
    archive = make_zip(
        tmp_path / "upload.zip",
        {
            "set/sub/x.png": png(),
            "set/sub/metadata.jsonl": b'{"file_name": "x.png", "text": "nested x"}\n',
            "set/y.png": png(),
        },
    )
    ds = stage(archive, tmp_path)
    assert by_name(ds)["sub/x.png"].caption == "nested x"
    assert by_name(ds)["y.png"].caption_source == "default"


def test_add_trigger_word_rules():
    assert add_trigger_word("a dog", "sks") == "sks, a dog"
    assert add_trigger_word("a dog", "sks", "append") == "a dog, sks"
    assert add_trigger_word("photo of SKS dog", "sks") == "photo of SKS dog"
    assert add_trigger_word("sksx dog", "sks") == "sks, sksx dog"  # a longer word is not the trigger
    assert add_trigger_word("", "sks") == "sks"
    assert add_trigger_word("a dog", "") == "a dog"


def test_read_caption_file_tidies_text(tmp_path):
    p = tmp_path / "c.txt"
    p.write_bytes(b"\xef\xbb\xbf  line one\r\n\r\nline   two\rline three\n")
    assert read_caption_file(p) == "line one line two line three"
    p.write_bytes("caf\xe9 latin-1".encode("latin-1"))  # not UTF-8: still read
    assert read_caption_file(p) == "caf\xe9 latin-1"


def test_unusable_files_are_skipped_with_reasons(tmp_path):
    rng = np.random.default_rng(0)
    archive = make_zip(
        tmp_path / "upload.zip",
        {
            "good.jpg": jpg(),
            "x.png": rng.integers(0, 256, 2000, dtype=np.uint8).tobytes(),  # corrupt image
            "truncated.png": png((64, 64))[:60],
            "orphan.txt": b"a caption without an image",
            "y.gif": img_bytes("GIF", (32, 32), "P", 1),
            "z.heic": b"\x00\x00\x00\x18ftypheic",
            "notes.md": b"# notes",
            "tiny.png": png((8, 8)),
            "good.png": png(),  # same name as good.jpg: only one is used
        },
    )
    ds = stage(archive, tmp_path)
    assert [r.name for r in ds.images] == ["good.jpg"]
    reasons = dict(ds.skipped)
    assert set(reasons) == {
        "x.png",
        "truncated.png",
        "orphan.txt",
        "y.gif",
        "z.heic",
        "notes.md",
        "tiny.png",
        "good.png",
    }
    assert "cannot be decoded" in reasons["x.png"]
    assert "cannot be decoded" in reasons["truncated.png"]
    assert "no image" in reasons["orphan.txt"]
    assert "unsupported image format .gif" in reasons["y.gif"]
    assert "unsupported image format .heic" in reasons["z.heic"]
    assert "not an image" in reasons["notes.md"]
    assert "too small" in reasons["tiny.png"]
    assert "same name" in reasons["good.png"]


def test_no_usable_image_fails_with_reason(tmp_path):
    archive = make_zip(tmp_path / "upload.zip", {"x.png": b"not a png at all" * 10, "notes.md": b"# notes"})
    with pytest.raises(DatasetError) as ei:
        stage(archive, tmp_path)
    msg = str(ei.value)
    assert "no usable image" in msg
    assert "x.png" in msg and "cannot be decoded" in msg and "notes.md" in msg
    assert not (tmp_path / "job" / "dataset").exists()  # the failed job leaves nothing extracted


def test_empty_archive_fails(tmp_path):
    archive = make_zip(tmp_path / "upload.zip", {})
    with pytest.raises(DatasetError, match="no usable image"):
        stage(archive, tmp_path)


@pytest.mark.parametrize(
    "name, build",
    [
        ("data.zip", lambda p, e: make_tar(p, e, "w:gz")),  # a tar.gz called .zip
        ("data.bin", lambda p, e: make_tar(p, e, "w")),  # a plain tar with no telling extension
        ("data.tar", lambda p, e: make_zip(p, e)),  # a zip called .tar
        ("data", lambda p, e: make_zip(p, e, zipfile.ZIP_STORED)),
    ],
)
def test_archive_kind_is_detected_by_magic_bytes(tmp_path, name, build):
    archive = build(tmp_path / name, {"pics/a.png": png(), "pics/b.jpg": jpg(), "pics/b.txt": b"bee"})
    ds = stage(archive, tmp_path)
    assert sorted(by_name(ds)) == ["a.png", "b.jpg"]
    assert by_name(ds)["b.jpg"].caption == "bee"


def test_archive_kind_reads_magic_bytes(tmp_path):
    assert archive_kind(make_tar(tmp_path / "x.zip", {"a": b"1"}, "w:gz")) == "tar.gz"
    assert archive_kind(make_tar(tmp_path / "x.tgz", {"a": b"1"}, "w")) == "tar"
    assert archive_kind(make_zip(tmp_path / "x.tar", {"a": b"1"})) == "zip"


def test_non_archive_file_is_refused(tmp_path):
    fake = tmp_path / "data.zip"
    fake.write_text("this is just text, not an archive\n" * 20)
    with pytest.raises(DatasetError, match="not a zip, tar or tar.gz"):
        stage(fake, tmp_path)
    empty = tmp_path / "empty.zip"
    empty.write_bytes(b"")
    with pytest.raises(DatasetError):
        stage(empty, tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        stage(tmp_path / "missing.zip", tmp_path)


def test_corrupt_archives_raise_dataset_error(tmp_path):
    whole = make_zip(tmp_path / "whole.zip", {"a.png": png(), "b.png": png()}).read_bytes()
    (tmp_path / "cut.zip").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DatasetError, match="cannot be unpacked"):
        stage(tmp_path / "cut.zip", tmp_path)
    assert not (tmp_path / "job" / "dataset").exists()

    noise = np.random.default_rng(2).integers(0, 256, 20_000, dtype=np.uint8).tobytes()  # incompressible
    tgz = make_tar(tmp_path / "whole.tgz", {"a.png": png(), "b.bin": noise}).read_bytes()
    (tmp_path / "cut.tgz").write_bytes(tgz[: len(tgz) // 2])
    with pytest.raises(DatasetError, match="cannot be unpacked"):
        stage(tmp_path / "cut.tgz", tmp_path, job="job2")
    assert not (tmp_path / "job2" / "dataset").exists()


def test_unsupported_zip_compression_is_a_dataset_error(tmp_path):
    """E.g. Deflate64, which Windows Explorer writes for large files and Python cannot read."""
    data = bytearray(make_zip(tmp_path / "ok.zip", {"a.png": png()}, zipfile.ZIP_STORED).read_bytes())
    assert data[:4] == b"PK\x03\x04"
    data[8:10] = struct.pack("<H", 9)  # local header: method 9 (Deflate64)
    central = data.index(b"PK\x01\x02")
    data[central + 10 : central + 12] = struct.pack("<H", 9)
    (tmp_path / "d64.zip").write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="cannot be unpacked"):
        stage(tmp_path / "d64.zip", tmp_path)
    assert not (tmp_path / "job" / "dataset").exists()


def test_zip_with_invalid_utf8_name_is_a_dataset_error(tmp_path):
    data = make_zip(tmp_path / "ok.zip", {"a\u00e9b.png": png()}).read_bytes()  # stored with the UTF-8 flag
    assert data.count("\u00e9".encode()) == 2  # local header and central directory
    (tmp_path / "bad.zip").write_bytes(data.replace("\u00e9".encode(), b"\xff\xff"))
    with pytest.raises(DatasetError, match="cannot be unpacked"):
        stage(tmp_path / "bad.zip", tmp_path)
    assert not (tmp_path / "job" / "dataset").exists()


def test_folder_source_is_read_in_place(tmp_path):
    src = tmp_path / "upload"
    (src / "inner").mkdir(parents=True)
    (src / "inner" / "a.png").write_bytes(png())
    (src / "inner" / "a.txt").write_text("in place")
    (src / "inner" / ".DS_Store").write_bytes(b"junk")
    before = sorted(p.relative_to(src) for p in src.rglob("*"))

    ds = stage(src, tmp_path)
    rec = by_name(ds)["a.png"]
    assert rec.path == src / "inner" / "a.png"
    assert rec.caption == "in place"
    assert not (tmp_path / "job" / "dataset").exists()  # nothing copied
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before  # nothing changed


def test_folder_source_is_not_deleted_when_unusable(tmp_path):
    src = tmp_path / "upload"
    src.mkdir()
    (src / "notes.md").write_text("no images here")
    with pytest.raises(DatasetError):
        stage(src, tmp_path)
    assert (src / "notes.md").is_file()  # a user's own folder is never cleaned up


def test_folder_source_with_symlink_is_refused(tmp_path):
    src = tmp_path / "upload"
    src.mkdir()
    (src / "a.png").write_bytes(png())
    secret = tmp_path / "secret.png"
    secret.write_bytes(png())
    os.symlink(secret, src / "b.png")
    with pytest.raises(UnsafeArchiveError, match="b.png"):
        stage(src, tmp_path)


def test_restaging_replaces_the_previous_dataset(tmp_path):
    first = make_zip(tmp_path / "first.zip", {"a.png": png(), "b.png": png()})
    second = make_zip(tmp_path / "second.zip", {"c.png": png()})
    stage(first, tmp_path)
    ds = stage(second, tmp_path)
    assert sorted(by_name(ds)) == ["c.png"]
    assert sorted(p.name for p in (tmp_path / "job" / "dataset").rglob("*")) == ["c.png"]


def test_dataset_hash_is_stable_and_tracks_content(tmp_path):
    entries = {"a.png": png(), "b.jpg": jpg(), "b.txt": b"bee"}
    h1 = stage(make_zip(tmp_path / "1.zip", entries), tmp_path, job="j1").dataset_hash
    h2 = stage(make_tar(tmp_path / "2.tgz", entries), tmp_path, job="j2").dataset_hash
    assert h1 and h1 == h2  # same content, any container: same hash

    changed_caption = stage(make_zip(tmp_path / "3.zip", {**entries, "b.txt": b"a bee"}), tmp_path, job="j3")
    assert changed_caption.dataset_hash != h1
    changed_image = stage(
        make_zip(tmp_path / "4.zip", {**entries, "a.png": png(color=(1, 2, 3))}), tmp_path, job="j4"
    )
    assert changed_image.dataset_hash != h1
    with_trigger = stage(make_zip(tmp_path / "5.zip", entries), tmp_path, trigger_word="sks", job="j5")
    assert with_trigger.dataset_hash != h1  # the captions trained on changed


def test_report_lines_and_report_mention_skipped_files(tmp_path):
    archive = make_zip(
        tmp_path / "upload.zip",
        {
            "a.png": png(),
            "a.txt": b"hello",
            "b.png": png(),
            "y.gif": img_bytes("GIF", (32, 32), "P", 1),
            "notes.md": b"# notes",
        },
    )
    ds = stage(archive, tmp_path)
    lines = dataset_report_lines(ds, {"64px 64x64": 2})
    text = "\n".join(lines)
    assert lines[0] == "dataset: 2 images used, 2 files skipped"
    assert "default (1)" in text and "txt (1)" in text
    assert any("y.gif" in ln and "unsupported image format .gif" in ln for ln in lines)
    assert any("notes.md" in ln and "not an image" in ln for ln in lines)
    assert "64px 64x64: 2" in text

    report = ds.report()
    assert report["images_used"] == 2 and report["dataset_hash"] == ds.dataset_hash
    assert {"name": "y.gif", "reason": dict(ds.skipped)["y.gif"]} in report["skipped"]
    assert {"name": "a.png", "size": [32, 32], "caption": "hello", "caption_source": "txt"} in report[
        "images"
    ]


# --------------------------------------------------------------------------------------------
# unsafe archives


def assert_refused(archive: Path, tmp_path: Path, needle: str, limits: DataLimits = DataLimits()) -> str:
    """Staging refuses ``archive`` naming ``needle`` and leaves nothing anywhere but the job folder."""
    job = tmp_path / "job"
    job.mkdir(exist_ok=True)
    with pytest.raises(UnsafeArchiveError) as ei:
        stage_dataset(archive, job, limits, trigger_word="sks", default_caption="x")
    msg = str(ei.value)
    assert needle in msg, msg
    assert not (job / "dataset").exists()  # nothing half-extracted stays behind
    outside = [p for p in tmp_path.rglob("*") if p != archive and p != job and not p.is_relative_to(job)]
    assert outside == []
    assert not any(p.name == "evil.txt" for p in tmp_path.rglob("*"))
    assert list(job.rglob("*")) == []
    return msg


@pytest.mark.parametrize(
    "entry",
    [
        "../evil.txt",
        "a/../../evil.txt",
        "..\\evil.txt",
        "ok/..\\..\\evil.txt",
        "/tmp/evil.txt",
        "C:/evil.txt",
        "C:\\evil.txt",
        "\\\\server\\share\\evil.txt",
    ],
)
def test_zip_path_escapes_are_refused(tmp_path, entry):
    archive = make_zip(tmp_path / "data.zip", [("a.png", png()), (entry, b"pwned")])
    assert_refused(archive, tmp_path, repr(entry))


def test_zip_absolute_path_into_tmp_is_refused(tmp_path):
    target = tmp_path / "evil.txt"
    archive = make_zip(tmp_path / "data.zip", [("a.png", png()), (str(target), b"pwned")])
    assert_refused(archive, tmp_path, str(target))
    assert not target.exists()


def test_zip_symlink_entry_is_refused(tmp_path):
    link = zipfile.ZipInfo("pics/link.png")
    link.create_system = 3
    link.external_attr = 0o120777 << 16
    archive = make_zip(tmp_path / "data.zip", [("pics/a.png", png()), (link, b"../../evil.txt")])
    msg = assert_refused(archive, tmp_path, "pics/link.png")
    assert "link" in msg


def test_zip_special_file_is_refused(tmp_path):
    fifo = zipfile.ZipInfo("pipe")
    fifo.create_system = 3
    fifo.external_attr = 0o010644 << 16  # S_IFIFO
    archive = make_zip(tmp_path / "data.zip", [("a.png", png()), (fifo, b"")])
    assert_refused(archive, tmp_path, "pipe")


@pytest.mark.parametrize(
    "member, needle",
    [
        (tar_member("evil_link.png", kind=tarfile.SYMTYPE, linkname="../evil.txt"), "evil_link.png"),
        (tar_member("abs_link.png", kind=tarfile.SYMTYPE, linkname="/etc/passwd"), "abs_link.png"),
        (tar_member("hard.png", kind=tarfile.LNKTYPE, linkname="a.png"), "hard.png"),
        (tar_member("dev", kind=tarfile.CHRTYPE), "dev"),
        (tar_member("blk", kind=tarfile.BLKTYPE), "blk"),
        (tar_member("fifo", kind=tarfile.FIFOTYPE), "fifo"),
    ],
)
@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_tar_links_and_special_files_are_refused(tmp_path, member, needle, mode):
    archive = make_tar(tmp_path / "data.tar", [tar_member("a.png", png()), member], mode)
    assert_refused(archive, tmp_path, needle)


@pytest.mark.parametrize("entry", ["../evil.txt", "a/../../evil.txt", "/tmp/evil.txt", "..\\evil.txt"])
def test_tar_gz_path_escapes_are_refused(tmp_path, entry):
    # the good image comes first, so it is extracted before the bad entry is met
    archive = make_tar(tmp_path / "data.tgz", [tar_member("a.png", png()), tar_member(entry, b"pwned")])
    assert_refused(archive, tmp_path, repr(entry))


def test_tar_gz_absolute_path_into_tmp_is_refused(tmp_path):
    target = tmp_path / "evil.txt"
    archive = make_tar(tmp_path / "data.tgz", [tar_member("a.png", png()), tar_member(str(target), b"pwned")])
    assert_refused(archive, tmp_path, str(target))


def test_too_many_entries_zip(tmp_path):
    archive = make_zip(tmp_path / "data.zip", {f"{i}.png": png() for i in range(10)})
    msg = assert_refused(archive, tmp_path, "limit", DataLimits(max_files=5))
    assert "5" in msg


def test_too_many_entries_tar_gz(tmp_path):
    archive = make_tar(tmp_path / "data.tgz", {f"{i}.png": png() for i in range(10)})
    msg = assert_refused(archive, tmp_path, "limit", DataLimits(max_files=5))
    assert "5" in msg


def test_file_count_limit_counts_files_not_only_entries(tmp_path):
    src = tmp_path / "upload"
    src.mkdir()
    for i in range(10):
        (src / f"{i}.png").write_bytes(png())
    with pytest.raises(UnsafeArchiveError, match="limit"):
        stage(src, tmp_path, DataLimits(max_files=5))
    assert len(list(src.iterdir())) == 10


def test_too_many_bytes_zip(tmp_path):
    big = np.random.default_rng(1).integers(0, 256, 50_000, dtype=np.uint8).tobytes()
    archive = make_zip(tmp_path / "data.zip", {"a.png": png(), "big.bin": big})
    msg = assert_refused(archive, tmp_path, "big.bin", DataLimits(max_bytes=10_000))
    assert "10000" in msg


def test_too_many_bytes_zip_highly_compressible(tmp_path):
    """A zip bomb in miniature: 50 KB of zeros compresses to almost nothing."""
    archive = make_zip(tmp_path / "data.zip", {"a.png": png(), "zeros.bin": bytes(50_000)})
    assert archive.stat().st_size < 10_000
    assert_refused(archive, tmp_path, "zeros.bin", DataLimits(max_bytes=10_000))


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_too_many_bytes_tar(tmp_path, mode):
    archive = make_tar(tmp_path / "data.tar", {"a.png": png(), "big.bin": bytes(50_000)}, mode)
    msg = assert_refused(archive, tmp_path, "big.bin", DataLimits(max_bytes=10_000))
    assert "10000" in msg


def test_byte_limit_is_cumulative_tar(tmp_path):
    archive = make_tar(tmp_path / "data.tar", {f"{i}.bin": bytes(4_000) for i in range(5)}, "w")
    assert_refused(archive, tmp_path, "2.bin", DataLimits(max_bytes=10_000))


def test_pixel_bomb_is_refused_without_decoding(tmp_path):
    archive = make_zip(tmp_path / "data.zip", {"a.png": png(), "bomb.png": bomb_png()})
    assert archive.stat().st_size < 5_000
    start = time.perf_counter()
    msg = assert_refused(archive, tmp_path, "bomb.png")
    assert time.perf_counter() - start < 5.0
    assert "50000x50000" in msg or "pixels" in msg


def test_pixel_bomb_under_pillow_limit_but_over_cap(tmp_path):
    """Between DataLimits' cap and Pillow's own limit: our cap applies, from the header alone."""
    archive = make_zip(tmp_path / "data.zip", {"a.png": png(), "big.png": bomb_png(10_000, 10_000)})
    msg = assert_refused(archive, tmp_path, "big.png")
    assert "10000x10000" in msg


def test_pixel_cap_applies_to_normal_images(tmp_path):
    archive = make_zip(tmp_path / "data.zip", {"a.png": png((100, 100))})
    msg = assert_refused(archive, tmp_path, "a.png", DataLimits(max_image_pixels=4096))
    assert "100x100" in msg and "4096" in msg
    ok = stage(archive, tmp_path, DataLimits(max_image_pixels=10_000), job="job_ok")
    assert [r.name for r in ok.images] == ["a.png"]


def test_load_rgb_refuses_bomb_directly(tmp_path):
    p = tmp_path / "bomb.png"
    p.write_bytes(bomb_png())
    with pytest.raises(UnsafeArchiveError, match="bomb.png"):
        load_rgb(p, DataLimits().max_image_pixels)


# --------------------------------------------------------------------------------------------
# decompression bombs, oversize captions, files that are never extracted

MiB = 2**20


def zip_of_zeros(path: Path, zeros_name: str, mib: int, extra: dict[str, bytes] | None = None) -> Path:
    """A zip holding ``mib`` MiB of zeros under ``zeros_name``, written in chunks (it compresses ~1000x)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
        with zf.open(zeros_name, "w", force_zip64=True) as f:
            chunk = bytes(MiB)
            for _ in range(mib):
                f.write(chunk)
    return path


class _Zeros(io.RawIOBase):
    """``size`` zero bytes as a stream, so a large tar member never sits in memory."""

    def __init__(self, size: int):
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


def tar_gz_of_zeros(path: Path, zeros_name: str, mib: int, extra: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz", compresslevel=6) as tf:
        for name, data in extra.items():
            info, _ = tar_member(name, data)
            tf.addfile(info, io.BytesIO(data))
        info, _ = tar_member(zeros_name)
        info.size = mib * MiB
        tf.addfile(info, io.BufferedReader(_Zeros(info.size)))
    return path


def folder_bytes(folder: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


@pytest.fixture()
def disk_writes(monkeypatch) -> list[int]:
    """Counts every byte staging writes to files (``[total]``), wherever it writes them."""
    import builtins

    import train.data as data

    total = [0]

    class Counted:
        def __init__(self, f):
            self._f = f

        def write(self, b) -> int:
            total[0] += len(b)
            return self._f.write(b)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

        def __getattr__(self, name):
            return getattr(self._f, name)

    def counting_open(file, mode="r", *args, **kwargs):
        f = builtins.open(file, mode, *args, **kwargs)
        return Counted(f) if any(c in mode for c in "wax+") else f

    monkeypatch.setattr(data, "open", counting_open, raising=False)
    return total


def test_zip_bomb_is_refused_before_its_bytes_reach_the_disk(tmp_path, disk_writes):
    """The issue's archive, smaller: a 256 MiB file of zeros (a 0.25 MB zip) next to one image."""
    archive = zip_of_zeros(tmp_path / "bomb.zip", "zeros.bin", 256, {"a.png": png()})
    assert archive.stat().st_size < MiB
    msg = assert_refused(archive, tmp_path, "'zeros.bin'")
    assert "ratio" in msg and "200x" in msg
    assert disk_writes[0] <= 2 * MiB  # refused from the declared sizes, before extracting anything
    assert folder_bytes(tmp_path / "job") == 0


def test_tar_gz_bomb_is_refused_from_its_header(tmp_path, disk_writes):
    archive = tar_gz_of_zeros(tmp_path / "bomb.tgz", "zeros.bin", 128, {"a.png": png()})
    assert archive.stat().st_size < MiB
    msg = assert_refused(archive, tmp_path, "'zeros.bin'")
    assert "ratio" in msg
    assert disk_writes[0] <= 2 * MiB
    assert folder_bytes(tmp_path / "job") == 0


def test_tar_gz_bomb_under_the_header_bound_is_stopped_while_streaming(tmp_path, disk_writes):
    """2 MiB of noise makes the archive large enough that 64 MiB of zeros passes the header bound."""
    noise = np.random.default_rng(3).integers(0, 256, 2 * MiB, dtype=np.uint8).tobytes()
    archive = tar_gz_of_zeros(tmp_path / "bomb.tgz", "x.png", 64, {"a.png": png(), "noise.png": noise})
    assert 64 * MiB < 200 * archive.stat().st_size
    msg = assert_refused(archive, tmp_path, "'x.png'")
    assert "ratio" in msg
    assert disk_writes[0] <= 2 * MiB + 24 * MiB  # the noise, then x.png until its measured ratio passes 200x
    assert folder_bytes(tmp_path / "job") == 0  # the partial file went with the rest


@pytest.mark.parametrize("container", ["zip", "tar.gz"])
def test_compressible_but_honest_entries_are_extracted(tmp_path, container):
    """8 MiB that deflates ~120x (a flat-colour raw image would): under the bound, so it is extracted."""
    rng = random.Random(5)
    flat = b"".join(rng.randbytes(4) + bytes(1020) for _ in range(8 * 1024))
    entries = {"a.png": png(), "flat.png": flat}
    archive = (
        make_zip(tmp_path / "d.zip", entries) if container == "zip" else make_tar(tmp_path / "d.tgz", entries)
    )
    assert 100 * archive.stat().st_size < len(flat) < 200 * archive.stat().st_size
    ds = stage(archive, tmp_path)
    assert [r.name for r in ds.images] == ["a.png"]
    assert "cannot be decoded" in dict(ds.skipped)["flat.png"]  # extracted whole, then read as an image


def test_image_name_does_not_exempt_an_entry_from_the_ratio_bound(tmp_path, disk_writes):
    archive = zip_of_zeros(tmp_path / "bomb.zip", "x.png", 64, {"a.png": png()})
    msg = assert_refused(archive, tmp_path, "'x.png'")
    assert "ratio" in msg
    assert disk_writes[0] <= 2 * MiB


@pytest.mark.parametrize("container", ["zip", "tar.gz"])
def test_oversize_caption_file_is_refused(tmp_path, disk_writes, container):
    caption = b"a photo of a dog " * (50 * MiB // 17)  # 50 MiB
    entries = {"a.png": png(), "a.txt": caption}
    if container == "zip":
        archive = make_zip(tmp_path / "data.zip", entries, zipfile.ZIP_STORED)  # stored: only the cap applies
    else:
        archive = make_tar(tmp_path / "data.tgz", entries)
    msg = assert_refused(archive, tmp_path, "'a.txt'")
    assert f"cap of {MiB} bytes for a caption file" in msg
    assert disk_writes[0] <= 2 * MiB


def test_oversize_caption_table_is_refused(tmp_path):
    rows = "".join(f'{{"file_name": "{i}.png", "text": "caption number {i}"}}\n' for i in range(60_000))
    assert len(rows) > MiB
    archive = make_zip(tmp_path / "data.zip", {"a.png": png(), "metadata.jsonl": rows.encode()})
    msg = assert_refused(archive, tmp_path, "'metadata.jsonl'", DataLimits(max_files=10))
    assert "caption table" in msg
    # the cap grows with the number of files an archive may hold
    ds = stage(archive, tmp_path, DataLimits(max_files=1_000), job="job_ok")
    assert [r.name for r in ds.images] == ["a.png"]


def test_oversize_caption_in_a_folder_is_refused(tmp_path):
    src = tmp_path / "upload"
    src.mkdir()
    (src / "a.png").write_bytes(png())
    (src / "a.txt").write_bytes(b"x" * (MiB + 1))
    with pytest.raises(UnsafeArchiveError, match=r"'a\.txt'.*caption file"):
        stage(src, tmp_path)


def test_files_that_are_not_images_or_captions_are_never_extracted(tmp_path):
    video = np.random.default_rng(4).integers(0, 256, 3 * MiB, dtype=np.uint8).tobytes()
    archive = make_zip(
        tmp_path / "upload.zip",
        {
            "set/a.png": png(),
            "set/a.txt": b"a cat",
            "set/video.mp4": video,
            "set/notes.md": b"# notes",
            "set/__MACOSX/._a.png": b"\x00\x05\x16\x07junk",
        },
        zipfile.ZIP_STORED,
    )
    ds = stage(archive, tmp_path)
    assert [(r.name, r.caption) for r in ds.images] == [("a.png", "a cat")]
    assert dict(ds.skipped) == {
        "video.mp4": "a video clip, and this model trains on still images (the video models: docs/video.md)",
        "notes.md": "not an image or a caption file",
    }  # junk is silent
    on_disk = {f for _, _, files in os.walk(tmp_path / "job") for f in files}
    assert on_disk == {"a.png", "a.txt"}
    assert folder_bytes(tmp_path / "job") < 10_000
    assert any("video.mp4" in line for line in dataset_report_lines(ds))


def test_weights_archives_keep_every_file(tmp_path):
    """``extract_archive`` without ``dataset_only`` (checkpoints, weights) extracts every regular file."""
    from train.data import extract_archive

    archive = zip_of_zeros(tmp_path / "weights.zip", "model.safetensors", 4, {"config.json": b"{}"})
    skipped = extract_archive(archive, tmp_path / "out", DataLimits())
    assert skipped == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    assert (tmp_path / "out" / "model.safetensors").stat().st_size == 4 * MiB


# --------------------------------------------------------------------------------------------
# the shared rules (train/dataset_rules.py, imported by client/pack.py too)


def test_shared_rules_classify_entries():
    from pathlib import PurePosixPath as P

    from train import dataset_rules as rules

    assert rules.classify(P("sub/A.JPG")) == (rules.IMAGE, "")
    assert rules.classify(P("sub/a.txt")) == (rules.CAPTION, "")
    assert rules.classify(P("sub/metadata.jsonl")) == (rules.TABLE, "")
    assert rules.classify(P("captions.csv")) == (rules.TABLE, "")
    assert rules.classify(P("__MACOSX/sub/._a.png"))[0] == rules.JUNK
    assert rules.classify(P("Thumbs.db")) == (rules.JUNK, "Windows folder metadata")
    assert rules.classify(P(".hidden/a.png")) == (rules.JUNK, "hidden file")
    kind, why = rules.classify(P("Metadata.JSONL"))
    assert kind == rules.OTHER and "'metadata.jsonl'" in why
    assert rules.classify(P("a.gif"))[1].startswith("unsupported image format .gif")
    assert rules.classify(P("a.bin")) == (rules.OTHER, "not an image or a caption file")


def test_shared_rules_size_bounds():
    from train import dataset_rules as rules

    assert rules.ratio_reason(MiB, 1) is None  # small entries: any ratio
    assert rules.ratio_reason(10_000_000, 50_000) is None  # at the bound
    assert "ratio" in (rules.ratio_reason(10_000_001, 50_000) or "")
    assert rules.oversize_reason(rules.CAPTION, MiB) is None
    assert rules.oversize_reason(rules.CAPTION, MiB + 1)
    assert rules.oversize_reason(rules.IMAGE, 10**12) is None  # images have the pixel cap instead
    assert rules.caption_size_cap(rules.TABLE, 20_000) == 20_000 * 4096
    assert rules.caption_size_cap(rules.TABLE, 1) == MiB


def test_shared_rules_caption_precedence():
    from train import dataset_rules as rules

    tables = {"metadata.jsonl": {"a.png": "j"}, "captions.csv": {"a.png": "c", "b.png": "c"}}
    assert rules.caption_source(True, "a.png", tables) == "txt"
    assert rules.caption_source(False, "a.png", tables) == "metadata.jsonl"
    assert rules.caption_source(False, "b.png", tables) == "captions.csv"
    assert rules.caption_source(False, "c.png", tables) == "default"
