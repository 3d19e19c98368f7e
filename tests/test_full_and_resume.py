"""Full fine-tunes export a pipeline folder the stock pipeline loads; resuming a checkpoint ends
with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import quick_spec, train_quietly


def _render(folder, family):
    from diffusers import FluxPipeline, StableDiffusionXLPipeline

    pipe = (FluxPipeline if family == "flux" else StableDiffusionXLPipeline).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    kw = {"max_sequence_length": 32} if family == "flux" else {}
    return np.asarray(
        pipe(
            "a red circle",
            num_inference_steps=3,
            height=64,
            width=64,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
            **kw,
        ).images[0]
    )


@pytest.mark.parametrize(
    "model,base,family", [("flux-dev", "tiny-flux-dev", "flux"), ("sdxl", "tiny-sdxl", "sdxl")]
)
def test_full_fine_tune_exports_a_loadable_pipeline(
    tiny_weights, sample_dataset, tmp_path, model, base, family
):
    spec = quick_spec(tiny_weights, model, mode="full", steps=6, learning_rate=1e-3)
    result, log = train_quietly(spec, sample_dataset, tmp_path / "out")
    folder = result.weights[0]
    assert folder == tmp_path / "out" / "model"
    assert (folder / "model_index.json").is_file()
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()
    tuned, original = _render(folder, family), _render(tiny_weights / base, family)
    assert tuned.shape == (64, 64, 3)
    assert np.abs(tuned - original).max() > 0.02, "the fine-tuned model renders like the base model"
    assert "full fine-tune" in log and "model/" in (tmp_path / "out" / "README.md").read_text()
    # the untouched components are the base model's files, not re-serialised copies
    vae = next((folder / "vae").glob("*.safetensors"))
    assert vae.read_bytes() == next((tiny_weights / base / "vae").glob("*.safetensors")).read_bytes()


def _final_trainable(result, mode, out):
    if mode == "lora":
        return load_file(str(result.lora_file))
    name = "transformer" if (out / "model" / "transformer").is_dir() else "unet"
    return load_file(str(next((out / "model" / name).glob("*.safetensors"))))


@pytest.mark.parametrize(
    "mode,extra",
    [
        ("lora", {"lora.dropout": 0.1}),  # dropout draws from the global RNG: it must be restored too
        ("full", {}),
        # the GPU's dtype path: the whole denoiser trains in bf16 (AdamW on bf16 weights), resumed
        ("full", {"precision": "bf16"}),
    ],
    ids=["lora", "full", "full-bf16"],
)
def test_resume_matches_an_uninterrupted_run(tiny_weights, sample_dataset, tmp_path, mode, extra):
    spec = quick_spec(
        tiny_weights,
        "flux-dev",
        mode=mode,
        steps=6,
        checkpoint_interval=3,
        caption_dropout=0.25,
        batch_size=2,
        lr_scheduler="cosine",
        lr_warmup_steps=2,
        **extra,
    )
    straight, _ = train_quietly(spec, sample_dataset, tmp_path / "straight")
    ckpt = tmp_path / "straight" / "checkpoints" / "step-000003"
    assert (ckpt / "trainer_state.json").is_file()

    import contextlib
    import io

    from train.loop import run_training

    with contextlib.redirect_stdout(io.StringIO()) as buf:
        resumed = run_training(spec, sample_dataset, tmp_path / "resumed", resume_from=ckpt)
    assert "resume: from step 3" in buf.getvalue()
    a = _final_trainable(straight, mode, tmp_path / "straight")
    b = _final_trainable(resumed, mode, tmp_path / "resumed")
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-6, f"resumed weights differ by {worst}"
    # the loss curve continues the original one
    assert [s for s, _ in resumed.losses] == list(range(1, 7))
    assert resumed.losses[:3] == straight.losses[:3]
    assert json.loads((tmp_path / "resumed" / "config.json").read_text())["resumed_from_step"] == 3
    if extra.get("precision") == "bf16":
        assert {t.dtype for t in a.values()} == {torch.bfloat16}, "the bf16 fine-tune was not trained in bf16"
        assert "precision: bf16 on a CPU" in buf.getvalue()
        base = load_file(str(next((tiny_weights / "tiny-flux-dev" / "transformer").glob("*.safetensors"))))
        assert max((a[k].float() - base[k].float()).abs().max().item() for k in a) > 0, "nothing trained"


def test_resume_from_an_archive_handed_in_from_outside(tiny_weights, sample_dataset, tmp_path):
    spec = quick_spec(tiny_weights, "sdxl", steps=4, checkpoint_interval=2)
    straight, _ = train_quietly(spec, sample_dataset, tmp_path / "straight")
    archive = tmp_path / "ckpt.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tmp_path / "straight" / "checkpoints", arcname="checkpoints")
    import contextlib
    import io

    from train.loop import run_training

    with contextlib.redirect_stdout(io.StringIO()):
        resumed = run_training(spec, sample_dataset, tmp_path / "resumed", resume_from=archive)
    a, b = load_file(str(straight.lora_file)), load_file(str(resumed.lora_file))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_incompatible_checkpoints_are_refused(tiny_weights, sample_dataset, tmp_path):
    from train.checkpoint import CheckpointError
    from train.loop import run_training

    spec = quick_spec(tiny_weights, "flux-dev", steps=4, checkpoint_interval=2)
    train_quietly(spec, sample_dataset, tmp_path / "a")
    ckpt = tmp_path / "a" / "checkpoints" / "step-000002"
    with pytest.raises(CheckpointError, match="lora: checkpoint"):
        run_training(
            quick_spec(tiny_weights, "flux-dev", steps=4, **{"lora.rank": 4}),
            sample_dataset,
            tmp_path / "b",
            resume_from=ckpt,
        )
    with pytest.raises(CheckpointError, match="checkpoint is at step 2, and steps is 2"):
        run_training(
            quick_spec(tiny_weights, "flux-dev", steps=2), sample_dataset, tmp_path / "c", resume_from=ckpt
        )
    (ckpt / "training_state.pt").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        run_training(spec, sample_dataset, tmp_path / "d", resume_from=ckpt)
    with pytest.raises(CheckpointError, match="does not exist"):
        run_training(spec, sample_dataset, tmp_path / "e", resume_from=tmp_path / "nope")
