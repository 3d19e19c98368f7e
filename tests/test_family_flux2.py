"""Flux.2 ([dev] and [klein]), what the family contract (tests/test_family_contract.py) does not
cover: its kohya/ComfyUI names (q/k/v fused, the same update), latents normalised as the pipelines
encode images, the velocity's direction, ``auto`` noise levels (BFL's empirical mu), full fine-tunes
(klein 4B exported, the others refused), the registry's figures. Reference images (issue 14): their
tokens and position ids are the pipelines' own, the loss is on the target's tokens, a LoRA trained
on pairs edits a held-out reference through the stock pipeline and the run entry."""

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
def test_the_default_lora_has_sd_scripts_flux2_names(tiny_weights, model):
    """Every module of the default targets gets a kohya name (q/k/v fused per stream, the single
    blocks' fused linears as linear1 / linear2); the round trip through diffusers' reader is the
    family contract's."""
    from peft.utils import get_peft_model_state_dict

    from train.loop import make_trainable
    from train.models.flux2.family import flux2_to_kohya

    family = _loaded(tiny_weights, model)
    make_trainable(family.spec, family.denoiser)
    keys = set(flux2_to_kohya(get_peft_model_state_dict(family.denoiser), 8.0))
    for name in ("double_blocks_0_img_attn_qkv", "double_blocks_0_txt_mlp_2", "single_blocks_0_linear1"):
        assert f"lora_unet_{name}.lora_down.weight" in keys, name
    assert all(k.startswith("lora_unet_") for k in keys)


def test_kohya_fusion_is_the_same_update_and_unknown_modules_are_refused():
    from train.models.flux2.family import flux2_to_kohya
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


def test_registry_figures_follow_the_rules():
    for model in FLUX2_MODELS:
        info = model_info(model)
        fits = info.denoiser_params_b * 10 <= 72
        assert (info.full_finetune == "") == fits, model
        assert info.memory_measured is False and info.activation_bytes > 0, model
        assert info.guidance_embed == (model == "flux2-dev"), model
        assert info.tokens_per_sample(1024) == 64 * 64 + 512, model


# -- reference images (issue 14): Flux2Pipeline / Flux2KleinPipeline image=[...] ---------------------


def _references(sizes: list[tuple[int, int]]) -> list[Image.Image]:
    """Reference images of the given (width, height), each side a multiple of 16 (the pipelines
    crop to one), at least 64 px (their minimum)."""
    from train.sample_data import draw_pair

    return [draw_pair(10 + i, size)[0] for i, size in enumerate(sizes)]


@pytest.mark.parametrize("model", ["flux2-klein-4b", "flux2-dev"])
def test_references_enter_the_transformer_as_the_pipeline_feeds_them(tiny_weights, monkeypatch, model):
    """With 1 and with 2 references (of other sizes than the target): one training step at sigma = 1
    feeds the transformer what the pipeline's first step does with ``image=[...]``: the noise's
    tokens followed by each reference's (mode, patchified, batch-normalised, packed), position ids
    with time coordinates 0 (target), 10, 20 (references), the text ids, the timestep, guidance."""
    from train.cache import _to_tensor
    from train.models.base import Batch, BatchRandom

    family = _loaded(tiny_weights, model, **{"flow.guidance": 2.5})
    text = family.encode_prompts(["make the square red"], torch.device("cpu"))[0]
    seen: list[dict] = []
    family.denoiser.register_forward_pre_hook(lambda m, a, kw: seen.append(dict(kw)), with_kwargs=True)
    monkeypatch.setattr(family, "sample_sigmas", lambda rng, n: torch.ones(1))
    for sizes in ([(64, 64)], [(96, 64), (64, 80)]):
        refs = _references(sizes)
        latent = torch.randn(1, 4, 8, 8)  # the 64 px target's VAE latent
        batch = Batch(
            latent,
            torch.zeros_like(latent),
            {"prompt_embeds": text["prompt_embeds"][None]},
            torch.zeros(1, 6),
            BatchRandom(torch.Generator().manual_seed(1), 1, 0, 1, torch.device("cpu")),
            controls=[family.encode_controls(_to_tensor(r)[None]) for r in refs],
        )
        seen.clear()
        family.loss(family.denoiser, batch)
        ours = seen.pop()
        noise = ours["hidden_states"][:, :16].transpose(1, 2).reshape(1, 16, 4, 4)
        family.pipe(
            prompt="make the square red",
            image=refs,
            latents=noise,
            height=64,
            width=64,
            num_inference_steps=2,
            guidance_scale=2.5,
            max_sequence_length=TOKENS,
            output_type="latent",
        )
        theirs = seen[0]
        ref_tokens = sum(w * h // 256 for w, h in sizes)
        assert ours["hidden_states"].shape == (1, 16 + ref_tokens, 16)
        # the same pixels, but the pipeline's tensor is channels-last in memory (numpy's HWC
        # permuted), so the VAE's convolutions round differently: ~1e-5, not a different input
        torch.testing.assert_close(ours["hidden_states"], theirs["hidden_states"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours["encoder_hidden_states"], theirs["encoder_hidden_states"])
        torch.testing.assert_close(ours["timestep"], theirs["timestep"])
        assert (ours["guidance"] is None) == (theirs["guidance"] is None) == (model != "flux2-dev")
        if ours["guidance"] is not None:
            torch.testing.assert_close(ours["guidance"], theirs["guidance"])
        assert torch.equal(ours["img_ids"], theirs["img_ids"][0])
        assert torch.equal(ours["txt_ids"], theirs["txt_ids"][0])
        times = ours["img_ids"][:, 0].unique_consecutive().tolist()
        assert times == [0, 10, 20][: 1 + len(sizes)]


def test_the_loss_is_on_the_target_tokens_only(tiny_weights, monkeypatch):
    """A prediction that is exact on the target's tokens and arbitrary on the references' has no
    loss: the references' outputs are dropped, as the pipelines drop them."""
    from train.models.base import Batch, BatchRandom

    family = _loaded(tiny_weights, "flux2-klein-4b")
    monkeypatch.setattr(family, "sample_sigmas", lambda rng, n: torch.ones(1))
    latent = torch.randn(1, 4, 8, 8)
    x0 = family.pipeline_cls._pack_latents(family.normalise(latent))  # (1, 16, 16)

    def exact_on_the_target(self, hidden_states, **kw):
        velocity = hidden_states[:, :16] - x0  # at sigma 1 the input is the noise: noise - x0
        return (torch.cat([velocity, 1e3 * torch.randn_like(hidden_states[:, 16:])], dim=1),)

    monkeypatch.setattr(type(family.denoiser), "forward", exact_on_the_target)
    batch = Batch(
        latent,
        torch.zeros_like(latent),
        {"prompt_embeds": torch.zeros(1, 8, 48)},
        torch.zeros(1, 6),
        BatchRandom(torch.Generator().manual_seed(1), 1, 0, 1, torch.device("cpu")),
        controls=[torch.randn(1, 4, 8, 8), torch.randn(1, 4, 12, 8)],
    )
    assert float(family.loss(family.denoiser, batch)) < 1e-10


def test_prompts_do_not_read_the_references():
    """The pipelines' encode_prompt takes no images (only [dev]'s optional caption upsampling reads
    them): the prompt embeddings are the text-to-image ones, cached once per caption."""
    import inspect

    from train.models import family_class

    for model in FLUX2_MODELS:
        cls = family_class(model)
        assert cls.text_reads_controls is False, model
        assert "image" not in inspect.signature(cls.pipeline_cls.encode_prompt).parameters, model
        info = model_info(model)
        assert info.max_controls == (6 if model == "flux2-dev" else 4) and not info.controls_required


@pytest.fixture(scope="module")
def reference_run(tiny_weights, pair_dataset, tmp_path_factory):
    """One [klein] 4B LoRA (the cheapest Flux.2 tiny: distilled, no CFG) trained on the pair set,
    the loss recording how many references each step's batch carried."""
    from train.models.flux2.family import Flux2Family

    references: list[int] = []
    loss = Flux2Family.loss

    def counting(self, model, batch):
        references.append(len(batch.controls))
        return loss(self, model, batch)

    spec = quick_spec(
        tiny_weights,
        "flux2-klein-4b",
        steps=100,
        learning_rate=1e-2,
        **{"lora.alpha": 8, "flow.max_sequence_length": TOKENS},
    )
    out = tmp_path_factory.mktemp("flux2-references")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Flux2Family, "loss", counting)
        result, _ = train_quietly(spec, pair_dataset, out)
    return result, out, references


def test_two_references_train_each_in_its_own_bucket_with_its_own_time(tiny_weights, tmp_path, monkeypatch):
    """``NAME_control`` and ``NAME_control_1`` of other sizes than the target: every step's
    sequence carries both, in that order, each at its own aspect bucket of the training resolution
    (a 96x64 reference: 80x48 px, 5x3 tokens) and time coordinate (10, then 20)."""
    from train.buckets import place
    from train.models.flux2.family import Flux2Family
    from train.sample_data import draw_pair

    data = tmp_path / "refs"
    data.mkdir()
    for i in range(3):
        control, target = draw_pair(i)
        target.save(data / f"look_{i}.png")
        control.save(data / f"look_{i}_control.png")
        draw_pair(20 + i, (96, 64))[0].save(data / f"look_{i}_control_1.png")
        (data / f"look_{i}.txt").write_text("the square from image 1, red, on image 2's background")
    seen: list[tuple] = []
    tokens = Flux2Family._reference_tokens

    def recording(self, batch):
        out = tokens(self, batch)
        assert out is not None
        seen.append(
            (tuple(tuple(c.shape[1:]) for c in batch.controls), out[1][:, 0].unique_consecutive().tolist())
        )
        return out

    monkeypatch.setattr(Flux2Family, "_reference_tokens", recording)
    spec = quick_spec(tiny_weights, "flux2-klein-4b", steps=3, **{"flow.max_sequence_length": TOKENS})
    train_quietly(spec, data, tmp_path / "out")
    w, h = place(96, 64, [64], 16)[0].bucket
    assert (w, h) == (80, 48)
    assert seen and all(s == (((4, 8, 8), (4, h // 8, w // 8)), [10, 20]) for s in seen), seen


def _render_edit(base: Path, reference: Image.Image, lora_dir: Path | None = None, **lora) -> np.ndarray:
    """The stock Flux2KleinPipeline (its own text encoder) editing ``reference``, at a fixed seed."""
    pipe = _pipeline_cls("flux2-klein-4b").from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir, **lora)
    out = pipe(
        prompt="make the square red",
        image=[reference],
        num_inference_steps=3,
        height=64,
        width=64,
        max_sequence_length=TOKENS,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    return np.asarray(out.images[0])


def test_a_lora_trained_with_references_lowers_its_loss(reference_run):
    result, _, references = reference_run
    assert references and set(references) == {1}, "every step trained with its pair's reference"
    losses = [v for _, v in result.losses]
    first, last = _tenths(losses)
    assert last < first * 0.9, f"loss did not fall: first tenth {first:.4f}, last tenth {last:.4f}"


def test_validation_renders_on_a_reference_side_by_side(reference_run):
    """The validation sample is a pair's control | the render with it as the reference."""
    from train.edit import GAP
    from train.sample_data import draw_pair

    result, _, _ = reference_run
    with Image.open(result.samples[-1]) as sample:
        assert sample.size == (64 + GAP + 64, 64)
        control = np.asarray(sample.convert("RGB").crop((0, 0, 64, 64))).astype(int)
    controls = [np.asarray(draw_pair(i)[0]).astype(int) for i in range(6)]
    assert any(np.array_equal(control, c) for c in controls)


def test_the_reference_lora_changes_the_stock_pipelines_edit_of_a_held_out_image(reference_run, tiny_weights):
    """A reference the training never saw, edited by the stock pipeline at a fixed seed: the
    exported LoRA changes the result, and its kohya copy renders the same."""
    from train.sample_data import draw_pair

    _, out, _ = reference_run
    base = tiny_weights / model_info("flux2-klein-4b").tiny_name
    held_out = draw_pair(99)[0]
    plain = _render_edit(base, held_out)
    with_lora = _render_edit(base, held_out, out)
    with_kohya = _render_edit(base, held_out, out, weight_name="lora_kohya.safetensors")
    assert np.abs(with_lora - plain).max() > 0.02, "the LoRA does not change the edit"
    np.testing.assert_allclose(
        with_kohya, with_lora, atol=1e-4, err_msg="kohya export differs from diffusers"
    )


def test_run_entry_edits_with_references_as_the_stock_pipeline(
    reference_run, cog_weights, tmp_path, monkeypatch
):
    """train/inference.py (predict.py's core) with input_image and input_images: the trained
    LoRA renders both references as the stock pipeline does with image=[...]; a text-to-image
    request of the same model is still served; more references than [klein] takes are refused."""
    from dataclasses import replace

    from train.inference import InferenceSession, InputError, RenderRequest
    from train.sample_data import draw_pair

    model = "flux2-klein-4b"
    _, out, _ = reference_run
    monkeypatch.setenv("ADVANCED_TRAINER_WEIGHTS", str(cog_weights))
    monkeypatch.setattr("train.weights.WEIGHTS_DIR", cog_weights)
    monkeypatch.setenv("ADVANCED_TRAINER_RUN_MODEL", model)
    monkeypatch.setenv("ADVANCED_TRAINER_RUN_BASE", model_info(model).tiny_name)
    refs = [draw_pair(99)[0], draw_pair(98, (96, 64))[0]]
    paths = []
    for i, ref in enumerate(refs):
        paths.append(str(tmp_path / f"ref{i}.png"))
        ref.save(paths[-1])
    req = RenderRequest(
        prompt="make the square red",
        input_images=tuple(paths),
        num_inference_steps=2,
        seed=3,
        output_format="png",
        width=64,
        height=64,
        aspect_ratio="custom",
    )
    session = InferenceSession(str(out), log=lambda _: None, cache_dir=tmp_path / "c")
    edited = _img(session.predict(req, tmp_path / "a")[0])
    plain = _img(session.predict(replace(req, input_images=()), tmp_path / "b")[0])
    assert np.abs(edited - plain).max() > 2, "the references changed nothing"
    with pytest.raises(InputError, match="at most 4"):
        session.predict(replace(req, input_images=(paths[0],) * 5), tmp_path / "c")

    pipe = _pipeline_cls(model).from_pretrained(cog_weights / model_info(model).tiny_name)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(out)
    stock = pipe(
        prompt="make the square red",
        image=refs,
        height=64,
        width=64,
        num_inference_steps=2,
        max_sequence_length=TOKENS,
        generator=torch.Generator().manual_seed(3),
    )
    assert np.abs(edited - np.asarray(stock.images[0]).astype(int)).max() <= 2
