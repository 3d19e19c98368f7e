"""autocaption: captions written by a vision-language model (a tiny random one of the default's class
here, greedy, so its text is deterministic) before caching; the user's own captions are never touched
under ``missing``; the captioner is gone before the denoiser loads; the captions are in the output."""

from __future__ import annotations

import gc
import json
import shutil
import weakref

import pytest

from conftest import quick_spec, train_quietly
from train.spec import SpecError, parse_spec


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    from train.autocaption import write_tiny_captioner

    return write_tiny_captioner(tmp_path_factory.mktemp("captioner") / "tiny-captioner")


def test_missing_captions_are_written_and_written_ones_kept(
    captioner, tiny_weights, sample_dataset, tmp_path, monkeypatch
):
    from train import autocaption
    from train.models.base import Family

    data = tmp_path / "data"
    shutil.copytree(sample_dataset, data)
    mine = (data / "shape_00.txt").read_text().strip()
    for k in range(1, 8):  # shape_01 ... shape_07 lose their captions
        (data / f"shape_{k:02d}.txt").unlink()
    (data / "sub").mkdir()
    shutil.move(data / "shape_07.png", data / "sub" / "shape_07.png")

    models: list[weakref.ref] = []
    real = autocaption.Captioner.__init__

    def init(self, *a, **k):
        real(self, *a, **k)
        models.append(weakref.ref(self.model))

    loads = []

    def load_denoiser(self, dtype):
        gc.collect()
        loads.append([ref() is None for ref in models])
        return real_load(self, dtype)

    real_load = Family.load_denoiser
    monkeypatch.setattr(autocaption.Captioner, "__init__", init)
    monkeypatch.setattr(Family, "load_denoiser", load_denoiser)
    spec = quick_spec(
        tiny_weights,
        steps=2,
        trigger_word="sks",
        autocaption={
            "mode": "missing",
            "captioner": str(captioner),
            "prefix": "a photo of",
            "suffix": "in flat colours",
            "max_new_tokens": 8,
            "batch_size": 3,
        },
    )
    result, log = train_quietly(spec, data, tmp_path / "out")
    assert loads == [[True]], "the captioner was still alive when the denoiser loaded"
    assert "autocaption: 7 image(s) captioned" in log

    report = json.loads((tmp_path / "out" / "dataset_report.json").read_text())
    by_name = {e["name"]: e for e in report["images"]}
    assert by_name["shape_00.png"]["caption"] == f"sks, {mine}" or by_name["shape_00.png"]["caption"] == mine
    assert by_name["shape_00.png"]["caption_source"] == "txt"
    written = {n: e["caption"] for n, e in by_name.items() if e["caption_source"] == "autocaption"}
    assert sorted(written) == sorted([f"shape_{k:02d}.png" for k in range(1, 7)] + ["sub/shape_07.png"])
    for name, caption in written.items():
        assert caption.startswith("sks, a photo of ") and caption.endswith(" in flat colours"), caption
        assert len(caption) > len("sks, a photo of  in flat colours"), "the captioner wrote nothing"
        saved = tmp_path / "out" / "captions" / (name.rsplit(".", 1)[0] + ".txt")
        assert saved.read_text().strip() == caption
    assert not (tmp_path / "out" / "captions" / "shape_00.txt").exists()

    again, _ = train_quietly(spec, data, tmp_path / "again")  # greedy: the same captions again
    report2 = json.loads((tmp_path / "again" / "dataset_report.json").read_text())
    assert [e["caption"] for e in report2["images"]] == [e["caption"] for e in report["images"]]


def test_autocaption_settings_are_checked():
    with pytest.raises(
        SpecError, match=r"autocaption\.max_new_tokens: Input should be greater than or equal to 8"
    ):
        parse_spec({"autocaption": {"mode": "all", "max_new_tokens": 0}})
    with pytest.raises(
        SpecError, match=r"autocaption\.mode: images only for now; wan2.1-t2v-1.3b trains on clips"
    ):
        parse_spec({"model": "wan2.1-t2v-1.3b", "autocaption": {"mode": "all"}})
    with pytest.raises(SpecError, match=r"autocaption\.mode: .*edit instruction"):
        parse_spec({"model": "qwen-image-edit", "autocaption": {"mode": "missing"}})


def test_the_estimate_counts_the_captioning():
    from client import pricing

    plain = parse_spec({"steps": 500})
    captioned = parse_spec({"steps": 500, "autocaption": {"mode": "missing"}})
    a, b = pricing.estimate(plain, "gpu-h100", 40), pricing.estimate(captioned, "gpu-h100", 40)
    assert b.seconds - a.seconds == pytest.approx(pricing.CAPTIONER_LOAD_S + 40 * pricing.CAPTION_S_PER_IMAGE)
    assert any("autocaption" in n and "guess" in n for n in b.notes)
