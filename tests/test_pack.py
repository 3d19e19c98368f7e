"""The client's dataset packer (client/pack.py): canonical, deterministic, streamed, under the limit.

Fixtures are built in ``tmp_path`` with Pillow; "large" means a few hundred KB against a small
``limit_bytes``, so the file runs in seconds.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from client.pack import (
    PackError,
    PackResult,
    PackTooLarge,
    largest_training_side,
    pack_dataset,
)

ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------------------------
# fixture builders


def noise(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    bands = len(mode)
    return Image.frombytes(mode, size, random.Random(seed).randbytes(size[0] * size[1] * bands))


def write_img(path: Path, img: Image.Image, fmt: str | None = None, **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **save)
    return path


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def tree_hashes(folder: Path) -> dict[str, tuple[str, float]]:
    """Every entry under ``folder`` (links included, not followed): content hash and mtime."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_symlink():
            out[rel] = ("link:" + os.readlink(p), p.lstat().st_mtime)
        elif p.is_file():
            out[rel] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime)
        else:
            out[rel] = ("dir", 0.0)
    return out


def zip_images(archive: Path) -> dict[str, Image.Image]:
    with zipfile.ZipFile(archive) as zf:
        return {
            n: Image.open(io.BytesIO(zf.read(n)))
            for n in zf.namelist()
            if Path(n).suffix.lower() in {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
        }


@pytest.fixture()
def messy(tmp_path: Path) -> Path:
    """A small dataset: captions from .txt, metadata.jsonl and captions.csv, plus junk and unrelated files."""
    d = tmp_path / "messy"
    write_img(d / "a.png", noise((40, 30), seed=1))
    write(d / "a.txt", "a photo of a\n")
    write_img(d / "c.webp", noise((32, 32), seed=2), "WEBP", lossless=True)
    write(d / "metadata.jsonl", json.dumps({"file_name": "c.webp", "text": "c from jsonl"}) + "\n")
    write_img(d / "sub" / "b.jpg", noise((48, 32), seed=3), quality=95)
    write(d / "sub" / "b.txt", "b caption")
    write_img(d / "sub" / "e.bmp", noise((20, 20), seed=4))
    write(d / "sub" / "captions.csv", "file_name,text\ne.bmp,e from csv\n")
    write_img(d / "f.tiff", noise((24, 24), seed=5))  # no caption at all
    # junk, unrelated, unusable
    write(d / "__MACOSX" / "._a.png", b"\0\5\26\7 resource fork")
    write(d / "._a.png", b"\0\5\26\7 resource fork")
    write(d / ".DS_Store", b"\0\0\0\1Bud1")
    write(d / "Thumbs.db", b"thumbs")
    write_img(d / ".hidden" / "h.png", noise((20, 20), seed=6))
    write(d / ".secret.txt", "hidden caption")
    write(d / "notes.pdf", b"%PDF-1.4 not an image")
    write(d / "orphan.txt", "a caption without an image")
    write_img(d / "anim.gif", noise((20, 20), seed=7).convert("P"), "GIF")
    write_img(d / "a.jpg", noise((40, 30), seed=8))  # same stem as a.png: not used
    write(d / "broken.png", b"\x89PNG\r\n\x1a\n not really")
    write_img(d / "tiny.png", noise((8, 8), seed=9))
    os.symlink(d / "a.png", d / "link.png")
    (tmp_path / "elsewhere").mkdir()
    write_img(tmp_path / "elsewhere" / "x.png", noise((20, 20), seed=10))
    os.symlink(tmp_path / "elsewhere", d / "linked_dir")
    return d


def big_set(folder: Path, n: int = 4, size=(600, 400)) -> Path:
    """``n`` noise PNGs of about 700 KB each, with .txt captions."""
    for i in range(n):
        write_img(folder / f"img{i}.png", noise(size, seed=100 + i), compress_level=1)
        write(folder / f"img{i}.txt", f"caption {i}")
    return folder


# --------------------------------------------------------------------------------------------
# layout and content


EXPECTED_ENTRIES = [
    "a.jpg",
    "a.txt",
    "c.webp",
    "f.tiff",
    "metadata.jsonl",
    "sub/b.jpg",
    "sub/b.txt",
    "sub/captions.csv",
    "sub/e.bmp",
]


def test_canonical_layout_and_content(messy: Path, tmp_path: Path):
    out = tmp_path / "out" / "dataset.zip"
    result = pack_dataset(messy, out)

    assert isinstance(result, PackResult)
    assert result.archive == out and out.is_file()
    assert result.size_bytes == out.stat().st_size
    assert result.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    assert result.images == 5
    assert result.captions == 4  # a (txt), b (txt), c (jsonl), e (csv); f has none
    assert result.caption_sources == {"txt": 2, "metadata.jsonl": 1, "captions.csv": 1, "none": 1}
    assert result.changed == []

    with zipfile.ZipFile(out) as zf:
        assert zf.namelist() == EXPECTED_ENTRIES  # sorted, no folders, nothing else
        for info in zf.infolist():
            assert zf.read(info) == (messy / info.filename).read_bytes()
            assert info.date_time == (1980, 1, 1, 0, 0, 0)
            assert info.external_attr == 0o100644 << 16
            assert info.extra == b"" and info.comment == b""
            stored = Path(info.filename).suffix in {".png", ".jpg", ".webp"}
            assert info.compress_type == (zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED)
        assert zf.testzip() is None

    skipped = dict(result.skipped)
    assert skipped["__MACOSX/"].startswith("macOS archive metadata")
    assert "resource fork" in skipped["._a.png"]
    assert ".DS_Store" in skipped[".DS_Store"]
    assert "Windows" in skipped["Thumbs.db"]
    assert skipped[".hidden/"] == "hidden folder"
    assert skipped[".secret.txt"] == "hidden file"
    assert skipped["notes.pdf"] == "not an image or a caption file"
    assert skipped["orphan.txt"] == "caption has no image with the same name"
    assert "unsupported image format .gif" in skipped["anim.gif"]
    # a.jpg sorts before a.png: the trainer uses a.jpg, so the packer keeps that one
    assert skipped["a.png"] == "another image has the same name (a.jpg) and was used"
    assert "cannot be read as an image" in skipped["broken.png"]
    assert "too small (8x8" in skipped["tiny.png"]
    assert "symbolic link" in skipped["link.png"]
    assert "symbolic link" in skipped["linked_dir"]
    assert "linked_dir/x.png" not in skipped  # the link was not followed
    summary = result.summary()
    assert "packed 5 images (4 with captions)" in summary and "notes.pdf" in summary


def test_archive_is_accepted_by_the_container_staging(messy: Path, tmp_path: Path):
    from train.data import stage_dataset

    result = pack_dataset(messy, tmp_path / "d.zip")
    staged = stage_dataset(result.archive, tmp_path / "job", default_caption="DEFAULT")
    got = {r.name: (r.caption, r.caption_source) for r in staged.images}
    assert set(got) == {n for n in EXPECTED_ENTRIES if Path(n).suffix not in {".txt", ".jsonl", ".csv"}}
    assert len(got) == result.images
    assert got["a.jpg"] == ("a photo of a", "txt")
    assert got["sub/b.jpg"] == ("b caption", "txt")
    assert got["c.webp"] == ("c from jsonl", "metadata.jsonl")
    assert got["sub/e.bmp"] == ("e from csv", "captions.csv")
    assert got["f.tiff"] == ("DEFAULT", "default")
    assert staged.skipped == []  # nothing in the archive is junk to the trainer


# --------------------------------------------------------------------------------------------
# determinism, streaming, progress


def test_deterministic_across_runs_and_mtimes(messy: Path, tmp_path: Path):
    first = pack_dataset(messy, tmp_path / "one.zip")
    for p in messy.rglob("*"):
        if not p.is_symlink():
            os.utime(p, (1_700_000_000, 1_700_000_000))
    second = pack_dataset(messy, tmp_path / "two.zip")
    assert first.sha256 == second.sha256
    assert (tmp_path / "one.zip").read_bytes() == (tmp_path / "two.zip").read_bytes()


def test_progress_reports_every_byte(messy: Path, tmp_path: Path):
    calls: list[tuple[int, int]] = []
    pack_dataset(messy, tmp_path / "d.zip", progress=lambda done, total: calls.append((done, total)))
    total = sum((messy / n).stat().st_size for n in EXPECTED_ENTRIES)
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_constant_memory_while_copying(tmp_path: Path):
    folder = tmp_path / "huge"
    write_img(folder / "noise.png", noise((2240, 2240), seed=11), compress_level=1)
    file_size = (folder / "noise.png").stat().st_size
    assert file_size > 14_000_000
    tracemalloc.start()
    try:
        result = pack_dataset(folder, tmp_path / "huge.zip")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.images == 1
    assert peak < file_size / 4, f"peak {peak} bytes while packing a {file_size}-byte file"


# --------------------------------------------------------------------------------------------
# the limit


def test_over_the_limit_is_refused_before_writing(tmp_path: Path):
    folder = big_set(tmp_path / "big", n=6, size=(150, 150))
    out = tmp_path / "out" / "d.zip"
    with pytest.raises(PackTooLarge) as info:
        pack_dataset(folder, out, limit_bytes=200_000)
    exc = info.value
    msg = str(exc)
    assert exc.limit == 200_000 and exc.size > 200_000
    assert f"{exc.size:,} bytes" in msg and "200,000 bytes" in msg and "100 MiB" in msg and "--fit" in msg
    sizes = sorted(
        ((f"img{i}.png", (folder / f"img{i}.png").stat().st_size) for i in range(6)), key=lambda t: -t[1]
    )
    assert [n for n, _ in exc.largest] == [n for n, _ in sizes[:5]]
    for name, _ in sizes[:5]:
        assert name in msg
    assert sizes[5][0] not in msg
    assert not out.exists() and (not out.parent.exists() or not any(out.parent.iterdir()))
    # the size named is exact: packing the same set without a limit gives that many bytes
    real = pack_dataset(folder, tmp_path / "real.zip", limit_bytes=10**9)
    assert real.size_bytes == exc.size


def test_fit_reduces_under_the_limit_without_going_below_min_side(tmp_path: Path):
    folder = big_set(tmp_path / "big", n=3)  # img0..2.png, 600x400
    # RGBA, left half transparent: must come out white
    rgba = noise((600, 400), "RGBA", seed=20)
    alpha = Image.new("L", (600, 400), 255)
    alpha.paste(0, (0, 0, 300, 400))
    rgba.putalpha(alpha)
    write_img(folder / "alpha.png", rgba, compress_level=1)
    write(
        folder / "metadata.jsonl",
        "\n".join(
            [
                json.dumps({"file_name": "alpha.png", "text": "alpha from jsonl"}),
                json.dumps({"file_name": "rot.jpg", "text": "rot from jsonl"}),
            ]
        )
        + "\n",
    )
    # EXIF orientation 6: stored 600x400, shown 400x600
    exif = Image.Exif()
    exif[0x0112] = 6
    write_img(folder / "rot.jpg", noise((600, 400), seed=21), quality=100, exif=exif.tobytes())
    write_img(folder / "sub" / "wide.tif", noise((500, 200), seed=22))
    write(folder / "sub" / "captions.csv", "image,caption\nwide.tif,wide from csv\n")
    write_img(folder / "small.png", noise((64, 64), seed=23))  # under min_side: untouched
    write(folder / "small.txt", "small caption")
    before = tree_hashes(folder)

    out = tmp_path / "fit.zip"
    min_side = 128
    result = pack_dataset(folder, out, limit_bytes=200_000, fit=True, min_side=min_side)

    assert result.size_bytes <= 200_000 and out.stat().st_size == result.size_bytes
    assert tree_hashes(folder) == before  # the input folder is untouched
    assert result.images == 7 and result.captions == 7

    images = zip_images(out)
    assert set(images) == {
        "img0.jpg",
        "img1.jpg",
        "img2.jpg",
        "alpha.jpg",
        "rot.jpg",
        "sub/wide.jpg",
        "small.png",
    }
    for name, img in images.items():
        assert min(img.size) >= min_side or name == "small.png", (name, img.size)
        assert img.getexif().get(0x0112) in (None, 1), name  # rotation applied, not tagged
    assert images["rot.jpg"].size == (128, 192)  # portrait, as shown
    assert images["sub/wide.jpg"].size == (320, 128)
    pixel = images["alpha.jpg"].convert("RGB").getpixel((40, 64))
    assert isinstance(pixel, tuple) and all(c >= 245 for c in pixel)  # flattened on white
    with zipfile.ZipFile(out) as zf:
        assert zf.read("small.png") == (folder / "small.png").read_bytes()
        names = zf.namelist()
        assert names == sorted(names, key=lambda n: Path(n).parts)
        for i in range(3):
            assert zf.read(f"img{i}.txt") == f"caption {i}".encode()  # the caption follows its image
        rows = [json.loads(line) for line in zf.read("metadata.jsonl").decode().splitlines()]
        assert rows == [
            {"file_name": "alpha.jpg", "text": "alpha from jsonl"},
            {"file_name": "rot.jpg", "text": "rot from jsonl"},
        ]
        assert zf.read("sub/captions.csv").decode() == "image,caption\nwide.jpg,wide from csv\n"
        assert not any(n.endswith(".png") and n != "small.png" for n in names)

    changed = {c.path: c for c in result.changed}
    assert "small.png" not in changed
    assert changed["img0.png"].new_path == "img0.jpg"
    assert changed["img0.png"].old_dimensions == (600, 400) and changed["img0.png"].new_dimensions == (
        192,
        128,
    )
    assert changed["rot.jpg"].old_dimensions == (400, 600) and changed["rot.jpg"].new_dimensions == (128, 192)
    assert changed["img0.png"].old_bytes == (folder / "img0.png").stat().st_size
    assert all(c.new_bytes < c.old_bytes for c in result.changed)
    assert "re-encoded" in result.summary() and "img0.png -> img0.jpg" in result.summary()
    as_json = json.loads(json.dumps(result.to_dict()))
    assert {
        "path": "img0.png",
        "new_path": "img0.jpg",
        "old_bytes": changed["img0.png"].old_bytes,
        "new_bytes": changed["img0.png"].new_bytes,
        "old_dimensions": [600, 400],
        "new_dimensions": [192, 128],
    } in as_json["changed"]

    # the container reads it: every image, with its caption
    from train.data import stage_dataset

    staged = stage_dataset(out, tmp_path / "job")
    got = {r.name: (r.caption, r.caption_source) for r in staged.images}
    assert got == {
        "img0.jpg": ("caption 0", "txt"),
        "img1.jpg": ("caption 1", "txt"),
        "img2.jpg": ("caption 2", "txt"),
        "alpha.jpg": ("alpha from jsonl", "metadata.jsonl"),
        "rot.jpg": ("rot from jsonl", "metadata.jsonl"),
        "sub/wide.jpg": ("wide from csv", "captions.csv"),
        "small.png": ("small caption", "txt"),
    }

    again = pack_dataset(folder, tmp_path / "fit2.zip", limit_bytes=200_000, fit=True, min_side=min_side)
    assert again.sha256 == result.sha256  # fit is deterministic too


def test_fit_reduces_largest_first_and_stops_when_it_fits(tmp_path: Path):
    folder = big_set(tmp_path / "big", n=3)
    write_img(folder / "huge.png", noise((900, 600), seed=30), compress_level=1)
    total = sum(p.stat().st_size for p in folder.iterdir())
    limit = total - (folder / "huge.png").stat().st_size + 100_000  # reducing huge.png alone is enough
    result = pack_dataset(folder, tmp_path / "d.zip", limit_bytes=limit, fit=True, min_side=256)
    assert [c.path for c in result.changed] == ["huge.png"]
    assert result.changed[0].new_dimensions == (384, 256)
    with zipfile.ZipFile(result.archive) as zf:
        for i in range(3):
            assert zf.read(f"img{i}.png") == (folder / f"img{i}.png").read_bytes()


def test_fit_never_upscales_and_reports_when_it_cannot_fit(tmp_path: Path):
    folder = big_set(tmp_path / "big", n=4, size=(300, 300))
    before = tree_hashes(folder)
    out = tmp_path / "d.zip"
    with pytest.raises(PackTooLarge) as info:
        pack_dataset(folder, out, limit_bytes=60_000, fit=True, min_side=256)
    msg = str(info.value)
    assert "cannot fit without going below min_side (256 px" in msg and "60,000 bytes" in msg
    assert not out.exists() and list(tmp_path.glob("*.partial")) == [] and list(tmp_path.glob(".*")) == []
    assert tree_hashes(folder) == before

    # min_side above the images: they are re-encoded at their own size, never enlarged
    result = pack_dataset(folder, out, limit_bytes=400_000, fit=True, min_side=1024)
    for name, img in zip_images(out).items():
        assert img.size == (300, 300), name
    assert all(c.new_dimensions == c.old_dimensions == (300, 300) for c in result.changed)


def test_fit_names_an_unreadable_image(tmp_path: Path):
    folder = big_set(tmp_path / "big", n=2)
    data = (folder / "img0.png").read_bytes()
    (folder / "img0.png").write_bytes(data[: len(data) // 2])  # header fine, pixels cut off
    with pytest.raises(PackError, match=r"img0\.png: cannot be read as an image"):
        pack_dataset(folder, tmp_path / "d.zip", limit_bytes=100_000, fit=True, min_side=128)
    assert not (tmp_path / "d.zip").exists()


def test_images_over_the_trainers_pixel_cap(tmp_path: Path):
    folder = tmp_path / "cap"
    write_img(folder / "big.png", noise((400, 300), seed=40))
    with pytest.raises(PackError, match=r"big\.png: 400x300 is over the trainer's cap of 50000 pixels"):
        pack_dataset(folder, tmp_path / "d.zip", max_image_pixels=50_000)
    result = pack_dataset(folder, tmp_path / "d.zip", max_image_pixels=50_000, fit=True, min_side=64)
    (img,) = zip_images(result.archive).values()
    assert img.width * img.height <= 50_000 and min(img.size) >= 64


# --------------------------------------------------------------------------------------------
# user errors, helpers, torch-free


def test_user_errors_name_the_problem(tmp_path: Path):
    with pytest.raises(PackError, match="does not exist"):
        pack_dataset(tmp_path / "nope", tmp_path / "d.zip")
    write(tmp_path / "empty" / "only.txt", "a caption")
    write(tmp_path / "empty" / "broken.jpg", b"not a jpeg")
    with pytest.raises(PackError, match=r"no usable image.*broken\.jpg: cannot be read"):
        pack_dataset(tmp_path / "empty", tmp_path / "d.zip")
    folder = big_set(tmp_path / "ok", n=1, size=(32, 32))
    with pytest.raises(PackError, match="inside the dataset folder"):
        pack_dataset(folder, folder / "d.zip")
    assert not (tmp_path / "d.zip").exists()


def test_largest_training_side():
    from train.spec import parse_spec

    assert largest_training_side(parse_spec({"resolutions": "512,1024,768"})) == 1024
    assert largest_training_side({"resolutions": [512, 768]}) == 768
    assert largest_training_side(parse_spec({})) == 1024


def test_refuses_the_caption_files_the_container_refuses(tmp_path: Path):
    folder = big_set(tmp_path / "set", n=2, size=(32, 32))
    write(folder / "img0.txt", "a very long caption " * 60_000)  # 1.2 MiB, over the 1 MiB cap
    write(folder / "orphan.txt", "x" * (2 * 2**20))  # over the cap too, but never packed
    with pytest.raises(PackError, match=r"img0\.txt: .*over the cap of 1048576 bytes for a caption file"):
        pack_dataset(folder, tmp_path / "d.zip")
    assert not (tmp_path / "d.zip").exists()

    write(folder / "img0.txt", "caption 0")
    rows = "".join(
        json.dumps({"file_name": f"img{i % 2}.png", "text": f"row {i}"}) + "\n" for i in range(40_000)
    )
    write(folder / "metadata.jsonl", rows)  # ~1.6 MiB
    with pytest.raises(PackError, match=r"metadata\.jsonl: .*caption table"):
        pack_dataset(folder, tmp_path / "d.zip", max_files=10)
    result = pack_dataset(folder, tmp_path / "d.zip")  # the table cap grows with max_files
    assert dict(result.skipped)["orphan.txt"] == "caption has no image with the same name"


def test_refuses_more_files_than_the_container_accepts(tmp_path: Path):
    folder = big_set(tmp_path / "set", n=3, size=(32, 32))  # 3 images + 3 captions
    with pytest.raises(PackError, match=r"6 files, more than the trainer's limit of 5"):
        pack_dataset(folder, tmp_path / "d.zip", max_files=5)
    assert pack_dataset(folder, tmp_path / "d.zip", max_files=6).images == 3


def test_images_the_container_would_take_for_a_bomb_are_refused_or_re_encoded(tmp_path: Path):
    """A flat-colour BMP deflates ~1000x: the trainer refuses that entry, so the packer must not write it."""
    from train.data import UnsafeArchiveError, stage_dataset

    folder = tmp_path / "flat"
    write_img(folder / "flat.bmp", Image.new("RGB", (1200, 1000), (40, 90, 200)))
    write(folder / "flat.txt", "a blue square")
    with pytest.raises(PackError, match=r"flat\.bmp: deflates from \d+ to \d+ bytes.*200x.*--fit"):
        pack_dataset(folder, tmp_path / "d.zip")
    assert not (tmp_path / "d.zip").exists()

    # what the packer would otherwise have uploaded: the container refuses it, naming the entry
    with zipfile.ZipFile(tmp_path / "naive.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(folder / "flat.bmp", "flat.bmp")
    with pytest.raises(UnsafeArchiveError, match=r"'flat\.bmp'.*ratio"):
        stage_dataset(tmp_path / "naive.zip", tmp_path / "job0")

    result = pack_dataset(folder, tmp_path / "d.zip", fit=True, min_side=512)
    assert [(c.path, c.new_path) for c in result.changed] == [("flat.bmp", "flat.jpg")]
    staged = stage_dataset(result.archive, tmp_path / "job")
    assert [(r.name, r.caption) for r in staged.images] == [("flat.jpg", "a blue square")]


def test_size_is_exact_with_non_ascii_names(tmp_path: Path):
    folder = tmp_path / "unicode"
    write_img(folder / "bild-ü" / "größe.png", noise((40, 40), seed=50))
    write(folder / "bild-ü" / "größe.txt", "ein Bild " * 50)
    with pytest.raises(PackTooLarge) as info:
        pack_dataset(folder, tmp_path / "d.zip", limit_bytes=1000)
    result = pack_dataset(folder, tmp_path / "d.zip")
    assert result.size_bytes == info.value.size
    with zipfile.ZipFile(result.archive) as zf:
        assert zf.namelist() == ["bild-ü/größe.png", "bild-ü/größe.txt"]


def test_a_ready_made_archive_is_estimated_with_its_own_image_count(tmp_path: Path):
    """An archive given to ``submit`` is not packed, but its listing says what the container will
    train on: its image count goes into the estimate (not an assumed 20), and what the container
    would refuse as a whole is refused before uploading."""
    import tarfile

    from client.errors import UserError
    from client.jobs import prepare_archive
    from train.spec import parse_spec

    archive = tmp_path / "photos.zip"  # one nested top folder and macOS junk, as people zip them
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(7):
            buf = io.BytesIO()
            noise((32, 32), seed=i).save(buf, "PNG")
            zf.writestr(f"photos/img_{i}.PNG", buf.getvalue())
            zf.writestr(f"photos/img_{i}.txt", "a photo")
        zf.writestr("photos/notes.md", "not an image")
        zf.writestr("__MACOSX/photos/._img_0.PNG", b"\0" * 10)
    flux = parse_spec({"model": "flux-dev"})
    assert prepare_archive(archive, flux, tmp_path) == (archive, 7)

    pairs = tmp_path / "pairs.tar"  # before/after pairs: 3 targets, their controls not counted
    with tarfile.open(pairs, "w") as tf:
        for i in range(3):
            for name in (f"p{i}.png", f"p{i}_control.png"):
                buf = io.BytesIO()
                noise((32, 32), seed=i).save(buf, "PNG")
                info = tarfile.TarInfo(name)
                info.size = len(buf.getvalue())
                tf.addfile(info, io.BytesIO(buf.getvalue()))
    assert prepare_archive(pairs, parse_spec({"model": "flux1-kontext-dev"}), tmp_path) == (pairs, 3)
    with pytest.raises(UserError, match="trains on single images .* 3 before/after pairs"):
        prepare_archive(pairs, flux, tmp_path)
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("readme.txt", "no images here")
    with pytest.raises(UserError, match="empty.zip: the archive holds no image"):
        prepare_archive(empty, flux, tmp_path)
    not_an_archive = write(tmp_path / "data.zip", b"hello")
    with pytest.raises(UserError, match="data.zip: not a zip, tar or tar.gz archive"):
        prepare_archive(not_an_archive, flux, tmp_path)


def test_client_pack_is_torch_free():
    code = (
        "import sys, client.pack; bad = [m for m in ('torch', 'numpy', 'diffusers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
