"""Choosing the step to deliver: a run whose held-out loss falls then rises delivers the interior
best step's files, the rule keeps the last step when differences are noise or nothing is scored,
the CLIP scorer's scores are what they claim, and a resumed or continued run chooses among all the
job's steps exactly as one uninterrupted run does."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from conftest import RENDER_INPUT, quick_spec, train_quietly
from train.selection import Z_MIN, SelectionError, StepScores, choose_step, split_holdout, strip_trigger

LORA = "pytorch_lora_weights.safetensors"
KOHYA = "lora_kohya.safetensors"
# The tiny SDXL UNet with LoRA on its attention and its output conv, at a learning rate too high
# for it: the held-out loss falls for a few steps, then rises (measured: 0.91, 0.84, 0.96, 1.16,
# 1.23, 1.15 at steps 4..24).
RISING = {
    "steps": 24,
    "learning_rate": 0.05,
    "lora.targets": ["to_q", "to_k", "to_v", "to_out.0", "conv_out"],
    "validation.holdout": 3,
    "validation.interval": 4,
    "checkpoint_interval": 8,
}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _same_weights(a: Path, b: Path) -> bool:
    """The same tensors, exactly. Across runs the bytes may differ: safetensors writes the metadata
    map in the process's hash order."""
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(bool((x[k] == y[k]).all()) for k in x)


def write_tiny_clip(folder: Path) -> Path:
    """A random CLIP model (transformers layout) with the offline tokenizer: a scorer for tests."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from train.models.tiny_common import write_clip_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_clip_tokenizer(folder)
    torch.manual_seed(0)
    text = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("scorer") / "tiny-clip")


@pytest.fixture(scope="module")
def rising_run(tiny_weights, sample_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("rising") / "out"
    result, log = train_quietly(quick_spec(tiny_weights, "sdxl", **RISING), sample_dataset, out)
    return out, result, log


# -- the rule, on its own ------------------------------------------------------------------------------


def _records(values: dict[int, list[float]], metric: str = "val_loss") -> list[StepScores]:
    return [StepScores(step, {metric: v}) for step, v in values.items()]


def test_a_difference_within_noise_keeps_the_last_step():
    rng = random.Random(0)
    base = [1.0 + rng.gauss(0, 0.2) for _ in range(12)]
    noisy = {s: [b + rng.gauss(0, 0.05) for b in base] for s in (10, 20, 30)}
    choice = choose_step(_records(noisy), "balanced")
    assert choice.step == 30 and choice.z is not None and choice.z < Z_MIN
    assert "beyond noise" in choice.reason


def test_a_clear_paired_improvement_picks_that_step_and_says_why():
    base = [1.0 + 0.1 * i for i in range(8)]
    values = {10: [b + 0.02 for b in base], 20: [b - 0.1 for b in base], 30: base}
    values[20][0] += 0.01  # not exactly constant differences
    choice = choose_step(_records(values), "val_loss")
    assert choice.step == 20 and choice.z is not None and choice.z >= Z_MIN
    assert "step 20 beats the final step (30)" in choice.reason and "held-out loss" in choice.reason


def test_last_and_unscorable_rules_keep_the_last_step_saying_so():
    values = {10: [0.5, 0.6, 0.5], 20: [0.9, 1.0, 0.9]}
    assert choose_step(_records(values), "last").step == 20
    # the fidelity rule has no fidelity to read: it falls back, naming what to set
    fallback = choose_step(_records(values), "fidelity")
    assert fallback.step == 20 and fallback.fallback and "validation.scorer" in fallback.reason
    nothing = choose_step([StepScores(10), StepScores(20)], "balanced")
    assert nothing.step == 20 and nothing.fallback and "validation.holdout" in nothing.reason
    only = choose_step([StepScores(20, {"val_loss": [1.0, 2.0]})], "balanced")
    assert only.step == 20 and only.fallback and "validation.interval" in only.reason


def test_balanced_weighs_every_score_and_fidelity_only_its_own():
    loss = {10: [1.0, 1.1, 1.2, 1.3], 20: [2.0, 2.1, 2.3, 2.3]}  # step 10 far better in held-out loss
    fid = {10: [0.50, 0.52, 0.49, 0.51], 20: [0.80, 0.82, 0.79, 0.81]}  # step 20 far better in fidelity
    records = [StepScores(s, {"val_loss": loss[s], "fidelity": fid[s]}) for s in (10, 20)]
    assert choose_step(records, "val_loss").step == 10
    assert choose_step(records, "fidelity").step == 20
    balanced = choose_step(records, "balanced")  # the two disagree by as much: no clear winner
    assert balanced.step == 20 and balanced.z is not None and balanced.z < Z_MIN


def test_the_holdout_split_is_fixed_by_the_seed_and_must_leave_images_to_train():
    names = [f"img{i}.png" for i in range(10)]
    train, held = split_holdout(names, 3, 7)
    assert len(held) == 3 and sorted(train + held) == sorted(names)
    assert split_holdout(list(reversed(names)), 3, 7)[1] == sorted(held, reverse=True)
    assert len(split_holdout(names, 0.25, 7)[1]) == 2
    assert split_holdout(names, 0, 7) == (names, [])
    with pytest.raises(SelectionError, match="validation.holdout: 10 would hold out 10 of the 10"):
        split_holdout(names, 10, 7)


def test_a_scorer_that_is_not_there_fails_before_training_naming_the_field(
    tiny_weights, sample_dataset, tmp_path
):
    from train.loop import TrainingError

    spec = quick_spec(tiny_weights, "sdxl", **{"validation.scorer": str(tmp_path / "no-such-clip")})
    with pytest.raises(TrainingError, match="validation.scorer: .*no-such-clip.* is neither a model folder"):
        train_quietly(spec, sample_dataset, tmp_path / "out")
    (tmp_path / "not-clip").mkdir()
    (tmp_path / "not-clip" / "config.json").write_text("{}")
    spec = quick_spec(tiny_weights, "sdxl", **{"validation.scorer": str(tmp_path / "not-clip")})
    with pytest.raises(TrainingError, match="validation.scorer: cannot load .*not-clip as a CLIP model"):
        train_quietly(spec, sample_dataset, tmp_path / "out2")


def test_text_alignment_reads_the_prompt_without_the_trigger_word():
    assert strip_trigger("a photo of sks, on the moon", "sks") == "a photo of, on the moon"
    assert strip_trigger("SKS", "sks") == "SKS"  # nothing left: the prompt as it was


# -- a real run -------------------------------------------------------------------------------------------


def _kept_file(out: Path, step: int, scores: dict) -> Path:
    """A kept step's diffusers file: the top-level one for the chosen step."""
    return out / LORA if step == scores["chosen_step"] else out / "steps" / f"step-{step}" / LORA


def test_a_run_whose_heldout_loss_rises_delivers_the_interior_best_step(rising_run):
    from train.export import CHOSEN_COLOR, SHEET_CELL, SHEET_HEAD_H, SHEET_LABEL_W, SHEET_PAD

    out, result, log = rising_run
    scores = json.loads((out / "scores.json").read_text())
    loss = {s["step"]: s["val_loss"] for s in scores["steps"]}
    assert sorted(loss) == [4, 8, 12, 16, 20, 24]
    best = min(loss, key=lambda s: loss[s])
    assert loss[4] > loss[best] < loss[24], f"the held-out loss did not fall then rise: {loss}"
    assert result.chosen_step == scores["chosen_step"] == best and 4 < best < 24
    assert not scores["fallback"] and scores["z"] >= Z_MIN and f"step {best} beats" in scores["reason"]
    # the delivered files are that step's, moved to the top (stored once); every other validation
    # step is kept with its diffusers file only (one kohya copy in the output: the chosen step's)
    record = next(s for s in scores["steps"] if s["step"] == best)
    assert record["lora"] == [LORA, KOHYA] and not (out / "steps" / f"step-{best}").exists()
    assert _sha(out / LORA) != _sha(out / "steps" / "step-24" / LORA)
    assert sorted(p.name for p in (out / "steps").iterdir()) == sorted(f"step-{s}" for s in loss if s != best)
    assert [p.name for p in (out / "steps").rglob("*.safetensors")] == [LORA] * (len(loss) - 1)
    # the held-out images never trained
    report = json.loads((out / "dataset_report.json").read_text())
    assert len(report["held_out"]) == 3 and report["images_used"] == 5
    assert not set(report["held_out"]) & {i["name"] for i in report["images"]}
    config = json.loads((out / "config.json").read_text())
    assert config["chosen_step"] == best and config["selection"]["rule"] == "balanced"
    assert f"These weights are step {best}" in (out / "README.md").read_text()
    assert f"selection: step {best} delivered" in log
    # the contact sheet: one column per step, the chosen one framed; the score plot
    sheet = Image.open(out / "contact_sheet.png").convert("RGB")
    assert sheet.width == SHEET_LABEL_W + 6 * (SHEET_CELL + SHEET_PAD)
    framed = [
        c
        for c in range(6)
        if sheet.getpixel((SHEET_LABEL_W + c * (SHEET_CELL + SHEET_PAD) - 1, SHEET_HEAD_H + 20))
        == CHOSEN_COLOR
    ]
    assert framed == [sorted(loss).index(best)]
    assert Image.open(out / "scores.png").size[0] > 0


def test_the_last_rule_on_the_same_scores_delivers_the_last_step(rising_run):
    out, _, _ = rising_run
    records = [StepScores.from_json(s) for s in json.loads((out / "scores.json").read_text())["steps"]]
    assert choose_step(records, "last").step == 24
    assert (
        choose_step(records, "val_loss").step == choose_step(records, "balanced").step
    )  # loss is all there is
    fidelity = choose_step(records, "fidelity")
    assert fidelity.step == 24 and fidelity.fallback


def test_the_scorer_measures_likeness_and_prompt_agreement_of_each_step(
    tiny_weights, sample_dataset, tmp_path, tiny_clip
):
    import torch

    from train.scoring import ClipScorer

    prompts = ["sks, a red circle", "sks on a blue square"]
    spec = quick_spec(
        tiny_weights,
        "sdxl",
        steps=4,
        trigger_word="sks",
        selection="fidelity",
        **{"validation.interval": 2, "validation.scorer": str(tiny_clip), "validation.prompts": prompts},
    )
    result, _ = train_quietly(spec, sample_dataset, tmp_path / "out")
    out = tmp_path / "out"
    scores = json.loads((out / "scores.json").read_text())
    records = [StepScores.from_json(s) for s in scores["steps"]]
    assert [r.step for r in records] == [2, 4] and result is not None
    assert result.chosen_step == choose_step(records, "fidelity").step == scores["chosen_step"]
    # recompute one step's scores from its renders and the training images
    scorer = ClipScorer(tiny_clip, torch.device("cpu"))
    train_images = [Image.open(p) for p in sorted(sample_dataset.glob("*.png"))]
    reference = scorer.images(train_images)
    renders = [Image.open(out / r) for r in records[0].renders]
    assert len(renders) == 2 and "val_loss" not in records[0].samples
    fidelity = (scorer.images(renders) @ reference.T).flatten().tolist()
    assert records[0].samples["fidelity"] == pytest.approx(fidelity, abs=1e-5)
    alignment = (scorer.images(renders) * scorer.texts(["a red circle", "on a blue square"])).sum(-1).tolist()
    assert records[0].samples["text_alignment"] == pytest.approx(alignment, abs=1e-5)


# -- resumed and continued runs choose among every step of the job ------------------------------------------


def test_a_resumed_run_chooses_as_the_uninterrupted_one(rising_run, tiny_weights, sample_dataset, tmp_path):
    from train.loop import run_training

    out, straight, _ = rising_run
    ckpt = out / "checkpoints" / "step-000008"
    assert (ckpt / "carry" / "scores.json").is_file() and (ckpt / "carry" / "steps" / "step-8").is_dir()
    with contextlib.redirect_stdout(io.StringIO()):
        resumed = run_training(
            quick_spec(tiny_weights, "sdxl", **RISING), sample_dataset, tmp_path / "r", resume_from=ckpt
        )
    assert resumed is not None and resumed.chosen_step == straight.chosen_step
    a, b = (json.loads((d / "scores.json").read_text()) for d in (out, tmp_path / "r"))
    assert [s["val_loss"] for s in a["steps"]] == [s["val_loss"] for s in b["steps"]]
    for name in (LORA, KOHYA):
        assert _same_weights(out / name, tmp_path / "r" / name)
    assert (tmp_path / "r" / "contact_sheet.png").is_file()
    assert sorted(p.name for p in (tmp_path / "r" / "samples").iterdir()) == sorted(
        p.name for p in (out / "samples").iterdir()
    )


def test_continuing_a_resumable_job_equals_one_longer_run(rising_run, tiny_weights, sample_dataset, tmp_path):
    from train.loop import run_training

    out, _, _ = rising_run
    short = quick_spec(tiny_weights, "sdxl", **{**RISING, "steps": 12, "resumable": True})
    train_quietly(short, sample_dataset, tmp_path / "short")
    assert (tmp_path / "short" / "resume" / "trainer_state.json").is_file()
    archive = tmp_path / "output.zip"  # what the job delivered
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted((tmp_path / "short").rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(tmp_path / "short").as_posix())
    with contextlib.redirect_stdout(io.StringIO()):
        longer = run_training(
            quick_spec(tiny_weights, "sdxl", **RISING), sample_dataset, tmp_path / "c", resume_from=archive
        )
    assert longer is not None
    a, b = (json.loads((d / "scores.json").read_text()) for d in (out, tmp_path / "c"))
    for step in (12, 24):
        assert _same_weights(_kept_file(out, step, a), _kept_file(tmp_path / "c", step, b))
    assert [s["val_loss"] for s in a["steps"]] == [s["val_loss"] for s in b["steps"]]
    assert longer.chosen_step == a["chosen_step"] and _same_weights(out / LORA, tmp_path / "c" / LORA)


# -- the run entry renders any kept step (the real Cog server) -----------------------------------------------


def _render(server, **inputs) -> dict:
    body = {**RENDER_INPUT, "prompt": "a red circle", **inputs}
    r = server.post("/predictions", {"input": body})
    assert r.status_code == 200, r.text
    return r.json()


def _pixels(body: dict):
    import base64

    import numpy as np

    assert body["status"] == "succeeded", body.get("error") or body.get("logs", "")[-2000:]
    data = base64.b64decode(body["output"][0].split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def test_the_run_entry_renders_a_chosen_step_through_cog(rising_run, run_servers, tmp_path):
    from cogserver import data_uri

    out, result, _ = rising_run
    archive = tmp_path / "output.zip"  # what the destination version's COG_WEIGHTS points at
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(out.rglob("*")):
            if p.is_file() and p.relative_to(out).parts[0] != "checkpoints":
                zf.write(p, p.relative_to(out).as_posix())
    server = run_servers.get(str(archive))
    chosen = _pixels(_render(server))
    assert (chosen == _pixels(_render(server, step=result.chosen_step))).all()
    last = _render(server, step=24)
    # step 24 renders exactly as its kept LoRA file does when handed in as lora_weights
    lora = data_uri(out / "steps" / "step-24" / LORA)
    assert (abs(_pixels(last) - _pixels(_render(server, lora_weights=lora))) <= 2).all()
    assert abs(_pixels(last) - chosen).max() > 10, "step 24 renders like the chosen step"
    bad = _render(server, step=5)
    assert bad["status"] == "failed"
    assert (
        "step: " in bad["error"]
        and "has no step 5" in bad["error"]
        and "4, 8, 12, 16, 20, 24" in bad["error"]
    )
