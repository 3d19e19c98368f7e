"""Before/after pairs for edit models (issue 14, docs/edit.md): the naming rules
(train/dataset_rules.py), the container's staging (train/data.py) and the client's packer
(client/pack.py), which must agree on every pair.

CPU only, no model: every fixture is a few tiny images built in code under ``tmp_path``.
"""

from __future__ import annotations

import io
import json
import random
import zipfile
from pathlib import Path, PurePosixPath

import pytest
from PIL import Image

from client.pack import PackError, pack_dataset
from train import dataset_rules as rules
from train.data import DatasetError, dataset_report_lines, stage_dataset
from train.dataset_rules import PairRule, control_target, find_pairs, parse_table
from train.families import model_info


def rule_for(model: str) -> PairRule:
    info = model_info(model)
    return PairRule(model=model, max_controls=info.max_controls, required=info.controls_required)


EDIT = rule_for("qwen-image-edit-plus")  # up to three controls
SINGLE = rule_for("qwen-image-edit")  # one control
PLAIN = rule_for("flux-dev")


def png(size=(32, 32), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def noise_png(size: tuple[int, int], seed: int) -> bytes:
    buf = io.BytesIO()
    Image.frombytes("RGB", size, random.Random(seed).randbytes(size[0] * size[1] * 3)).save(buf, "PNG")
    return buf.getvalue()


def write_tree(folder: Path, files: dict[str, bytes | str]) -> Path:
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    return folder


def jsonl(*rows: dict | str) -> str:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n"


def stage(source: Path, tmp_path: Path, pairs: PairRule = PairRule(), job: str = "job", **kw):
    job_dir = tmp_path / job
    job_dir.mkdir(exist_ok=True)
    return stage_dataset(source, job_dir, pairs=pairs, **kw)


def pairs_of(ds) -> dict[str, list[str]]:
    return {r.name: [c.name for c in r.controls] for r in ds.images}


# --------------------------------------------------------------------------------------------
# the messy pair archive (Done when 2)

MESSY: dict[str, bytes | str] = {
    # file-named pairs, a caption on the target (and one on a control, which is not used)
    "a.png": png(),
    "a_control.png": png(color=(128, 128, 128)),
    "a.txt": "make the square red",
    "a_control.txt": "a control has no caption of its own",
    # a control in a folder named control, of another size than its target
    "b.png": png((32, 32)),
    "control/b.png": png((48, 80)),
    "b.txt": "make b red",
    # upper-case extensions
    "C.PNG": png(),
    "C_control.PNG": png(color=(1, 2, 3)),
    # a first control and a further reference by file name
    "k.png": png(),
    "k_control.png": png(),
    "k_control_1.png": png(),
    # metadata.jsonl: a string, a list, a missing file, a malformed field, a target not there,
    # and a row that wins over a file-named control (d_control.png)
    "metadata.jsonl": jsonl(
        {"file_name": "d.png", "control_file_name": "before\\d.png", "text": "make d red"},
        {"file_name": "e.png", "control_file_name": ["before/e1.png", "before/e2.png"], "text": "e"},
        {"file_name": "f.png", "control_file_name": "before/missing.png", "text": "f"},
        {"file_name": "g.png", "control_file_name": 5, "text": "g"},
        {"file_name": "ghost.png", "control_file_name": "before/ghost.png", "text": "ghost"},
    ),
    "d.png": png(),
    "d_control.png": png(),
    "before/d.png": png((40, 24)),
    "e.png": png(),
    "before/e1.png": png(),
    "before/e2.png": png(),
    "f.png": png(),
    "g.png": png(),
    "before/ghost.png": png(),
    # a target without a control, a control without a target, a control that cannot be decoded
    "h.png": png(),
    "orphan_control.png": png(),
    "n.png": png(),
    "n_control.png": b"not an image at all",
    "notes.pdf": b"%PDF-1.4",
}

EXPECTED_PAIRS = {
    "C.PNG": ["C_control.PNG"],
    "a.png": ["a_control.png"],
    "b.png": ["control/b.png"],
    "d.png": ["before/d.png"],
    "e.png": ["before/e1.png", "before/e2.png"],
    "k.png": ["k_control.png", "k_control_1.png"],
}


def messy_zip(tmp_path: Path) -> Path:
    """MESSY under one top folder, with macOS junk beside it, as Finder zips a folder."""
    out = tmp_path / "messy.zip"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in MESSY.items():
            zf.writestr(f"set/{name}", data)
        zf.writestr("__MACOSX/set/._a.png", b"\x00\x05\x16\x07")
        zf.writestr("set/.DS_Store", b"\x00\x00")
    return out


def test_a_messy_pair_archive_stages_the_right_pairs_and_names_what_it_skipped(tmp_path):
    ds = stage(messy_zip(tmp_path), tmp_path, EDIT)
    assert ds.paired
    assert pairs_of(ds) == EXPECTED_PAIRS
    records = {r.name: r for r in ds.images}
    assert records["a.png"].caption == "make the square red"  # the target's caption, not the control's
    assert records["d.png"].caption == "make d red"
    control_b = records["b.png"].controls[0]
    assert (control_b.width, control_b.height) == (48, 80)  # sizes may differ from the target's
    assert control_b.path.is_file()
    assert [c.name for c in ds.loose_controls] == ["before/ghost.png", "orphan_control.png"]

    skipped = dict(ds.skipped)
    assert skipped["h.png"].startswith("has no control image: expected h_control.png, control/h.png")
    assert "before/missing.png" in skipped["f.png"] and "not in the dataset" in skipped["f.png"]
    assert "has no control image" in skipped["g.png"]  # its row is malformed: no control
    assert "control_file_name must be a file name or a list" in skipped["metadata.jsonl:4"]
    assert skipped["orphan_control.png"].startswith("control image has no target image")
    assert "ghost.png, which is not in the dataset" in skipped["before/ghost.png"]
    assert "metadata.jsonl names the control images of d.png" in skipped["d_control.png"]
    assert "caption of a control image" in skipped["a_control.txt"]
    assert "cannot be decoded" in skipped["n_control.png"]
    assert skipped["n.png"].startswith("pair skipped: its control image n_control.png cannot be decoded")
    assert "notes.pdf" in skipped
    assert not [n for n in skipped if "MACOSX" in n or "DS_Store" in n or n.startswith("._")]
    # no control is ever a target
    controls = {c for cs in EXPECTED_PAIRS.values() for c in cs}
    assert not controls & set(records)


def test_the_report_carries_pairs_loose_controls_and_skips(tmp_path):
    ds = stage(messy_zip(tmp_path), tmp_path, EDIT)
    report = json.loads(json.dumps(ds.report()))
    assert report["pairs"] == 6 and report["images_used"] == 6
    assert report["loose_controls"] == ["before/ghost.png", "orphan_control.png"]
    by_name = {i["name"]: i for i in report["images"]}
    assert by_name["e.png"]["controls"] == ["before/e1.png", "before/e2.png"]
    skipped = {s["name"]: s["reason"] for s in report["skipped"]}
    assert {"h.png", "f.png", "n.png", "n_control.png", "orphan_control.png"} <= set(skipped)
    lines = dataset_report_lines(ds)
    assert lines[1].startswith("dataset: 6 pairs (8 control images), 2 control images without a target")
    assert any("h.png" in ln and "has no control image" in ln for ln in lines)


def test_the_dataset_hash_covers_the_controls(tmp_path, pair_dataset):
    ds = stage(pair_dataset, tmp_path, SINGLE)
    assert len(ds.images) == 6 and all(len(r.controls) == 1 for r in ds.images)
    copy = write_tree(tmp_path / "copy", {p.name: p.read_bytes() for p in pair_dataset.iterdir()})
    assert stage(copy, tmp_path, SINGLE, job="same").dataset_hash == ds.dataset_hash
    Image.new("RGB", (64, 64), (1, 1, 1)).save(copy / "pair_03_control.png")
    assert stage(copy, tmp_path, SINGLE, job="changed").dataset_hash != ds.dataset_hash


# --------------------------------------------------------------------------------------------
# what a model takes


def test_a_text_to_image_model_refuses_pairs_naming_the_model_and_the_files(tmp_path, pair_dataset):
    with pytest.raises(DatasetError) as ei:
        stage(pair_dataset, tmp_path, PLAIN)
    msg = str(ei.value)
    assert "'flux-dev' trains on single images" in msg and "6 before/after pairs" in msg
    assert "pair_00_control.png" in msg and "docs/edit.md" in msg
    with pytest.raises(DatasetError, match="the model trains on single images"):
        stage(pair_dataset, tmp_path, job="default")  # PairRule() is a plain model


def test_an_edit_model_refuses_a_set_without_pairs_naming_the_three_ways(tmp_path, sample_dataset):
    with pytest.raises(DatasetError) as ei:
        stage(sample_dataset, tmp_path, rule_for("flux1-kontext-dev"))
    msg = str(ei.value)
    assert "'flux1-kontext-dev' is an edit model" in msg
    for way in ("NAME_control.ext", "control/NAME.ext", "control_file_name"):
        assert way in msg
    assert not (tmp_path / "job" / "dataset").exists()


def test_a_plain_dataset_stages_exactly_as_before(tmp_path, sample_dataset):
    before = stage(sample_dataset, tmp_path, job="plain")
    for rule in (PLAIN, PairRule(model="refs", max_controls=4)):  # a text-to-image model; optional refs
        ds = stage(sample_dataset, tmp_path, rule, job=rule.model)
        assert ds.dataset_hash == before.dataset_hash and ds.report() == before.report()
    assert not before.paired and "pairs" not in before.report()
    assert all("controls" not in i for i in before.report()["images"])
    expected = rules.DatasetHash()  # the hash as it always was: names, bytes, captions
    for r in before.images:
        expected.add(r.name, r.path, r.caption)
    assert before.dataset_hash == expected.hexdigest()


def test_a_file_merely_named_like_a_control_is_an_ordinary_image_without_pairs(tmp_path):
    folder = write_tree(tmp_path / "set", {"remote_control.png": png(), "tv.png": png()})
    ds = stage(folder, tmp_path, PLAIN)
    assert sorted(pairs_of(ds)) == ["remote_control.png", "tv.png"] and ds.skipped == []


def test_more_controls_than_the_model_takes_skip_the_pair(tmp_path):
    folder = write_tree(
        tmp_path / "set",
        {
            "k.png": png(),
            "k_control.png": png(),
            "k_control_1.png": png(),
            "a.png": png(),
            "a_control.png": png(),
        },
    )
    ds = stage(folder, tmp_path, SINGLE)
    assert pairs_of(ds) == {"a.png": ["a_control.png"]}
    skipped = dict(ds.skipped)
    assert skipped["k.png"] == "has 2 control images; model 'qwen-image-edit' takes at most 1"
    assert "its pair was skipped" in skipped["k_control.png"] and "k_control_1.png" in skipped
    assert pairs_of(stage(folder, tmp_path, EDIT, job="plus"))["k.png"] == [
        "k_control.png",
        "k_control_1.png",
    ]


def test_a_control_too_small_skips_its_pair(tmp_path):
    folder = write_tree(
        tmp_path / "set",
        {"a.png": png(), "a_control.png": png((8, 8)), "b.png": png(), "b_control.png": png()},
    )
    ds = stage(folder, tmp_path, SINGLE)
    assert pairs_of(ds) == {"b.png": ["b_control.png"]}
    assert "too small (8x8" in dict(ds.skipped)["a_control.png"]
    assert "a_control.png too small" in dict(ds.skipped)["a.png"]


# --------------------------------------------------------------------------------------------
# the naming rules (shared by both sides)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("a_control.png", ("a", 0)),
        ("sub/a_control.JPG", ("sub/a", 0)),
        ("control/a.png", ("a", 0)),
        ("sub/control/a.webp", ("sub/a", 0)),
        ("a_control_1.png", ("a", 1)),
        ("a_control_12.png", ("a", 12)),
        ("my_photo_Control_2.png", ("my_photo", 2)),
        ("a.png", None),
        ("controls/a.png", None),
        ("a_controller.png", None),
    ],
)
def test_control_names(name, expected):
    assert control_target(PurePosixPath(name)) == expected


def test_further_references_follow_the_first_in_numeric_order():
    p = find_pairs(
        [
            "a.png",
            "a_control_10.png",
            "a_control_2.png",
            "a_control.png",
            "b.png",
            "b_control_2.png",
            "b_control_1.png",
        ]
    )
    assert p.controls == {
        "a.png": ["a_control.png", "a_control_2.png", "a_control_10.png"],
        "b.png": ["b_control_1.png", "b_control_2.png"],
    }
    both = find_pairs(["a.png", "a_control.png", "control/a.png"])
    assert both.controls == {"a.png": ["a_control.png"]}
    assert both.unused[0][0] == "control/a.png" and "already a.png's control image" in both.unused[0][1]


def test_metadata_jsonl_control_file_name_rows():
    raw = jsonl(
        {"file_name": "a.png", "control_file_name": "in\\a.png", "text": " make  it red "},
        {"file_name": "b.png", "control_file_name": ["x.png", "y.png"]},  # caption from b.txt
        {"file_name": "c.png", "control_file_name": []},
        {"file_name": "d.png", "control_file_name": ["d.png"], "text": "d"},
        {"file_name": "e.png"},
        {"file_name": "f.png", "control_file_name": ["x.png", 3], "text": "f"},
    ).encode()
    t = parse_table("metadata.jsonl", raw, PurePosixPath("sub"))
    assert t.captions == {"sub/a.png": "make it red"}
    assert t.controls == {"sub/a.png": ["sub/in/a.png"], "sub/b.png": ["sub/x.png", "sub/y.png"]}
    problems = dict(t.problems)
    assert "empty list" in problems[3] and "own file_name" in problems[4]
    assert problems[5] == 'not a JSON object with "file_name" and "text"'
    assert "list of file names" in problems[6]
    # the old two-value form is unchanged
    assert rules.parse_caption_table("metadata.jsonl", raw, PurePosixPath("sub")) == (t.captions, t.problems)


def test_a_control_two_rows_share_is_a_control_of_both(tmp_path):
    folder = write_tree(
        tmp_path / "set",
        {
            "red.png": png(),
            "blue.png": png(color=(0, 0, 200)),
            "base.png": png(color=(128, 128, 128)),
            "metadata.jsonl": jsonl(
                {"file_name": "red.png", "control_file_name": "base.png", "text": "make it red"},
                {"file_name": "blue.png", "control_file_name": "base.png", "text": "make it blue"},
            ),
        },
    )
    ds = stage(folder, tmp_path, SINGLE)
    assert pairs_of(ds) == {"blue.png": ["base.png"], "red.png": ["base.png"]}
    assert ds.loose_controls == [] and ds.skipped == []


# --------------------------------------------------------------------------------------------
# the packer keeps pairs whole


def test_pack_then_stage_gives_the_same_pairs(tmp_path):
    folder = write_tree(tmp_path / "messy", MESSY)
    result = pack_dataset(folder, tmp_path / "out.zip", model="qwen-image-edit-plus")
    assert result.pairs == 6 and result.images == 6
    assert result.controls == 10 and result.loose_controls == 2  # 8 of pairs, 2 without a target
    skipped = dict(result.skipped)
    for name in ("h.png", "f.png", "g.png", "n.png", "n_control.png", "d_control.png", "a_control.txt"):
        assert name in skipped, name
    assert "control image of n.png" not in skipped["n_control.png"]  # its own reason: unreadable
    assert "n_control.png" in skipped["n.png"]
    with zipfile.ZipFile(result.archive) as zf:
        names = set(zf.namelist())
    assert {"a.png", "a_control.png", "control/b.png", "before/e2.png", "orphan_control.png"} <= names
    assert not {"h.png", "n.png", "d_control.png", "a_control.txt"} & names
    assert "pairs: 6 (with 8 control images)" in result.summary()
    ds = stage(result.archive, tmp_path, EDIT)
    assert pairs_of(ds) == EXPECTED_PAIRS
    assert [c.name for c in ds.loose_controls] == ["before/ghost.png", "orphan_control.png"]
    assert stage(folder, tmp_path, EDIT, job="folder").dataset_hash == ds.dataset_hash


def test_pack_leaves_a_pair_out_whole(tmp_path):
    folder = write_tree(
        tmp_path / "set",
        {
            "a.png": b"broken",
            "a_control.png": png(),
            "a.txt": "make a red",
            "b.png": png(),
            "b_control.png": png((8, 8)),
            "c.png": png(),
            "c_control.png": png(),
            "k.png": png(),
            "k_control.png": png(),
            "k_control_1.png": png(),
        },
    )
    result = pack_dataset(folder, tmp_path / "out.zip", model="qwen-image-edit")
    skipped = dict(result.skipped)
    assert (
        "its pair was left out" in skipped["a_control.png"] and "its image was left out" in skipped["a.txt"]
    )
    assert "b_control.png cannot be used" in skipped["b.png"] and "too small" in skipped["b_control.png"]
    assert "has 2 control images; model 'qwen-image-edit' takes at most 1" in skipped["k.png"]
    assert "k_control_1.png" in skipped
    with zipfile.ZipFile(result.archive) as zf:
        assert sorted(zf.namelist()) == ["c.png", "c_control.png"]
    assert result.pairs == 1 and result.images == 1


def test_pack_fit_shrinks_both_sides_and_the_table_follows(tmp_path):
    folder = write_tree(
        tmp_path / "set",
        {
            "x.png": noise_png((320, 200), 1),
            "src/x_in.png": noise_png((200, 320), 2),
            "y.png": noise_png((300, 300), 3),
            "y_control.png": noise_png((300, 300), 4),
            "metadata.jsonl": jsonl(
                {"file_name": "x.png", "control_file_name": ["src\\x_in.png"], "text": "make x red"},
                {"file_name": "y.png", "text": "make y red"},
            ),
        },
    )
    full = pack_dataset(folder, tmp_path / "full.zip", model="qwen-image-edit")
    assert full.size_bytes > 500_000
    result = pack_dataset(
        folder,
        tmp_path / "fit.zip",
        fit=True,
        min_side=64,
        limit_bytes=100_000,
        model="qwen-image-edit",
    )
    changed = {c.path: c for c in result.changed}
    assert set(changed) == {"x.png", "src/x_in.png", "y.png", "y_control.png"}
    assert (
        changed["src/x_in.png"].new_path == "src/x_in.jpg"
        and min(changed["src/x_in.png"].new_dimensions) == 64
    )
    assert min(changed["y_control.png"].new_dimensions) == 64
    with zipfile.ZipFile(result.archive) as zf:
        row = json.loads(zf.read("metadata.jsonl").decode().splitlines()[0])
    assert row == {"file_name": "x.jpg", "control_file_name": ["src\\x_in.jpg"], "text": "make x red"}
    ds = stage(result.archive, tmp_path, SINGLE)
    assert pairs_of(ds) == {"x.jpg": ["src/x_in.jpg"], "y.jpg": ["y_control.jpg"]}
    assert {r.name: r.caption for r in ds.images} == {"x.jpg": "make x red", "y.jpg": "make y red"}


def test_pack_checks_the_pair_rule_when_it_knows_the_model(tmp_path, pair_dataset, sample_dataset):
    with pytest.raises(PackError, match="'flux-dev' trains on single images"):
        pack_dataset(pair_dataset, tmp_path / "a.zip", model="flux-dev")
    with pytest.raises(PackError, match="'qwen-image-edit' is an edit model"):
        pack_dataset(sample_dataset, tmp_path / "b.zip", model="qwen-image-edit")
    unknown = pack_dataset(pair_dataset, tmp_path / "c.zip")  # no model: pairs packed whole, no rule
    assert unknown.pairs == 6 and unknown.controls == 6 and unknown.images == 6
    plain = pack_dataset(sample_dataset, tmp_path / "d.zip", model="flux-dev")
    assert plain.pairs == 0 and plain.to_dict()["controls"] == 0


def test_the_pack_command_passes_the_spec_model(tmp_path, pair_dataset, monkeypatch, capsys):
    from client.cli import EXIT_OK, EXIT_USER, main

    monkeypatch.setenv("ADVANCED_TRAINER_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("REPLICATE_API_TOKEN", raising=False)
    out = tmp_path / "p.zip"
    assert main(["pack", str(pair_dataset), "--out", str(out), "--set", "model=flux-dev"]) == EXIT_USER
    assert "trains on single images" in capsys.readouterr().err and not out.exists()
    code = main(["pack", str(pair_dataset), "--out", str(out), "--set", "model=flux1-kontext-dev"])
    assert code == EXIT_OK and out.is_file()
    assert "pairs: 6" in capsys.readouterr().out


def test_a_control_over_the_pixel_cap_refuses_the_archive_as_a_target_would(tmp_path):
    from train.data import DataLimits, UnsafeArchiveError

    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.png", png((32, 32)))
        zf.writestr("a_control.png", png((64, 64)))
    with pytest.raises(UnsafeArchiveError, match="a_control.png.*over the cap of 2000 pixels"):
        stage(archive, tmp_path, SINGLE, limits=DataLimits(max_image_pixels=2000))
    assert not (tmp_path / "job" / "dataset").exists()


def test_flux2_references_its_pipeline_refuses_are_skipped_packed_out_and_refused_at_the_run_entry(tmp_path):
    """Flux2ImageProcessor refuses references under 64 px a side or over 8:1: such a pair would
    train and then fail its validation render, so staging and the packer leave it out, named."""
    from train.data import stage_dataset
    from train.families import model_info
    from train.inference import InputError, RenderRequest, input_images
    from train.sample_data import write_pair_dataset

    folder = tmp_path / "refs"
    write_pair_dataset(folder, count=3, size=(96, 96))
    Image.new("RGB", (48, 48), "grey").save(folder / "pair_01_control.png")  # under 64 px
    Image.new("RGB", (900, 100), "grey").save(folder / "pair_02_control.png")  # 9:1
    rule = PairRule.of("flux2-klein-4b", model_info("flux2-klein-4b"))
    ds = stage_dataset(folder, tmp_path / "job", pairs=rule)
    assert [r.name for r in ds.images] == ["pair_00.png"]
    reasons = dict(ds.skipped)
    assert "at least 64 px a side" in reasons["pair_01_control.png"]
    assert "up to 8:1" in reasons["pair_02_control.png"]
    assert "pair_01_control.png" in reasons["pair_01.png"]
    packed = pack_dataset(folder, tmp_path / "refs.zip", model="flux2-klein-4b")
    assert packed.pairs == 1
    with pytest.raises(InputError, match="input_image: pair_01_control.png is 48x48; model 'flux2-klein-4b'"):
        input_images(
            RenderRequest(prompt="x", input_images=(str(folder / "pair_01_control.png"),)),
            model_info("flux2-klein-4b"),
        )
