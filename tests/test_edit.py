"""Edit models around the loop (train/edit.py, the cache, the run entry): validation renders each
prompt on the validation controls and shows control | result; ``validation.control_images`` picks
them by name (a control without a target is never trained on); the run entry checks its input
images against what the model takes; the client sends ``--image`` files as the run entry's inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import quick_spec, train_quietly
from train.edit import GAP, result_panel, save_sample, side_by_side
from train.families import model_info
from train.inference import InputError, RenderRequest, input_images
from train.loop import TrainingError
from train.sample_data import draw_pair, write_pair_dataset

KONTEXT = "flux1-kontext-dev"


@pytest.fixture(scope="module")
def pairs_with_a_loose_control(tmp_path_factory) -> Path:
    """The pair set plus ``probe_control.png``: a control without a target (held out by construction)."""
    folder = tmp_path_factory.mktemp("pairs-loose")
    write_pair_dataset(folder, count=4)
    draw_pair(50, (80, 48))[0].save(folder / "probe_control.png")
    return folder


@pytest.fixture(scope="module")
def run(tiny_weights, pairs_with_a_loose_control, tmp_path_factory):
    spec = quick_spec(tiny_weights, KONTEXT, steps=2, **{"validation.prompts": ["make the square red"]})
    out = tmp_path_factory.mktemp("edit-run")
    result, log = train_quietly(spec, pairs_with_a_loose_control, out)
    return result, log, out


def test_validation_renders_the_loose_control_side_by_side(run, pairs_with_a_loose_control):
    result, log, out = run
    samples = sorted((out / "samples").glob("step-*.png"))
    assert samples, log
    # default: the controls without a target (here the one probe), then the first pair: two sets
    assert len(samples) == 2, [p.name for p in samples]
    with Image.open(samples[0]) as sheet:
        control = Image.open(pairs_with_a_loose_control / "probe_control.png").convert("RGB")
        # left panel: the control scaled to the result's height; then GAP px; then the result
        left_w = round(control.width * sheet.height / control.height)
        assert sheet.width > left_w + GAP
        left = np.asarray(sheet.convert("RGB").crop((0, 0, left_w, sheet.height))).astype(int)
        want = np.asarray(control.resize((left_w, sheet.height))).astype(int)
        assert np.abs(left - want).max() <= 1, "the left panel is not the control image"
        gap = np.asarray(sheet.convert("RGB").crop((left_w, 0, left_w + GAP, sheet.height)))
        assert (gap == 255).all()
    report = json.loads((out / "dataset_report.json").read_text())
    trained = {i["name"] for i in report["images"]}
    assert "probe_control.png" not in trained and len(trained) == 4


def test_validation_control_images_names_them_and_an_unknown_name_is_refused(
    tiny_weights, pairs_with_a_loose_control, tmp_path
):
    spec = quick_spec(tiny_weights, KONTEXT, steps=1, **{"validation.control_images": ["pair_02"]})
    result, _ = train_quietly(spec, pairs_with_a_loose_control, tmp_path / "a")
    assert result is not None
    samples = sorted((tmp_path / "a" / "samples").glob("step-*.png"))
    assert len(samples) == 1
    bad = quick_spec(tiny_weights, KONTEXT, steps=1, **{"validation.control_images": ["nope.png"]})
    with pytest.raises(TrainingError, match=r"validation.control_images: 'nope.png' is neither"):
        train_quietly(bad, pairs_with_a_loose_control, tmp_path / "b")


def test_side_by_side_scales_every_panel_to_the_result_height_and_the_png_says_where_the_result_is(
    tmp_path,
):
    a, b = Image.new("RGB", (40, 20), "red"), Image.new("RGB", (30, 30), "blue")
    sheet = side_by_side([a, b])
    assert sheet.size == (60 + GAP + 30, 30)
    save_sample(sheet, tmp_path / "s.png")
    with Image.open(tmp_path / "s.png") as saved:
        result = result_panel(saved)  # what the CLIP scores read: the result, not the control
        assert result.size == (30, 30) and result.convert("RGB").getcolors() == [(900, (0, 0, 255))]
    save_sample(b, tmp_path / "plain.png")
    with Image.open(tmp_path / "plain.png") as plain:
        assert result_panel(plain).size == (30, 30)


def _request(tmp_path: Path, n: int) -> RenderRequest:
    files = []
    for i in range(n):
        path = tmp_path / f"in{i}.png"
        draw_pair(i)[0].save(path)
        files.append(str(path))
    return RenderRequest(prompt="make the square red", input_images=tuple(files))


def test_the_run_entry_checks_input_images_against_the_model(tmp_path):
    kontext, plain = model_info(KONTEXT), model_info("flux-dev")
    with pytest.raises(InputError, match="input_image: FLUX.1 Kontext \\[dev\\] edits an image"):
        input_images(_request(tmp_path, 0), kontext)
    with pytest.raises(InputError, match="input_image: FLUX.1 \\[dev\\] draws from the prompt alone"):
        input_images(_request(tmp_path, 1), plain)
    with pytest.raises(
        InputError, match="input_images: 2 images given, FLUX.1 Kontext \\[dev\\] takes at most 1"
    ):
        input_images(_request(tmp_path, 2), kontext)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="input_image: broken.png cannot be read as an image"):
        input_images(RenderRequest(prompt="x", input_images=(str(tmp_path / "broken.png"),)), kontext)
    [img] = input_images(_request(tmp_path, 1), kontext)
    assert img.mode == "RGB" and img.size == (64, 64)


def test_client_image_files_become_the_run_entry_inputs(tmp_path):
    from client.cli import _image_inputs
    from client.errors import UserError
    from client.providers import _files_as_data_uris

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    draw_pair(0)[0].save(a)
    draw_pair(1)[0].save(b)
    inputs = _image_inputs([str(a), str(b)])
    assert inputs == {"input_image": a, "input_images": [b]}
    sent = _files_as_data_uris({"prompt": "p", **inputs})
    assert sent["prompt"] == "p"
    assert sent["input_image"].startswith("data:image/png;base64,")
    assert [u[:22] for u in sent["input_images"]] == ["data:image/png;base64,"]
    with pytest.raises(UserError, match="--image: .*missing.png is not a file"):
        _image_inputs([str(tmp_path / "missing.png")])


def test_the_spec_refuses_validation_controls_for_a_text_to_image_model():
    from train.spec import SpecError, parse_spec

    with pytest.raises(SpecError, match="validation.control_images: sdxl draws from the prompt alone"):
        parse_spec({"model": "sdxl", "validation": {"control_images": ["a.png"]}})
    assert parse_spec(
        {"model": KONTEXT, "validation": {"control_images": ["a.png"]}}
    ).validation.control_images


def test_match_input_image_renders_about_a_megapixel_at_the_input_images_aspect():
    from types import SimpleNamespace

    from train.inference import InferenceSession

    logs: list[str] = []
    session = SimpleNamespace(renderer=SimpleNamespace(pixel_multiple=lambda: 16), log=logs.append)
    req = RenderRequest(prompt="x")  # aspect_ratio defaults to match_input_image
    w, h = InferenceSession.size(session, req, Image.new("RGB", (300, 200)))  # type: ignore[arg-type]
    assert (w % 16, h % 16) == (0, 0) and abs(w / h - 1.5) < 0.02 and 0.95e6 < w * h <= 1024 * 1024
    assert InferenceSession.size(session, req, None) == (1024, 1024)  # type: ignore[arg-type]


def test_memory_estimates_count_the_control_tokens():
    from train.memory import estimate_peak_bytes

    klein, kontext = model_info("flux2-klein-4b"), model_info(KONTEXT)
    side = 1024 // 16
    assert klein.tokens_per_sample(1024, 512) == side * side + 512  # references are optional
    assert klein.tokens_per_sample(1024, 512, controls=2) == 3 * side * side + 512
    assert kontext.tokens_per_sample(1024, 512) == 2 * side * side + 512  # an edit model: one control
    args = ("flux2-klein-4b", 8 * 10**9, 10**7, "adamw8bit", 1024, 1)
    assert estimate_peak_bytes(*args, controls=2) > estimate_peak_bytes(*args)
