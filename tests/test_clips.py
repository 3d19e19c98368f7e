"""Datasets of video clips (train/clips.py, the staging in train/data.py): what a messy clip folder
stages, which frames a sample takes, rotation and variable frame rates, and what is refused."""

from __future__ import annotations

import random
import zipfile
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from train import clips
from train.data import DataLimits, UnsafeArchiveError, stage_dataset
from train.dataset_rules import VideoRule

WAN = VideoRule(model="wan2.1-t2v-1.3b", frames=(9, 17), fps=16.0)


def frame(i: int, size=(64, 48), bar: str = "left") -> Image.Image:
    """Frame ``i``: its number in the red channel, a green bar on one side (to see rotation)."""
    img = Image.new("RGB", size, (min(255, 8 * i), 0, 80))
    w, h = size
    ImageDraw.Draw(img).rectangle([0, 0, 7, h - 1] if bar == "left" else [0, 0, w - 1, 7], fill=(0, 255, 0))
    return img


def clip(path: Path, n: int, fps: float = 16.0, **kw) -> Path:
    return clips.write_clip(path, [frame(i) for i in range(n)], fps, **kw)


def red(img: Image.Image) -> int:
    """The frame number ``frame`` drew (read where the bar is not)."""
    return round(img.getpixel((img.width - 4, img.height - 4))[0] / 8)  # type: ignore[index]


def test_a_messy_clip_archive_stages_exactly_the_right_samples_and_names_every_skip(tmp_path):
    src = tmp_path / "src" / "my clips"  # one nested top folder
    src.mkdir(parents=True)
    clip(src / "walk.mp4", 20)  # 1.25 s: 17 frames at 16 fps
    (src / "walk.txt").write_text("a person walking")
    clip(src / "SHORT.MP4", 12)  # 0.75 s: only 9 frames fit
    clip(src / "tiny.mp4", 5)  # 0.31 s: not even 9 frames at 16 fps
    clip(src / "phone.MOV", 20, rotation=-90)  # stored landscape, shown portrait (a phone's tag)
    # a variable frame rate: fast at first (20 ms apart), slow later (100 ms apart), 1.3 s in all
    clip(src / "vfr.mkv", 20, times=[0.02 * i if i < 10 else 0.2 + 0.1 * (i - 9) for i in range(20)])
    clips.write_clip(src / "web.webm", [frame(i) for i in range(18)], 16.0, codec="libvpx-vp9")
    (src / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(5000))  # a header and nothing
    frame(0).save(src / "still.PNG")
    (src / "still.txt").write_text("a still")
    (src / "notes.md").write_text("# notes")
    archive = tmp_path / "upload.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted((tmp_path / "src").rglob("*")):
            zf.write(p, p.relative_to(tmp_path / "src").as_posix())

    ds = stage_dataset(archive, tmp_path / "job", default_caption="a clip", video=WAN)
    got = {r.name: (r.frames, r.width, r.height, r.caption) for r in ds.images}
    assert got == {
        "walk.mp4": (17, 64, 48, "a person walking"),
        "SHORT.MP4": (9, 64, 48, "a clip"),
        "phone.MOV": (17, 48, 64, "a clip"),  # rotation applied: portrait
        "vfr.mkv": (17, 64, 48, "a clip"),
        "web.webm": (17, 64, 48, "a clip"),
        "still.PNG": (1, 64, 48, "a still"),  # an image is a one-frame sample
    }
    skipped = dict(ds.skipped)
    assert set(skipped) == {"tiny.mp4", "broken.mp4", "notes.md"}
    assert skipped["tiny.mp4"].startswith("too short: 0.31 s (5 frames), and 9 frames at 16 fps")
    assert "cannot be read as a video" in skipped["broken.mp4"]
    vfr = next(r for r in ds.images if r.name == "vfr.mkv")
    assert vfr.clip is not None and vfr.clip.variable_rate
    report = {e["name"]: e for e in ds.report()["images"]}
    assert report["vfr.mkv"]["clip"].endswith("variable fps, h264") and report["vfr.mkv"]["frames"] == 17


def test_frames_are_drawn_at_the_times_a_player_shows_them(tmp_path):
    path = clip(tmp_path / "a.mp4", 20, fps=8.0)  # 8 fps source, sampled at 16: each frame twice
    info = clips.probe(path, 10**8, 10**5)
    assert clips.pick_frames(info, 9, 16.0, "start") == [0, 0, 1, 1, 2, 2, 3, 3, 4]
    assert [red(f) for f in clips.decode_frames(path, info, [0, 1, 4], 10**8)] == [0, 1, 4]
    assert clips.pick_frames(info, 5, 16.0, "uniform") == [0, 4, 9, 14, 19]
    # random: a window that fits, the same for the same seed, and not always at the start
    draws = [clips.pick_frames(info, 9, 16.0, "random", random.Random(s)) for s in range(6)]
    assert draws[0] == clips.pick_frames(info, 9, 16.0, "random", random.Random(0))
    assert all(d[-1] - d[0] == 4 and d[-1] <= 19 for d in draws) and len({d[0] for d in draws}) > 1
    # variable rate: the frame on screen at each sample time
    vfr = clip(tmp_path / "v.mkv", 6, times=[0, 0.01, 0.02, 0.03, 0.5, 0.51])
    info = clips.probe(vfr, 10**8, 10**5)
    assert clips.pick_frames(info, 5, 10.0, "start") == [0, 3, 3, 3, 3]


def test_a_rotated_clip_is_decoded_as_shown(tmp_path):
    path = clip(tmp_path / "p.mp4", 4, rotation=-90)  # a phone's "rotate 90" tag
    info = clips.probe(path, 10**8, 10**5)
    assert (info.width, info.height, info.rotation) == (48, 64, 270)
    first = clips.decode_frames(path, info, [0], 10**8)[0]
    assert first.size == (48, 64)
    assert first.getpixel((24, 2))[1] > 200 and first.getpixel((24, 60))[1] < 50  # the bar is on top now


def test_an_image_model_skips_clips_naming_why(tmp_path):
    clip(tmp_path / "a.mp4", 4)
    frame(0).save(tmp_path / "b.png")
    ds = stage_dataset(tmp_path, tmp_path / "job")
    assert [r.name for r in ds.images] == ["b.png"] and ds.images[0].frames == 0
    assert "a video clip" in dict(ds.skipped)["a.mp4"] and "still images" in dict(ds.skipped)["a.mp4"]


def test_clips_over_the_limits(tmp_path):
    clip(tmp_path / "long.mp4", 40, fps=16.0)  # 2.5 s
    frame(0).save(tmp_path / "b.png")
    ds = stage_dataset(tmp_path, tmp_path / "job", video=VideoRule("m", (9,), 16.0, max_seconds=2.0))
    assert "2.5 s long, over the limit of 2 s (dataset.max_clip_seconds)" in dict(ds.skipped)["long.mp4"]
    # hostile: more frames than the cap, or frames over the pixel cap, refuse the set before decoding
    with pytest.raises(UnsafeArchiveError, match=r"'long\.mp4': more than 30 frames"):
        stage_dataset(tmp_path, tmp_path / "job", DataLimits(max_clip_frames=30), video=WAN)
    (tmp_path / "b.png").unlink()
    with pytest.raises(UnsafeArchiveError, match=r"'long\.mp4': 64x48 frames are over the cap of 3000"):
        stage_dataset(tmp_path, tmp_path / "job", DataLimits(max_image_pixels=3000), video=WAN)


def test_random_sampling_trains_each_clip_s_cached_windows_in_turn():
    """``video.sampling: random`` caches ``windows`` windows a clip; each epoch trains one of each
    clip's, the next one the next epoch, in an order that the seed fixes."""
    import torch

    from train.buckets import Placement
    from train.cache import BatchSampler, CachedItem, LatentCache

    p = Placement(64, (64, 64), (64, 64), (0, 0))
    z = torch.zeros(4, 3, 8, 8)
    items = [
        CachedItem(name, p, z, z, 0, frames=9, window=w, windows=3)
        for name in ("a.mp4", "b.mp4")
        for w in range(3)
    ]
    cache = LatentCache(items, [{}], [""], {})
    sampler = BatchSampler(cache, batch_size=1, seed=5)
    epochs = [sorted(next(sampler)[0] for _ in range(2)) for _ in range(6)]
    windows = [[(items[i].name, items[i].window) for i in e] for e in epochs]
    assert windows[:3] == [[("a.mp4", w), ("b.mp4", w)] for w in range(3)]
    assert windows[3:] == windows[:3]  # then around again
    one, two = BatchSampler(cache, batch_size=1, seed=5), BatchSampler(cache, batch_size=1, seed=5)
    assert [next(one) for _ in range(12)] == [next(two) for _ in range(12)]
