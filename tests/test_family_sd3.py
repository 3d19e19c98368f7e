"""Stable Diffusion 3.5 (Large, Medium) on the tiny pipelines: the loss falls, the LoRA loads into
the stock StableDiffusion3Pipeline and changes its image, training feeds the transformer what the
pipeline feeds it, the run entry renders with and without the LoRA as the stock pipeline does,
and full fine-tunes are allowed (Medium) or refused naming the size (Large)."""

from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from conftest import quick_spec, train_quietly
from train.families import model_info
from train.inference import InferenceSession, RenderRequest
from train.models.base import Batch, BatchRandom
from train.models.sd3 import Sd3Family, scheduler_shift, shifted
from train.spec import SpecError, parse_spec

MODELS = ["sd3.5-large", "sd3.5-medium"]
PROMPT = "sks, a red circle"


def _stock(base, lora_dir=None, seed: int = 3, steps: int = 2, guidance: float | None = None) -> np.ndarray:
    """What a user gets from the stock pipeline (with ``load_lora_weights`` where a LoRA is given)."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir)
    out = pipe(
        PROMPT,
        num_inference_steps=steps,
        height=64,
        width=64,
        guidance_scale=guidance if guidance is not None else 3.5,
        max_sequence_length=256,
        generator=torch.Generator().manual_seed(seed),
    )
    return np.asarray(out.images[0].convert("RGB")).astype(int)  # pyright: ignore[reportAttributeAccessIssue]


@pytest.fixture(scope="module")
def trained(tiny_weights, sample_dataset, tmp_path_factory):
    """One 100-step LoRA run per model (default targets), shared by the tests below."""
    runs = {}
    for model in MODELS:
        spec = quick_spec(tiny_weights, model, steps=100, learning_rate=5e-3, trigger_word="sks")
        runs[model] = train_quietly(spec, sample_dataset, tmp_path_factory.mktemp(model))[0]
    return runs


@pytest.mark.parametrize("model", MODELS)
def test_loss_falls_and_the_lora_changes_the_stock_pipeline_image(trained, tiny_weights, model):
    result = trained[model]
    losses = [v for _, v in result.losses]
    n = len(losses) // 10
    first, last = statistics.mean(losses[:n]), statistics.mean(losses[-n:])
    assert last < first * 0.9, f"loss did not fall: first tenth {first:.4f}, last tenth {last:.4f}"
    with safe_open(str(result.lora_file), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.transformer_blocks.") for k in keys)
    assert any(".ff_context." in k for k in keys) and any(".ff." in k for k in keys)
    assert any(".attn2." in k for k in keys) == (model == "sd3.5-medium")  # MMDiT-X's second attention
    assert result.kohya_file is None  # diffusers cannot read kohya SD3 names back: no such copy
    base = tiny_weights / model_info(model).tiny_name
    assert np.abs(_stock(base, result.out_dir) - _stock(base)).max() > 5, "the LoRA does not change the image"


@pytest.mark.parametrize("model", MODELS)
def test_the_run_entry_renders_as_the_stock_pipeline(trained, tiny_weights, tmp_path, monkeypatch, model):
    base = tiny_weights / model_info(model).tiny_name
    monkeypatch.setenv("ADVANCED_TRAINER_RUN_MODEL", model)
    monkeypatch.setenv("ADVANCED_TRAINER_RUN_BASE", str(base))
    req = RenderRequest(
        prompt=PROMPT,
        aspect_ratio="custom",
        width=64,
        height=64,
        num_inference_steps=2,
        seed=3,
        output_format="png",
    )

    def image(session, name):
        return np.asarray(Image.open(session.predict(req, tmp_path / name)[0]).convert("RGB")).astype(int)

    plain = image(InferenceSession(None, log=lambda _: None, cache_dir=tmp_path / "c0"), "plain")
    trained_session = InferenceSession(
        str(trained[model].out_dir), log=lambda _: None, cache_dir=tmp_path / "c1"
    )
    with_lora = image(trained_session, "lora")
    guidance = model_info(model).render_guidance
    assert np.abs(plain - _stock(base, guidance=guidance)).max() <= 2
    assert np.abs(with_lora - _stock(base, trained[model].out_dir, guidance=guidance)).max() <= 2
    assert np.abs(with_lora - plain).max() > 5


def _batch(family, texts, image_side: int = 64) -> Batch:
    pixels = (
        torch.rand(len(texts), 3, image_side, image_side, generator=torch.Generator().manual_seed(0)) * 2 - 1
    )
    mean, std = family.encode_images(pixels)
    text = {k: torch.stack([t[k] for t in texts]) for k in texts[0]}
    rng = BatchRandom(torch.Generator().manual_seed(0), len(texts), 0, len(texts), torch.device("cpu"))
    return Batch(mean, std * 0, text, torch.zeros(len(texts), 6), rng)


@pytest.mark.parametrize("model", MODELS)
def test_training_feeds_the_transformer_what_the_pipeline_feeds_it(tiny_weights, monkeypatch, model):
    spec = quick_spec(tiny_weights, model)
    family = Sd3Family(spec, tiny_weights / model_info(model).tiny_name)
    family.load(torch.float32)
    pipe, seen = family.pipe, {}
    # auto: logit-normal sigmas moved by the scheduler's shift (3.0): median shifted(0.5, 3) = 0.75
    rng = BatchRandom(torch.Generator().manual_seed(1), 20000, 0, 20000, torch.device("cpu"))
    sigmas = family.sample_sigmas(rng, 16)
    assert scheduler_shift(pipe.scheduler.config, 16) == 3.0
    assert abs(float(sigmas.median()) - float(shifted(torch.tensor(0.5), 3.0))) < 0.01
    pipe.transformer.register_forward_pre_hook(
        lambda _m, _a, kw: seen.setdefault("pipeline", kw) and None, with_kwargs=True
    )
    # one step from pure noise, no CFG: the pipeline's first call is at sigma 1 (timestep 1000)
    pipe(PROMPT, num_inference_steps=1, height=64, width=64, guidance_scale=1.0, output_type="latent")
    texts = family.encode_prompts([PROMPT], torch.device("cpu"))
    monkeypatch.setattr(family, "sample_sigmas", lambda rng, n: torch.ones(1))

    def model_call(**kw):
        seen["training"] = kw
        return (torch.zeros_like(kw["hidden_states"]),)

    family.loss(model_call, _batch(family, texts))  # pyright: ignore[reportArgumentType]
    ours, theirs = seen["training"], seen["pipeline"]
    assert set(ours) - {"return_dict"} == set(theirs) - {"return_dict", "joint_attention_kwargs"}
    assert ours["hidden_states"].shape == theirs["hidden_states"].shape == (1, 4, 8, 8)  # unpacked
    torch.testing.assert_close(ours["timestep"], theirs["timestep"])  # sigma x 1000
    torch.testing.assert_close(ours["encoder_hidden_states"], theirs["encoder_hidden_states"])
    torch.testing.assert_close(ours["pooled_projections"], theirs["pooled_projections"])
    assert ours["encoder_hidden_states"].shape[1] == 77 + 256  # CLIP tokens, then T5 tokens


def test_full_fine_tune_of_medium_exports_a_loadable_pipeline_and_large_is_refused(
    tiny_weights, sample_dataset, tmp_path
):
    base = tiny_weights / model_info("sd3.5-medium").tiny_name
    spec = quick_spec(tiny_weights, "sd3.5-medium", mode="full", steps=2, learning_rate=1e-3)
    result, _ = train_quietly(spec, sample_dataset, tmp_path / "out")
    assert result is not None
    folder = result.weights[0]
    assert folder == tmp_path / "out" / "model" and (folder / "model_index.json").is_file()
    assert np.abs(_stock(folder) - _stock(base)).max() > 0, "the fine-tuned model renders like the base"
    with pytest.raises(SpecError, match=r"full fine-tune of sd3\.5-large is refused: .*8\.1 B.*80 GB"):
        parse_spec({"model": "sd3.5-large", "mode": "full"})
