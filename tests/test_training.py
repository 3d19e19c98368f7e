"""The training loop on the tiny models: the default Flux preset round-trips, the output folder's
contract, determinism, accumulation and buckets, v-prediction, a NaN stops the run, progress lines,
machine checks, prodigy, checkpoints. What every model must do is the family contract's
(tests/test_family_contract.py)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import quick_spec, train_quietly
from train.progress import parse_progress_line


def _render(
    base: Path, family: str, lora_dir: Path | None = None, weight_name: str | None = None
) -> np.ndarray:
    from diffusers import FluxPipeline, StableDiffusionXLPipeline

    cls = FluxPipeline if family == "flux" else StableDiffusionXLPipeline
    pipe = cls.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir, **({"weight_name": weight_name} if weight_name else {}))
    kw = {"max_sequence_length": 32} if family == "flux" else {}
    out = pipe(
        "sks, a red circle on a blue background",
        num_inference_steps=3,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **kw,
    )
    return np.asarray(out.images[0])


def _tenths(losses: list[float]) -> tuple[float, float]:
    n = max(1, len(losses) // 10)
    return statistics.mean(losses[:n]), statistics.mean(losses[-n:])


def test_default_flux_lora_changes_the_image(tiny_weights, sample_dataset, tmp_path):
    """The default preset (attention + MLP of every block) round-trips through load_lora_weights."""
    spec = quick_spec(tiny_weights, "flux-dev", steps=10, learning_rate=1e-2)
    result, _ = train_quietly(spec, sample_dataset, tmp_path / "out")
    base = tiny_weights / "tiny-flux-dev"
    assert np.abs(_render(base, "flux", result.out_dir) - _render(base, "flux")).max() > 0.02


def test_output_folder_contract(tiny_weights, sample_dataset, tmp_path):
    spec = quick_spec(
        tiny_weights,
        "flux-dev",
        steps=4,
        trigger_word="sks",
        **{"validation.prompts": ["a green square"], "validation.interval": 2},
    )
    out = tmp_path / "job"
    result, log = train_quietly(spec, sample_dataset, out)

    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    # the chosen step's LoRA at the top (stored once), the other kept step's diffusers file; no kohya
    # copy for FLUX.1 by default (export.kohya: ComfyUI reads the diffusers file)
    other = 2 if result.chosen_step == 4 else 4
    assert sorted(names) == sorted(
        [
            "README.md",
            "config.json",
            "contact_sheet.png",
            "dataset_report.json",
            "loss.png",
            "pytorch_lora_weights.safetensors",
            "samples/step-000002-0.png",
            "samples/step-000004-0.png",
            "scores.json",
            "scores.png",
            f"steps/step-{other}/pytorch_lora_weights.safetensors",
        ]
    )
    assert not (out / ".work").exists(), "the staged dataset is scratch and must be cleaned up"
    with Image.open(out / "samples" / "step-000004-0.png") as img:
        assert img.size == (64, 64)
    with Image.open(out / "loss.png") as img:
        assert img.width > 300

    config = json.loads((out / "config.json").read_text())
    assert config["spec"]["trigger_word"] == "sks"
    assert config["spec"]["lora"]["alpha"] == 16.0  # defaults are resolved, not left null
    assert config["dataset_hash"] and len(config["dataset_hash"]) == 64
    assert {"stage", "load", "cache", "train", "validate", "export"} <= set(config["timings_s"])
    assert config["device"]["type"] == "cpu"
    assert {"torch", "diffusers", "peft", "accelerate", "transformers"} <= set(config["libraries"])

    report = json.loads((out / "dataset_report.json").read_text())
    assert report["images_used"] == 8 and report["buckets"]
    assert all(img["caption"].startswith("sks") or "sks" in img["caption"] for img in report["images"])

    card = (out / "README.md").read_text()
    assert "sks" in card and "load_lora_weights" in card and "samples/step-000004-0.png" in card
    assert "dataset: 8 images used" in log and "buckets" in log


def test_same_seed_same_weights_on_cpu(tiny_weights, sample_dataset, tmp_path):
    from safetensors.torch import load_file

    spec = quick_spec(tiny_weights, "flux-dev", steps=5, caption_dropout=0.3, batch_size=2)
    a, _ = train_quietly(spec, sample_dataset, tmp_path / "a")
    b, _ = train_quietly(spec, sample_dataset, tmp_path / "b")
    wa, wb = load_file(str(a.lora_file)), load_file(str(b.lora_file))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    other, _ = train_quietly(
        quick_spec(tiny_weights, "flux-dev", steps=5, caption_dropout=0.3, batch_size=2, seed=8),
        sample_dataset,
        tmp_path / "c",
    )
    wc = load_file(str(other.lora_file))
    assert any(not torch.equal(wa[k], wc[k]) for k in wa), "a different seed should train differently"


def test_accumulation_batches_and_multiple_resolutions(tiny_weights, sample_dataset, tmp_path):
    spec = quick_spec(
        tiny_weights,
        "sdxl",
        steps=3,
        batch_size=2,
        gradient_accumulation_steps=2,
        resolutions="64,128",
        lr_scheduler="cosine",
        lr_warmup_steps=1,
    )
    result, log = train_quietly(spec, sample_dataset, tmp_path / "out")
    report = json.loads((result.out_dir / "dataset_report.json").read_text())
    assert any(k.startswith("128px") for k in report["buckets"]) and any(
        k.startswith("64px") for k in report["buckets"]
    )
    lrs = [r["lr"] for r in map(parse_progress_line, log.splitlines()) if r and r["phase"] == "train"]
    assert lrs[0] < lrs[1], "warmup should raise the learning rate"


def test_sdxl_v_prediction_and_flux_schnell(tiny_weights, sample_dataset, tmp_path):
    import shutil

    vpred = tmp_path / "tiny-sdxl-v"
    shutil.copytree(tiny_weights / "tiny-sdxl", vpred)
    cfg_path = vpred / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["prediction_type"] = "v_prediction"
    cfg_path.write_text(json.dumps(cfg))
    spec = quick_spec(tiny_weights, "sdxl", steps=4, base_weights=str(vpred), **{"sdxl.snr_gamma": 5.0})
    result, log = train_quietly(spec, sample_dataset, tmp_path / "v")
    assert all(np.isfinite(v) for _, v in result.losses)

    spec = quick_spec(tiny_weights, "flux-schnell", steps=4, **{"flow.timestep_sampling": "logit_normal"})
    result, _ = train_quietly(spec, sample_dataset, tmp_path / "schnell")
    assert result.lora_file.is_file() and len(result.losses) == 4


def test_nan_loss_stops_the_run_with_a_clear_error(tiny_weights, sample_dataset, tmp_path, monkeypatch):
    from train.loop import TrainingError
    from train.models.flux.family import FluxFamily

    real_loss = FluxFamily.loss
    calls = {"n": 0}

    def exploding(self, model, batch):
        calls["n"] += 1
        loss = real_loss(self, model, batch)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(FluxFamily, "loss", exploding)
    with pytest.raises(TrainingError, match=r"loss became nan at step 3.*learning_rate"):
        train_quietly(
            quick_spec(tiny_weights, "flux-dev", steps=6, checkpoint_interval=3),
            sample_dataset,
            tmp_path / "out",
        )
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()
    assert not (tmp_path / "out" / "checkpoints").exists()  # the diverged state is never checkpointed


def test_progress_lines_every_log_every_steps_carry_the_mean_loss(tiny_weights, sample_dataset, tmp_path):
    """log_every=3: lines at 3, 6 and the last step, each the mean of the steps since the line before
    (the loss is read back from the accelerator only for these lines)."""
    every, _ = train_quietly(
        quick_spec(tiny_weights, "flux-dev", steps=7), sample_dataset, tmp_path / "every"
    )
    sparse, log = train_quietly(
        quick_spec(tiny_weights, "flux-dev", steps=7, log_every=3), sample_dataset, tmp_path / "sparse"
    )
    per_step = dict(every.losses)
    assert sorted(per_step) == list(range(1, 8))
    assert [s for s, _ in sparse.losses] == [3, 6, 7]
    for (step, value), since in zip(sparse.losses, ([1, 2, 3], [4, 5, 6], [7]), strict=True):
        assert value == pytest.approx(statistics.mean(per_step[k] for k in since), rel=1e-5), step
    lines = [parse_progress_line(ln) for ln in log.splitlines()]
    assert [p["step"] for p in lines if p and p.get("phase") == "train"] == [3, 6, 7]


def test_machine_checks_fail_before_loading(tiny_weights, sample_dataset, tmp_path):
    from train.loop import TrainingError

    with pytest.raises(TrainingError, match="adamw8bit.*CUDA"):
        train_quietly(quick_spec(tiny_weights, optimizer="adamw8bit"), sample_dataset, tmp_path / "a")
    with pytest.raises(TrainingError, match="precision: fp16 needs a GPU.*use bf16"):
        train_quietly(quick_spec(tiny_weights, "sdxl", precision="fp16"), sample_dataset, tmp_path / "c")
    with pytest.raises(TrainingError, match="lora.targets"):
        train_quietly(
            quick_spec(tiny_weights, **{"lora.targets": ["no_such_module"]}), sample_dataset, tmp_path / "b"
        )


def test_prodigy_optimizer_trains(tiny_weights, sample_dataset, tmp_path):
    from train.spec import parse_spec

    spec = parse_spec(
        {
            "base_weights": str(tiny_weights / "tiny-flux-dev"),
            "steps": 4,
            "resolutions": 64,
            "optimizer": "prodigy",
            "validation": {"num_inference_steps": 2},
        }
    )
    assert spec.learning_rate == 1.0  # Prodigy's own default
    result, _ = train_quietly(spec, sample_dataset, tmp_path / "out")
    assert result.lora_file.is_file()


def test_checkpoints_are_written_at_the_interval(tiny_weights, sample_dataset, tmp_path):
    spec = quick_spec(tiny_weights, "flux-dev", steps=4, checkpoint_interval=2)
    result, log = train_quietly(spec, sample_dataset, tmp_path / "out")
    ckpt = result.out_dir / "checkpoints" / "step-000002"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["sampler"] == {"epoch": 0, "index": 2}
    from safetensors.torch import load_file

    adapter = load_file(str(ckpt / "trainable.safetensors"))
    assert adapter and all(".lora_" in k for k in adapter), "only the LoRA weights, never the frozen base"
    assert (ckpt / "training_state.pt").is_file()
    assert "checkpoint: step 2 saved" in log
