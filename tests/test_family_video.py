"""The family contract for video models, over the video part of the registry (the image models'
is tests/test_family_contract.py): each model trained on a folder of clips (and a still) through
the Cog train entry on the real coglet server, in bf16, as Replicate runs it:

- the loss falls; python -m train's closing summary names what it wrote; validation renders are
  ``.mp4`` clips with a frame strip;
- the stock diffusers pipeline loads the LoRA with ``load_lora_weights`` and its video changes, in
  fp32 and in bf16; the musubi-tuner / ComfyUI copy renders as the diffusers file;
- the run entry renders the stock pipeline's video frame by frame (lossless WebP), in-process and,
  for the first video model, through a run-mode Cog server whose ``COG_WEIGHTS`` is the training's
  output (a destination version), which also writes a playable ``.mp4``;
- the training step feeds the denoiser what the pipeline's first step feeds it.
"""

from __future__ import annotations

import base64
import io
import json
import statistics
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence
from safetensors import safe_open

from train.families import MODEL_IDS, model_info
from train.models import family_class
from train.progress import parse_progress_line

VIDEO_MODELS = [m for m in MODEL_IDS if model_info(m).video]
PROMPT = "sks, a red circle gliding"
STEPS = 20
FRAMES = 9  # rendered: 3 latent frames
TOLERANCE = 2  # 8-bit levels between the run entry and the stock pipeline (the same fp32 ops)


def _spec(base: Path, model: str) -> dict[str, Any]:
    return {
        "model": model,
        "base_weights": str(base),
        "steps": STEPS,
        "resolutions": "64",
        "learning_rate": 1e-2,
        "caption_dropout": 0.0,
        "seed": 7,
        "trigger_word": "sks",
        "lora": {"rank": 4, "alpha": 8},
        "video": {"frames": [9, 17]},  # two frame-count buckets: the still trains as one frame
        "validation": {"num_inference_steps": 2},
        "export": {"kohya": "on"},
        "precision": "bf16",
    }


def _frames(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.stack([np.asarray(f.convert("RGB")).astype(int) for f in ImageSequence.Iterator(img)])


def _stock(
    model: str, base: Path, lora: Path | None = None, weight_name: str | None = None, dtype=torch.float32
):
    """The frames a user gets from the model's stock pipeline (and ``load_lora_weights``)."""
    from diffusers import DiffusionPipeline

    info = model_info(model)
    pipe = DiffusionPipeline.from_pretrained(base, dtype=dtype)
    assert type(pipe).__name__ == info.pipeline
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(lora, **({"weight_name": weight_name} if weight_name else {}))
    frames = pipe(
        prompt=PROMPT,
        num_inference_steps=2,
        height=64,
        width=64,
        num_frames=FRAMES,
        generator=torch.Generator().manual_seed(3),
        max_sequence_length=info.text_tokens,
        output_type="pil",
        **family_class(model).guidance_kwargs(info.render_guidance, ""),
    ).frames[0]
    return np.stack([np.asarray(f.convert("RGB")).astype(int) for f in frames])


REQUEST = {
    "prompt": PROMPT,
    "aspect_ratio": "custom",
    "width": 64,
    "height": 64,
    "num_inference_steps": 2,
    "seed": 3,
    "num_frames": FRAMES,
}


def _run_entry(model: str, base: Path, weights: Path | None, cache: Path, monkeypatch) -> np.ndarray:
    from train.inference import InferenceSession, RenderRequest

    monkeypatch.setenv("ADVANCED_TRAINER_RUN_MODEL", model)
    monkeypatch.setenv("ADVANCED_TRAINER_RUN_BASE", str(base))
    session = InferenceSession(str(weights) if weights else None, log=lambda _: None, cache_dir=cache)
    request = RenderRequest(**REQUEST, video_format="webp", output_quality=100)  # lossless frames
    return _frames(session.predict(request, cache / "out")[0].read_bytes())


@pytest.mark.parametrize("model", VIDEO_MODELS)
def test_every_video_model_trains_on_clips_through_the_cog_train_entry_and_renders_where_users_render(
    model, cog_weights, train_server, run_servers, upload_sink, clip_zip, tmp_path, monkeypatch
):
    from cogserver import data_uri

    info = model_info(model)
    base = cog_weights / info.tiny_name
    spec = _spec(base, model)
    response = train_server.post(
        "/trainings", {"input": {"dataset": data_uri(clip_zip), "spec": json.dumps(spec), "model": model}}
    )
    body = response.json()
    assert body["status"] == "succeeded", f"{model}: {body.get('error')}\n{body.get('logs', '')[-3000:]}"
    log, out = body["logs"], tmp_path / "out"
    with zipfile.ZipFile(io.BytesIO(upload_sink.get(body["output"]))) as zf:
        zf.extractall(out)

    assert "dataset: 1 images and 6 clips used, 0 files skipped" in log
    assert "dataset: buckets 64px 64x64 x 1 frames: 1, 64px 64x64 x 17 frames: 6" in log
    assert "precision: bf16 on a CPU: the GPU's dtype path" in log
    rows = [r for r in map(parse_progress_line, log.splitlines()) if r and r.get("phase") == "train"]
    losses = [r["loss"] for r in rows]
    assert len(losses) == STEPS and all(np.isfinite(losses))
    fifth = STEPS // 5
    assert statistics.mean(losses[-fifth:]) < statistics.mean(losses[:fifth]), (
        f"{model}: the loss did not fall"
    )
    summary = dict(
        line.split(":", 1) for line in log.splitlines() if line.startswith(("LoRA (", "validation"))
    )
    assert "LoRA (diffusers)" in summary and "LoRA (kohya)" in summary
    sample = out / "samples" / f"step-{STEPS:06d}-0.mp4"
    assert sample.is_file() and sample.with_suffix(".png").is_file()
    from train.clips import probe

    assert probe(sample, 10**8, 10**5).frames == FRAMES  # spec.video.validation_frames: the fewest, 9

    plain, with_lora = _stock(model, base), _stock(model, base, out)
    assert plain.shape == (FRAMES, 64, 64, 3)
    assert np.abs(with_lora - plain).max() > 2, f"{model}: the trained LoRA does not change the video"
    plain16, lora16 = (
        _stock(model, base, dtype=torch.bfloat16),
        _stock(model, base, out, dtype=torch.bfloat16),
    )
    assert np.abs(lora16 - plain16).max() > 2, f"{model}: in bf16 the LoRA does not change the video"
    kohya = _stock(model, base, out, "lora_kohya.safetensors")
    assert np.abs(kohya - with_lora).max() <= 1, f"{model}: the musubi-named copy renders differently"
    with safe_open(str(out / "lora_kohya.safetensors"), "pt") as f:
        assert (f.metadata() or {}).get("modelspec.architecture") == info.kohya_architecture
        assert all(k.startswith("lora_unet_blocks_") for k in f.keys())

    cache = tmp_path / "run"
    assert np.abs(_run_entry(model, base, None, cache / "0", monkeypatch) - plain).max() <= TOLERANCE
    assert np.abs(_run_entry(model, base, out, cache / "1", monkeypatch) - with_lora).max() <= TOLERANCE

    if model == VIDEO_MODELS[0]:  # the destination version: a run-mode Cog server on the training's output
        server = run_servers.get(body["output"])
        for fmt in ("webp", "mp4"):
            r = server.post(
                "/predictions", {"input": {**REQUEST, "video_format": fmt, "output_quality": 100}}
            )
            result = r.json()
            assert result["status"] == "succeeded", result.get("error") or result.get("logs", "")[-2000:]
            value = result["output"][0]
            data = (
                base64.b64decode(value.split(",", 1)[1])
                if value.startswith("data:")
                else upload_sink.get(value)
            )
            if fmt == "webp":
                assert np.abs(_frames(data) - with_lora).max() <= TOLERANCE
            else:
                (tmp_path / "out.mp4").write_bytes(data)
                clip = probe(tmp_path / "out.mp4", 10**8, 10**5)
                assert (clip.frames, clip.width, clip.height, clip.codec) == (FRAMES, 64, 64, "h264")


def _capture(module: torch.nn.Module, into: list[dict[str, Any]]):
    return module.register_forward_pre_hook(
        lambda _m, _a, kwargs: into.append(kwargs) and None, with_kwargs=True
    )


@pytest.mark.parametrize("model", VIDEO_MODELS)
def test_the_training_step_feeds_the_video_denoiser_what_the_pipeline_feeds_it(
    model, tiny_weights, monkeypatch
):
    """At the pipeline's first noise level, from the same noise: the same latent layout, the same
    text states (zero-padded to 512, no mask), the timestep as 1000 sigma (the pipeline passes its
    integer part; per token where it expands timesteps), and nothing else."""
    from train.models.base import Batch, BatchRandom
    from train.spec import parse_spec

    info = model_info(model)
    base = tiny_weights / info.tiny_name
    spec = parse_spec(_spec(base, model) | {"precision": "fp32"})
    family = family_class(model)(spec, base)
    family.load(torch.float32)
    calls: list[dict[str, Any]] = []
    handle = _capture(family.denoiser, calls)
    family.pipe(
        prompt=PROMPT,
        num_inference_steps=2,
        height=64,
        width=64,
        num_frames=FRAMES,
        guidance_scale=1.0,  # no CFG: one call a step
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    )
    handle.remove()
    assert len(calls) == 2
    theirs = calls[0]
    sigma = float(family.pipe.scheduler.sigmas[0])

    text = family.encode_prompts([PROMPT], torch.device("cpu"))[0]
    mean, std = family.encode_images(torch.zeros(1, 3, FRAMES, 64, 64))
    rng = BatchRandom(torch.Generator().manual_seed(0), 1, 0, 1, torch.device("cpu"))
    batch = Batch(mean, std, {k: v[None] for k, v in text.items()}, torch.zeros(1, 6), rng)
    monkeypatch.setattr(family, "sample_latents", lambda b: b.latent_mean)
    monkeypatch.setattr(family, "sample_sigmas", lambda rng, n: torch.tensor([sigma]))
    ours: list[dict[str, Any]] = []

    def denoiser(**kwargs):
        ours.append(kwargs)
        return (torch.zeros_like(kwargs["hidden_states"]),)

    family.loss(denoiser, batch)  # pyright: ignore[reportArgumentType]
    given = {k for k, v in theirs.items() if v is not None and k != "return_dict"}
    assert {k for k in ours[0] if k != "return_dict"} == given
    # x_s = (1 - s) x0 + s noise with x0 = the normalised latent of black frames: at the pipeline's
    # first sigma (about 1) the pipeline's pure noise and ours differ by (1 - s) x0 only
    x0 = family.training_latents(batch)
    expected = theirs["hidden_states"] * sigma + (1 - sigma) * x0
    torch.testing.assert_close(ours[0]["hidden_states"], expected)
    torch.testing.assert_close(ours[0]["encoder_hidden_states"], theirs["encoder_hidden_states"])
    # (B,), or one per token (Wan 2.2 TI2V's expand_timesteps): 999.x vs 999
    assert ours[0]["timestep"].shape == theirs["timestep"].shape
    assert (ours[0]["timestep"].float() - theirs["timestep"].float()).abs().max() < 1.0
