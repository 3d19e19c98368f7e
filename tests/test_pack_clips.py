"""The packer and clips (client/pack.py with train/clips.py): clips count toward the upload limit,
``fit`` re-encodes them (H.264, lower quality, then smaller) until the archive fits with every
caption kept, the same clips are left out as the trainer would skip, and the trainer trains on
the result. Scaled down: a 22 MiB folder under a 12 MiB limit exercises what a 150 MiB folder under
Replicate's 100 MiB does (the full-size run's figures are in docs/video.md)."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from client.pack import PackError, PackTooLarge, pack_dataset
from train import clips
from train.data import stage_dataset
from train.dataset_rules import VideoRule

MiB = 2**20
RULE = VideoRule("wan2.1-t2v-1.3b", (9, 17), 16.0)


def noise_clip(path: Path, frames: int = 40, size=(160, 128), seed: int = 0) -> Path:
    """A clip of random frames, stored losslessly: the worst case for size (~1.5 MiB here)."""
    rng = __import__("random").Random(seed)
    images = [Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3)) for _ in range(frames)]
    return clips.write_clip(path, images, 16.0, crf=0)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clipset") / "clips"
    (folder / "sub").mkdir(parents=True)
    for i in range(5):
        noise_clip(folder / f"noise_{i}.mp4", seed=i)
        (folder / f"noise_{i}.txt").write_text(f"static number {i}, sks")
    noise_clip(folder / "sub" / "phone.MOV", seed=9)  # listed in the table: its renamed file follows
    (folder / "metadata.jsonl").write_text('{"file_name": "sub/phone.MOV", "text": "a phone clip, sks"}\n')
    noise_clip(folder / "short.mp4", frames=4)  # 0.25 s: not even 9 frames at 16 fps
    Image.new("RGB", (64, 64), (200, 30, 30)).save(folder / "still.png")
    return folder


def test_pack_fit_brings_a_clip_folder_under_the_limit_and_the_trainer_stages_it(clip_folder, tmp_path):
    total = sum(p.stat().st_size for p in clip_folder.rglob("*") if p.is_file())
    assert total > 7.5 * MiB
    limit = 5 * MiB
    with pytest.raises(PackTooLarge) as too_large:
        pack_dataset(clip_folder, tmp_path / "a.zip", limit_bytes=limit, model="wan2.1-t2v-1.3b", video=RULE)
    assert "noise_" in str(too_large.value) and "--fit" in str(too_large.value)

    out = tmp_path / "fit.zip"
    result = pack_dataset(
        clip_folder, out, limit_bytes=limit, fit=True, min_side=96, model="wan2.1-t2v-1.3b", video=RULE
    )
    assert out.stat().st_size == result.size_bytes <= limit
    assert (result.images, result.clips) == (7, 6)
    assert result.summary().startswith("packed 1 image and 6 clips")
    assert dict(result.skipped)["short.mp4"].startswith("too short: 0.25 s")
    changed = {c.path: c for c in result.changed}
    assert changed and all(c.new_bytes < c.old_bytes for c in changed.values())
    assert all(c.new_path.endswith(".mp4") for c in changed.values())
    if "sub/phone.MOV" in changed:  # renamed: the table follows
        assert changed["sub/phone.MOV"].new_path == "sub/phone.mp4"
    with zipfile.ZipFile(out) as zf:
        names = set(zf.namelist())
        assert {f"noise_{i}.txt" for i in range(5)} <= names and "metadata.jsonl" in names
        assert "short.mp4" not in names

    staged = stage_dataset(out, tmp_path / "job", video=RULE)
    captions = {r.name: (r.frames, r.caption) for r in staged.images}
    phone = "sub/phone.mp4" if "sub/phone.MOV" in changed else "sub/phone.MOV"
    assert captions[phone] == (17, "a phone clip, sks")
    assert captions["noise_0.mp4"] == (17, "static number 0, sks") and captions["still.png"][0] == 1
    assert staged.skipped == []


def test_clips_are_left_out_for_an_image_model_and_refused_where_the_trainer_would(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    noise_clip(folder / "a.mp4", frames=20, size=(64, 48))
    Image.new("RGB", (64, 64)).save(folder / "b.png")
    result = pack_dataset(folder, tmp_path / "x.zip", model="flux-dev")
    assert (result.images, result.clips) == (1, 0)
    assert "a video clip" in dict(result.skipped)["a.mp4"]
    # a clip whose frames are over the trainer's pixel cap: the whole set would be refused
    with pytest.raises(PackError, match=r"'a\.mp4': 64x48 frames are over the cap of 3000 pixels"):
        pack_dataset(folder, tmp_path / "y.zip", model="wan2.1-t2v-1.3b", max_image_pixels=3000)
    os.remove(folder / "b.png")
