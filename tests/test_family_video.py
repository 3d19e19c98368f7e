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
# LTX-2's 32x VAE leaves a 64 px sample 2 x 2 latent pixels a frame: too few numbers for the loss's
# trend to show over the steps; it trains at 128 (renders stay at 64)
RESOLUTION = {"ltx-2": 128}


def _spec(base: Path, model: str) -> dict[str, Any]:
    return {
        "model": model,
        "base_weights": str(base),
        "steps": STEPS,
        "resolutions": str(RESOLUTION.get(model, 64)),
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


def _first_frame() -> Image.Image:
    """The image an image-to-video render animates (a drawn shape, 64 x 64)."""
    from train.sample_data import draw_example

    return draw_example(3, (64, 64))[0]


def _image_inputs(model: str) -> dict[str, Any]:
    """The stock pipeline's image argument: an image-to-video model's first frame; nothing else."""
    return {"image": _first_frame()} if model_info(model).image_to_video else {}


def _one_pass(model: str) -> dict[str, Any]:
    """Pipeline arguments for one transformer call a step without CFG: LTX-2's other guidance passes
    (spatio-temporal and modality isolation, for video and audio) off too."""
    if model_info(model).pipeline != "LTX2Pipeline":
        return {}
    off = {"stg_scale": 0.0, "modality_scale": 1.0, "audio_guidance_scale": 1.0}
    return {**off, "audio_stg_scale": 0.0, "audio_modality_scale": 1.0}


def _frames(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.stack([np.asarray(f.convert("RGB")).astype(int) for f in ImageSequence.Iterator(img)])


LOW = "pytorch_lora_weights_low_noise.safetensors"  # Wan 2.2 A14B's low-noise expert's file


def _stock(
    model: str,
    base: Path,
    lora: Path | None = None,
    files: tuple[str | None, str | None] = ("pytorch_lora_weights.safetensors", LOW),
    dtype=torch.float32,
    calls: list[torch.Tensor] | None = None,
):
    """The frames a user gets from the model's stock pipeline and ``load_lora_weights``: ``files`` are
    (the file for ``transformer``, the one for ``transformer_2`` where the model has two experts and
    the folder holds it). ``calls``: each step's transformer outputs, in order."""
    from diffusers import DiffusionPipeline

    info = model_info(model)
    pipe = DiffusionPipeline.from_pretrained(base, dtype=dtype)
    assert type(pipe).__name__ == info.pipeline
    pipe.set_progress_bar_config(disable=True)
    # the VAE in fp32 as diffusers' Wan examples load it beside a bf16 transformer (the trainer keeps
    # it so too); on a CPU a bf16 3D convolution is also ~10x slower (2.1 s a render against 0.2 s)
    pipe.vae.to(torch.float32)
    main, second = files
    if lora is not None and main is not None:
        pipe.load_lora_weights(lora, weight_name=main)
    if lora is not None and second is not None and info.experts > 1 and (lora / second).is_file():
        pipe.load_lora_weights(lora, weight_name=second, load_into_transformer_2=True)
    if calls is not None:
        for name in ("transformer", "transformer_2"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).register_forward_hook(
                    lambda _m, _a, out: calls.append(out[0].detach()) and None
                )
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
        **_image_inputs(model),
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


def _run_entry(
    model: str, base: Path, weights: Path | None, cache: Path, monkeypatch, fmt: str = "webp"
) -> Any:
    """The run entry's render of ``REQUEST``: its frames (lossless WebP), or with ``fmt`` the file."""
    from train.inference import InferenceSession, RenderRequest

    monkeypatch.setenv("ADVANCED_TRAINER_RUN_MODEL", model)
    monkeypatch.setenv("ADVANCED_TRAINER_RUN_BASE", str(base))
    session = InferenceSession(str(weights) if weights else None, log=lambda _: None, cache_dir=cache)
    images: tuple[str, ...] = ()
    if model_info(model).image_to_video:
        cache.mkdir(parents=True, exist_ok=True)
        _first_frame().save(cache / "first.png")
        images = (str(cache / "first.png"),)
    request = RenderRequest(**REQUEST, input_images=images, video_format=fmt, output_quality=100)
    path = session.predict(request, cache / "out")[0]
    return _frames(path.read_bytes()) if fmt == "webp" else path


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
    r = RESOLUTION.get(model, 64)
    assert f"dataset: buckets {r}px {r}x{r} x 1 frames: 1, {r}px {r}x{r} x 17 frames: 6" in log
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
    card = (out / "README.md").read_text()  # the model card: a video's task and usage
    assert f"- {'image-to-video' if info.image_to_video else 'text-to-video'}\n" in card
    assert ".frames[0]" in card and "export_to_video(video" in card and "on 7 clips and images" in card
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
    kohya = _stock(model, base, out, ("lora_kohya.safetensors", "lora_kohya_low_noise.safetensors"))
    assert np.abs(kohya - with_lora).max() <= 1, f"{model}: the musubi-named copy renders differently"
    if info.experts > 1:
        _each_expert_changes_its_part_of_the_schedule(model, base, out, plain)
    with safe_open(str(out / "lora_kohya.safetensors"), "pt") as f:
        assert (f.metadata() or {}).get("modelspec.architecture") == info.kohya_architecture
        prefix = {"musubi": "lora_unet_blocks_", "ltx2": "diffusion_model.transformer_blocks."}[
            info.comfy_naming
        ]
        assert all(k.startswith(prefix) for k in f.keys())

    cache = tmp_path / "run"
    assert np.abs(_run_entry(model, base, None, cache / "0", monkeypatch) - plain).max() <= TOLERANCE
    assert np.abs(_run_entry(model, base, out, cache / "1", monkeypatch) - with_lora).max() <= TOLERANCE
    if info.pipeline == "LTX2Pipeline":  # an audio-video model: its mp4 carries the soundtrack
        _has_its_soundtrack(_run_entry(model, base, out, cache / "2", monkeypatch, "mp4"))

    if model == VIDEO_MODELS[0]:  # the GPU's dtype: bf16 weights, the VAE in fp32 as diffusers' examples
        monkeypatch.setenv("ADVANCED_TRAINER_RUN_DTYPE", "bf16")
        in_bf16 = _run_entry(model, base, out, cache / "bf16", monkeypatch)
        monkeypatch.delenv("ADVANCED_TRAINER_RUN_DTYPE")
        assert np.abs(in_bf16 - lora16).max() <= TOLERANCE

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


def _has_its_soundtrack(path: Path) -> None:
    """The .mp4 holds the H.264 frames and an AAC soundtrack as long as the video (9 frames at 24 fps)."""
    import av

    with av.open(str(path)) as container:
        kinds = {s.type: s for s in container.streams}
        assert set(kinds) == {"video", "audio"}, kinds
        audio = kinds["audio"]
        assert audio.codec_context.name == "aac"
        frames = sum(f.samples for f in container.decode(audio=0))
    assert abs(frames / audio.rate - FRAMES / 24) < 0.1, (frames, audio.rate)


def _each_expert_changes_its_part_of_the_schedule(
    model: str, base: Path, out: Path, plain: np.ndarray
) -> None:
    """Two steps: t = 999 is the high-noise expert's, the second (t = 750 at flow shift 3 with the
    boundary at 0.875; t = 833 at shift 5 with the boundary at 0.9) the low-noise one's. Each expert's LoRA, loaded alone into its transformer, changes the video; the
    high-noise one the first step's prediction, the low-noise one not that step, only the second."""
    ref: list[torch.Tensor] = []
    _stock(model, base, calls=ref)
    high: list[torch.Tensor] = []
    assert (
        np.abs(_stock(model, base, out, ("pytorch_lora_weights.safetensors", None), calls=high) - plain).max()
        > 2
    )
    low: list[torch.Tensor] = []
    assert np.abs(_stock(model, base, out, (None, LOW), calls=low) - plain).max() > 2
    cfg = 2  # CFG: a conditional and an unconditional call per step
    assert len(ref) == len(high) == len(low) == 2 * cfg
    assert (high[0] - ref[0]).abs().max() > 1e-3  # the high-noise LoRA acts at t = 999
    torch.testing.assert_close(low[0], ref[0])  # ... the low-noise one does not
    assert (low[cfg] - ref[cfg]).abs().max() > 1e-3  # it acts at the second step


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
    handle = _capture(
        family.pipe.transformer, calls
    )  # (Wan 2.2 A14B: the high-noise expert, first at t = 999)
    family.pipe(
        prompt=PROMPT,
        num_inference_steps=2,
        height=64,
        width=64,
        num_frames=FRAMES,
        guidance_scale=1.0,  # no CFG: one call a step
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        **_image_inputs(model),
        **_one_pass(model),
    )
    handle.remove()
    assert (
        len(calls) == 2 // info.experts
    )  # one call a step (Wan 2.2 A14B: the second step is the other expert's)
    theirs = calls[0]
    sigma = float(family.pipe.scheduler.sigmas[0])

    text = family.encode_prompts([PROMPT], torch.device("cpu"))[0]
    mean, std = family.encode_images(torch.zeros(1, 3, FRAMES, 64, 64))
    rng = BatchRandom(torch.Generator().manual_seed(0), 1, 0, 1, torch.device("cpu"))
    # an image-to-video model's sample conditions on its own first frame: here the pipeline's image
    first = _first_frame()
    pixels = torch.from_numpy(np.asarray(first, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    conditions = family.encode_conditions(
        [first] * FRAMES, pixels[None, :, None].expand(-1, -1, FRAMES, -1, -1)
    )
    assert bool(conditions) == info.image_to_video
    batch = Batch(mean, std, {k: v[None] for k, v in text.items()}, torch.zeros(1, 6), rng, conditions)
    monkeypatch.setattr(family, "sample_latents", lambda b: b.latent_mean)
    monkeypatch.setattr(family, "sample_sigmas", lambda rng, n: torch.tensor([sigma]))
    ours: list[dict[str, Any]] = []

    def denoiser(**kwargs):
        ours.append(kwargs)
        h = kwargs["hidden_states"]
        out = family.denoiser_config()["out_channels"]  # (image-to-video takes more channels in)
        return (torch.zeros_like(h[:, :out] if h.dim() == 5 else h),)  # (LTX-2: packed tokens)

    family.loss(denoiser, batch)  # pyright: ignore[reportArgumentType]
    given = {k for k, v in theirs.items() if v is not None and k != "return_dict"}
    assert {k for k in ours[0] if k != "return_dict"} == given
    # x_s = (1 - s) x0 + s noise with x0 = the normalised latent of black frames: at the pipeline's
    # first sigma (about 1) the pipeline's pure noise and ours differ by (1 - s) x0 only
    x0 = family.training_latents(batch)
    if theirs["hidden_states"].dim() == 3:  # LTX-2: one token per latent voxel
        x0 = family.pipeline_cls._pack_latents(x0)
    z = x0.shape[1]  # then (image-to-video) the first frame's mask and latents, equal to the pipeline's
    expected = theirs["hidden_states"][:, :z] * sigma + (1 - sigma) * x0
    torch.testing.assert_close(ours[0]["hidden_states"][:, :z], expected)
    torch.testing.assert_close(ours[0]["hidden_states"][:, z:], theirs["hidden_states"][:, z:])
    assert ours[0]["hidden_states"].shape == theirs["hidden_states"].shape
    # everything else as the pipeline gives it: the text states (Wan 2.1 I2V: the first frame's CLIP
    # tokens; LTX-2: both streams' connector outputs and masks, the RoPE coordinates, the sizes, fps)
    for key in given - {"hidden_states", "timestep", "sigma", "audio_hidden_states", "isolate_modalities"}:
        if isinstance(theirs[key], torch.Tensor):
            torch.testing.assert_close(ours[0][key], theirs[key], msg=key)
        else:
            assert ours[0][key] == theirs[key], key
    if "isolate_modalities" in given:  # LTX-2: the video stream alone, as Lightricks' trainer trains it
        assert ours[0]["isolate_modalities"] is True and theirs["isolate_modalities"] is False
        assert ours[0]["audio_hidden_states"].shape == theirs["audio_hidden_states"].shape
    # (B,), or one per token (Wan 2.2 TI2V's expand_timesteps): 999.x vs 999
    for key in {"timestep", "sigma"} & given:
        assert ours[0][key].shape == theirs[key].shape
        assert (ours[0][key].float() - theirs[key].float()).abs().max() < 1.0


# the two A14B models share the experts' code; the image-to-video one trains both in the contract above
EXPERT_MODELS = [m for m in VIDEO_MODELS if model_info(m).experts > 1][:1]


@pytest.mark.parametrize("model", EXPERT_MODELS)
def test_one_expert_alone_trains_on_its_noise_levels_and_renders_from_its_transformer(
    model, tiny_weights, clip_zip, tmp_path, monkeypatch
):
    """``video.expert: low_noise`` trains the low-noise expert alone, on noise levels below the boundary;
    its LoRA is the one file delivered, and the run entry loads it into ``transformer_2`` as a user
    does with ``load_lora_weights(..., load_into_transformer_2=True)``. Items of a batch go to the
    expert of their own timestep."""
    from conftest import quick_spec, train_quietly
    from train.models.base import BatchRandom
    from train.models.wan.family import Experts

    base = tiny_weights / model_info(model).tiny_name
    spec = quick_spec(
        tiny_weights, model, steps=2, learning_rate=5e-2, **{"video.frames": [9], "video.expert": "low_noise"}
    )
    family = family_class(model)(spec, base)
    family.load(torch.float32)
    rng = BatchRandom(torch.Generator().manual_seed(0), 256, 0, 256, torch.device("cpu"))
    assert float(family.sample_sigmas(rng, 16).max()) < family.boundary

    seen: dict[str, torch.Tensor] = {}

    class Echo(torch.nn.Module):  # returns its timestep, so the routing shows in the output
        def __init__(self, name: str):
            super().__init__()
            self.name = name

        def forward(self, hidden_states, timestep, encoder_hidden_states, **_):
            seen[self.name] = timestep
            return (timestep.view(-1, 1) + 0 * hidden_states.flatten(1)[:, :1],)

    experts = Experts(Echo("high"), Echo("low"), 875.0, ("high", "low"))
    t = torch.tensor([999.0, 100.0, 900.0, 874.0])
    out = experts(torch.zeros(4, 3), t, torch.zeros(4, 2))[0]
    assert out.flatten().tolist() == t.tolist()
    assert seen["high"].tolist() == [999.0, 900.0] and seen["low"].tolist() == [100.0, 874.0]

    result, log = train_quietly(spec, clip_zip, tmp_path / "out")
    assert result is not None, log[-2000:]
    assert not (tmp_path / "out" / LOW).exists()
    stock = _stock(model, base, tmp_path / "out", (None, "pytorch_lora_weights.safetensors"))
    assert np.abs(stock - _stock(model, base)).max() > 2
    assert (
        np.abs(_run_entry(model, base, tmp_path / "out", tmp_path / "run", monkeypatch) - stock).max()
        <= TOLERANCE
    )


def test_an_image_to_video_model_animates_a_first_frame_it_is_given(clip_zip, tmp_path):
    """Validation animates the first frame of the first training clip by default, or of the clips
    ``validation.control_images`` names (an unknown name is refused, naming some that exist); the run
    entry requires exactly one input image, and a text-to-video model refuses one."""
    from train.clips import decode_frames
    from train.data import stage_dataset
    from train.edit import ValidationControlError, validation_control_sets
    from train.inference import InputError, RenderRequest, input_images
    from train.spec import parse_spec

    model = next(m for m in VIDEO_MODELS if model_info(m).image_to_video)
    spec = parse_spec({"model": model, "video": {"frames": [9, 17]}})
    ds = stage_dataset(clip_zip, tmp_path / "job", video=spec.video_rule())
    [default] = validation_control_sets(spec, ds, None)
    first_clip = next(r for r in ds.images if r.clip is not None)
    assert default.name == first_clip.name
    [frame] = default.images
    assert frame.size == (first_clip.clip.width, first_clip.clip.height)
    expected = decode_frames(first_clip.path, first_clip.clip, [0], 10**7)[0]
    assert np.array_equal(np.asarray(frame), np.asarray(expected))

    last = [r for r in ds.images if r.clip is not None][-1]
    named = parse_spec(
        {"model": model, "validation": {"control_images": [Path(last.name).stem, "still.png"]}}
    )
    assert [c.name for c in validation_control_sets(named, ds, None)] == [last.name, "still.png"]
    unknown = parse_spec({"model": model, "validation": {"control_images": ["nope.mp4"]}})
    with pytest.raises(ValidationControlError, match="'nope.mp4' is not a clip or image of the dataset"):
        validation_control_sets(unknown, ds, None)

    title = model_info(model).title
    with pytest.raises(InputError, match=f"input_image: {title} animates an image"):
        input_images(RenderRequest(prompt="sks"), model_info(model))
    path = tmp_path / "first.png"
    _first_frame().save(path)
    with pytest.raises(InputError, match=f"input_images: 2 images given, {title} takes at most 1"):
        input_images(RenderRequest(prompt="sks", input_images=(str(path),) * 2), model_info(model))
    assert len(input_images(RenderRequest(prompt="sks", input_images=(str(path),)), model_info(model))) == 1
    with pytest.raises(InputError, match="draws from the prompt alone"):
        input_images(RenderRequest(prompt="sks", input_images=(str(path),)), model_info(VIDEO_MODELS[0]))
