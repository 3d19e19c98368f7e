"""Flux.2 ([dev] and [klein]) on the tiny pipelines: the loss falls, the LoRA (diffusers and kohya
naming) loads into the stock pipelines, the objective is the pipelines' own, a full fine-tune of
[klein] 4B exports a loadable pipeline (and the ones that do not fit are refused), and the run
entry renders with and without the LoRA."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import quick_spec, train_quietly
from train.families import model_info

# Prompt tokens in these tests (the models take 512): the tiny tokenizers fit the pipelines' chat
# templates and a caption in far fewer, and the tiny steps cost what the sequence costs.
TOKENS = 128
FLUX2_MODELS = ("flux2-dev", "flux2-klein-4b", "flux2-klein-9b", "flux2-klein-base-4b", "flux2-klein-base-9b")


def _pipeline_cls(model: str):
    from train.models import family_class

    return family_class(model).pipeline_cls


def _render(
    model: str, base: Path, lora_dir: Path | None = None, weight_name: str | None = None
) -> np.ndarray:
    """An image from the stock diffusers pipeline (its own text encoder), with an optional LoRA."""
    pipe = _pipeline_cls(model).from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir, **({"weight_name": weight_name} if weight_name else {}))
    out = pipe(
        prompt="sks, a red circle on a blue background",
        num_inference_steps=3,
        height=64,
        width=64,
        guidance_scale=model_info(model).render_guidance,
        max_sequence_length=TOKENS,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    return np.asarray(out.images[0])


def _tenths(losses: list[float]) -> tuple[float, float]:
    n = max(1, len(losses) // 10)
    return statistics.mean(losses[:n]), statistics.mean(losses[-n:])


@pytest.mark.parametrize("model", ["flux2-dev", "flux2-klein-base-4b"])
def test_loss_falls_on_a_small_repeated_set(tiny_weights, sample_dataset, tmp_path, model):
    spec = quick_spec(
        tiny_weights, model, steps=100, learning_rate=5e-3, **{"flow.max_sequence_length": TOKENS}
    )
    result, _ = train_quietly(spec, sample_dataset, tmp_path / "out")
    losses = [v for _, v in result.losses]
    assert len(losses) == 100
    first, last = _tenths(losses)
    assert last < first * 0.9, f"loss did not fall: first tenth {first:.4f}, last tenth {last:.4f}"


@pytest.mark.parametrize("model", ["flux2-dev", "flux2-klein-base-4b"])
def test_lora_and_its_kohya_copy_load_into_the_stock_pipeline(tiny_weights, sample_dataset, tmp_path, model):
    """Default targets (attention + MLP of every block); alpha != rank, so both files must carry the
    scale. The kohya file (sd-scripts' Flux.2 names, q/k/v fused) renders exactly the same image."""
    from safetensors import safe_open

    spec = quick_spec(
        tiny_weights,
        model,
        steps=10,
        learning_rate=3e-2,
        **{"lora.alpha": 8, "flow.max_sequence_length": TOKENS},
    )
    out = tmp_path / "out"
    result, _ = train_quietly(spec, sample_dataset, out)
    base = tiny_weights / model_info(model).tiny_name
    plain = _render(model, base)
    with_lora = _render(model, base, out)
    with_kohya = _render(model, base, out, weight_name="lora_kohya.safetensors")
    assert np.abs(with_lora - plain).max() > 0.02, "the LoRA does not change the image"
    np.testing.assert_allclose(
        with_kohya, with_lora, atol=1e-4, err_msg="kohya export differs from diffusers"
    )

    with safe_open(str(result.kohya_file), "pt") as f:
        keys = set(f.keys())
        arch = (f.metadata() or {}).get("modelspec.architecture")
    assert arch == model_info(model).kohya_architecture
    for name in ("double_blocks_0_img_attn_qkv", "double_blocks_0_txt_mlp_2", "single_blocks_0_linear1"):
        assert f"lora_unet_{name}.lora_down.weight" in keys, name
    assert all(k.startswith("lora_unet_") for k in keys)


def test_kohya_fusion_is_the_same_update_and_unknown_modules_are_refused():
    from train.models.flux2 import flux2_to_kohya
    from train.models.kohya import kohya_delta

    g = torch.Generator().manual_seed(0)
    r, d = 4, 8
    sd = {}
    for part in ("to_q", "to_v"):  # to_k without LoRA: a zero block in the fused qkv
        sd[f"transformer_blocks.0.attn.{part}.lora_A.weight"] = torch.randn(r, d, generator=g)
        sd[f"transformer_blocks.0.attn.{part}.lora_B.weight"] = torch.randn(d, r, generator=g)
    out = flux2_to_kohya(sd, alpha=2.0)
    fused = kohya_delta(out, "lora_unet_double_blocks_0_img_attn_qkv")  # (3d, d)
    for j, part in enumerate(("to_q", "to_k", "to_v")):
        a = sd.get(f"transformer_blocks.0.attn.{part}.lora_A.weight")
        b = sd.get(f"transformer_blocks.0.attn.{part}.lora_B.weight")
        want = torch.zeros(d, d) if a is None else (b @ a) * 2.0 / r
        torch.testing.assert_close(fused[j * d : (j + 1) * d], want)
    with pytest.raises(ValueError, match="no kohya name"):
        flux2_to_kohya(
            {
                "norm_out.linear.lora_A.weight": torch.zeros(r, d),
                "norm_out.linear.lora_B.weight": torch.zeros(d, r),
            },
            alpha=4.0,
        )


def _loaded(tiny_weights: Path, model: str, **fields):
    from train.models import family_for

    spec = quick_spec(tiny_weights, model, **{"flow.max_sequence_length": TOKENS, **fields})
    family = family_for(spec, tiny_weights / model_info(model).tiny_name)
    family.load(torch.float32)
    return family


def test_the_loss_feeds_the_transformer_what_the_pipeline_feeds_it(tiny_weights, monkeypatch):
    """At sigma = 1 the noisy latent is the noise: the transformer inputs of one training step are
    exactly those of the pipeline's first denoising step started from that noise (latent tokens,
    position ids, text embeddings, timestep scale, guidance value)."""
    from train.models.base import Batch, BatchRandom

    family = _loaded(tiny_weights, "flux2-dev", **{"flow.guidance": 2.5})
    text = family.encode_prompts(["a red circle"], torch.device("cpu"))[0]
    seen: list[dict] = []
    family.denoiser.register_forward_pre_hook(lambda m, a, kw: seen.append(dict(kw)), with_kwargs=True)

    monkeypatch.setattr(family, "sample_sigmas", lambda rng, n: torch.ones(1))
    latent = torch.randn(1, 4, 8, 8)  # a 64 px image's VAE latent
    batch = Batch(
        latent,
        torch.zeros_like(latent),
        {"prompt_embeds": text["prompt_embeds"][None]},
        torch.zeros(1, 6),
        BatchRandom(torch.Generator().manual_seed(1), 1, 0, 1, torch.device("cpu")),
    )
    family.loss(family.denoiser, batch)
    ours = seen.pop()
    noise = ours["hidden_states"].transpose(1, 2).reshape(1, 16, 4, 4)  # unpack the tokens again

    family.pipe(
        prompt="a red circle",
        latents=noise,
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=2.5,
        max_sequence_length=TOKENS,
        output_type="latent",
    )
    theirs = seen[0]
    torch.testing.assert_close(ours["hidden_states"], theirs["hidden_states"])
    torch.testing.assert_close(ours["encoder_hidden_states"], theirs["encoder_hidden_states"])
    torch.testing.assert_close(ours["timestep"], theirs["timestep"])  # sigma itself, not 1000 x sigma
    torch.testing.assert_close(ours["guidance"], theirs["guidance"])
    assert torch.equal(ours["img_ids"], theirs["img_ids"][0]) and torch.equal(
        ours["txt_ids"], theirs["txt_ids"][0]
    )


def test_latents_are_normalised_as_the_pipeline_encodes_images(tiny_weights):
    family = _loaded(tiny_weights, "flux2-klein-4b")
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, _ = family.encode_images(pixels)
    # the pipeline's own path for reference images: mode of the posterior, patchify, batch-norm
    want = family.pipe._encode_vae_image(pixels, generator=None)
    torch.testing.assert_close(family.normalise(mean), want)
    assert not torch.allclose(want, family.pipe._patchify_latents(mean)), (
        "the tiny VAE's statistics are trivial"
    )


def test_velocity_target_integrates_back_to_the_data(tiny_weights, monkeypatch):
    """The pipeline's Euler steps with the training target (noise - x0) as the prediction land on
    x0: the sign and direction of the velocity are the scheduler's."""
    family = _loaded(tiny_weights, "flux2-dev")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 16, 16, generator=g), torch.randn(1, 16, 16, generator=g)  # packed
    velocity = noise - x0
    monkeypatch.setattr(type(family.denoiser), "forward", lambda self, hidden_states, **kw: (velocity,))
    out = family.pipe(
        prompt="x",
        latents=noise.transpose(1, 2).reshape(1, 16, 4, 4),
        height=64,
        width=64,
        num_inference_steps=4,
        output_type="latent",
    ).images
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)


def test_auto_timesteps_are_the_pipelines_many_step_shift(tiny_weights):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    from train.models.base import BatchRandom

    # BFL's empirical mu at its many-step anchor is Flux.1's resolution shift (256 -> 0.5, 4096 -> 1.15)
    for tokens in (256, 1024, 4096, 8192):
        assert compute_empirical_mu(tokens, 200) == pytest.approx(
            calculate_shift(tokens, 256, 4096, 0.5, 1.15), rel=1e-4
        )
    family = _loaded(tiny_weights, "flux2-klein-base-4b")
    rng = lambda: BatchRandom(torch.Generator().manual_seed(3), 4096, 0, 4096, torch.device("cpu"))  # noqa: E731
    u = torch.sigmoid(rng().randn())
    mu = compute_empirical_mu(4096, 200)
    torch.testing.assert_close(family.sample_sigmas(rng(), 4096), math.exp(mu) / (math.exp(mu) + (1 / u - 1)))
    assert 0.6 < float(family.sample_sigmas(rng(), 4096).median()) < 0.85  # shifted toward noise at 1024 px


def test_full_fine_tune_of_klein_4b_exports_a_loadable_pipeline(tiny_weights, sample_dataset, tmp_path):
    import json

    spec = quick_spec(tiny_weights, "flux2-klein-4b", mode="full", steps=2, learning_rate=1e-3)
    result, _ = train_quietly(spec, sample_dataset, tmp_path / "out")
    folder = result.weights[0]
    assert folder == tmp_path / "out" / "model"
    assert json.loads((folder / "model_index.json").read_text())["is_distilled"] is True
    tuned = _render("flux2-klein-4b", folder)
    assert np.abs(tuned - _render("flux2-klein-4b", tiny_weights / "tiny-flux2-klein-4b")).max() > 0.0


@pytest.mark.parametrize("model", ["flux2-dev", "flux2-klein-9b", "flux2-klein-base-9b"])
def test_full_fine_tunes_that_do_not_fit_are_refused_naming_why(model):
    from train.spec import SpecError, parse_spec

    with pytest.raises(SpecError, match=r"full fine-tune of .* refused: .*B-parameter transformer.*80 GB"):
        parse_spec({"model": model, "mode": "full"})


def _img(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_run_entry_renders_klein_with_and_without_the_lora(
    cog_weights, sample_dataset, tmp_path, monkeypatch
):
    """train/inference.py (predict.py's core): the trainer's own version renders the base model;
    a version with the training's output renders with its LoRA, as the stock pipeline does."""
    from train.inference import InferenceSession, RenderRequest

    model = "flux2-klein-base-4b"
    monkeypatch.setenv("ADVANCED_TRAINER_WEIGHTS", str(cog_weights))
    monkeypatch.setattr("train.weights.WEIGHTS_DIR", cog_weights)
    monkeypatch.setenv("ADVANCED_TRAINER_RUN_MODEL", model)
    monkeypatch.setenv("ADVANCED_TRAINER_RUN_BASE", model_info(model).tiny_name)
    spec = quick_spec(
        cog_weights,
        model,
        steps=6,
        learning_rate=1e-2,
        trigger_word="sks",
        **{"flow.max_sequence_length": TOKENS},
    )
    train_quietly(spec, sample_dataset, tmp_path / "out")
    req = RenderRequest(
        prompt="sks, a red circle",
        aspect_ratio="custom",
        width=64,
        height=64,
        num_inference_steps=2,
        seed=3,
        output_format="png",
    )

    plain = InferenceSession(None, log=lambda _: None, cache_dir=tmp_path / "c1")
    trained = InferenceSession(str(tmp_path / "out"), log=lambda _: None, cache_dir=tmp_path / "c2")
    assert plain.renderer.pixel_multiple() == 16
    without = _img(plain.predict(req, tmp_path / "a")[0])
    with_lora = _img(trained.predict(req, tmp_path / "b")[0])
    assert np.abs(with_lora - without).max() > 2, "the trained LoRA changed nothing in the run entry"

    pipe = _pipeline_cls(model).from_pretrained(cog_weights / model_info(model).tiny_name)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(tmp_path / "out")
    stock = pipe(
        prompt="sks, a red circle",
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=model_info(model).render_guidance,
        max_sequence_length=TOKENS,
        generator=torch.Generator().manual_seed(3),
    )
    assert np.abs(with_lora - np.asarray(stock.images[0]).astype(int)).max() <= 2


def test_registry_figures_follow_the_rules():
    for model in FLUX2_MODELS:
        info = model_info(model)
        fits = info.denoiser_params_b * 10 <= 72
        assert (info.full_finetune == "") == fits, model
        assert info.memory_measured is False and info.activation_bytes > 0, model
        assert info.guidance_embed == (model == "flux2-dev"), model
        assert info.tokens_per_sample(1024) == 64 * 64 + 512, model
