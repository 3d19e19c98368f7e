"""train/inference.py in process (the Cog run entry's core, without the server): a full fine-tune's
model/ replaces the base, SDXL honours negative_prompt, sizes follow the aspect ratio, the
trigger-word hint, and the adapter cache stays bounded."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import quick_spec, render_request, train_quietly
from train.inference import MAX_EXTRA_ADAPTERS, InferenceSession, InputError, RenderRequest


@pytest.fixture()
def session_env(monkeypatch, cog_weights, tmp_path):
    monkeypatch.setenv("ADVANCED_TRAINER_WEIGHTS", str(cog_weights))
    monkeypatch.setattr("train.weights.WEIGHTS_DIR", cog_weights)
    monkeypatch.setenv("ADVANCED_TRAINER_RUN_BASE", "tiny-flux-dev")
    return tmp_path


def _req(**kw) -> RenderRequest:
    return render_request(**kw)


def _img(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_a_full_fine_tune_renders_as_its_own_pipeline(session_env, cog_weights, sample_dataset, tmp_path):
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    spec = quick_spec(cog_weights, "flux-dev", mode="full", steps=4, learning_rate=1e-3, trigger_word="sks")
    train_quietly(spec, sample_dataset, tmp_path / "out")
    logs: list[str] = []
    session = InferenceSession(str(tmp_path / "out"), log=logs.append, cache_dir=tmp_path / "cache")
    assert session.trained is not None and session.trained.model_dir == tmp_path / "out" / "model"
    ours = _img(session.predict(_req(), tmp_path / "r")[0])
    pipe = FluxPipeline.from_pretrained(tmp_path / "out" / "model")
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "sks, a red circle",
        num_inference_steps=2,
        height=64,
        width=64,
        guidance_scale=3.5,
        max_sequence_length=512,
        generator=torch.Generator().manual_seed(3),
    )
    # return_dict=True: an output object, not the tuple diffusers' return type also allows
    stock = np.asarray(out.images[0]).astype(int)  # pyright: ignore[reportAttributeAccessIssue]
    assert np.abs(ours - stock).max() <= 2
    session.predict(_req(prompt="a red circle"), tmp_path / "r2")
    assert any("the trigger word 'sks' is not in the prompt" in line for line in logs)


def test_sdxl_negative_prompt_sizes_and_bounded_adapters(
    session_env, cog_weights, sample_dataset, tmp_path, monkeypatch
):
    monkeypatch.setenv("ADVANCED_TRAINER_RUN_MODEL", "sdxl")
    monkeypatch.setenv("ADVANCED_TRAINER_RUN_BASE", "tiny-sdxl")
    session = InferenceSession(None, log=lambda _: None, cache_dir=tmp_path / "cache")
    plain = _img(session.predict(_req(), tmp_path / "a")[0])
    negative = _img(session.predict(_req(negative_prompt="blue"), tmp_path / "b")[0])
    assert np.abs(plain - negative).max() > 2, "negative_prompt changed nothing on SDXL"
    m = session.renderer.pixel_multiple()
    assert session.size(_req(width=m * 3 + 1, height=m * 2)) == (m * 3, m * 2)
    assert session.size(_req(aspect_ratio="16:9")) == (1344, 768)
    with pytest.raises(InputError, match="aspect_ratio"):
        session.size(_req(aspect_ratio="7:3"))

    spec = quick_spec(cog_weights, "sdxl", steps=2, lora={"targets": ["to_q", "to_k"]})
    train_quietly(spec, sample_dataset, tmp_path / "lora")
    payload = base64.b64encode((tmp_path / "lora" / "pytorch_lora_weights.safetensors").read_bytes()).decode()
    for i in range(MAX_EXTRA_ADAPTERS + 2):  # as many distinct LoRA sources (data URIs that differ)
        session.predict(
            _req(lora_weights=f"data:application/octet-stream;v={i};base64,{payload}"), tmp_path / f"l{i}"
        )
    assert len(session.renderer.adapters) == MAX_EXTRA_ADAPTERS
    assert len(session.renderer.pipe.get_list_adapters().get("unet", [])) == MAX_EXTRA_ADAPTERS
