"""FLUX.1 Kontext [dev], what the family contract (tests/test_family_contract.py) does not cover:
the training step feeds the transformer what the stock FluxKontextPipeline feeds it for an edit
(control tokens after the target's, their position ids, guidance, timestep), the loss is on the
target tokens only, renders resize the control as the training did, and a full fine-tune exports a
Kontext pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux_kontext import FluxKontextPipeline
from PIL import Image

from conftest import quick_spec, train_quietly
from train.cache import _to_tensor
from train.families import model_info
from train.models.base import Batch, BatchRandom
from train.models.flux_kontext.family import FluxKontextFamily
from train.sample_data import PAIR_INSTRUCTION, draw_pair

MODEL = "flux1-kontext-dev"
TOKENS = 32  # prompt tokens: the tiny tokenizer fits the instruction in far fewer than 512
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def family(tiny_weights) -> FluxKontextFamily:
    from train.models import family_for

    spec = quick_spec(tiny_weights, MODEL, **{"flow.max_sequence_length": TOKENS, "flow.guidance": 2.5})
    loaded = family_for(spec, tiny_weights / model_info(MODEL).tiny_name)
    assert isinstance(loaded, FluxKontextFamily)
    loaded.load(torch.float32)
    return loaded


def _batch(family: FluxKontextFamily, target: torch.Tensor, control: torch.Tensor) -> Batch:
    """A batch of one whose sampled target latent is exactly ``target`` (zero posterior std)."""
    (text,) = family.encode_prompts([PAIR_INSTRUCTION], CPU)
    return Batch(
        target,
        torch.zeros_like(target),
        {k: v[None] for k, v in text.items()},
        torch.zeros(1, 6),
        BatchRandom(torch.Generator().manual_seed(1), 1, 0, 1, CPU),
        controls=[control],
    )


def _capture(module: torch.nn.Module, seen: list[dict[str, Any]]):
    return module.register_forward_pre_hook(lambda m, a, kw: seen.append(dict(kw)), with_kwargs=True)


def _pipe(family: FluxKontextFamily) -> Any:
    pipe: Any = FluxKontextPipeline(**family.pipe.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- the objective is the pipeline's ------------------------------------------------------------------


def test_training_inputs_are_what_the_pipeline_feeds_its_transformer(family, monkeypatch):
    """At sigma = 1 the noisy target is the noise: one training step's transformer inputs are exactly
    those of the pipeline's first denoising step started from that noise with the control image as
    its input image (a 96 x 64 control for a 64 x 64 target: two token counts, two id grids)."""
    control = draw_pair(99, size=(96, 64))[0]
    z = family.encode_controls(_to_tensor(control)[None])  # (1, C, 8, 12): the cache's path
    seen: list[dict[str, Any]] = []
    handle = _capture(family.denoiser, seen)
    monkeypatch.setattr(family, "sample_sigmas", lambda rng, n: torch.ones(1))
    try:
        family.loss(family.denoiser, _batch(family, torch.randn(1, 4, 8, 8), z))
        ours = seen.pop()
        _pipe(family)(
            prompt=PAIR_INSTRUCTION,
            image=control,
            latents=ours["hidden_states"][:, :16],  # the packed noise: 64 px -> 4 x 4 tokens
            height=64,
            width=64,
            max_area=64 * 64,
            _auto_resize=False,  # the control as it is (96 x 64: a multiple of 16)
            num_inference_steps=2,
            guidance_scale=2.5,
            max_sequence_length=TOKENS,
            output_type="latent",
        )
    finally:
        handle.remove()
    theirs = seen[0]
    assert ours["hidden_states"].shape == (1, 16 + 24, 16)  # target tokens, then the control's 4 x 6
    assert torch.equal(ours["hidden_states"][:, :16], theirs["hidden_states"][:, :16])
    # the control's: the cache's x / 127.5 - 1 and the pipeline's x / 255 * 2 - 1 differ by an ulp
    torch.testing.assert_close(ours["hidden_states"], theirs["hidden_states"], atol=1e-4, rtol=1e-4)
    assert torch.equal(ours["img_ids"], theirs["img_ids"]) and torch.equal(ours["txt_ids"], theirs["txt_ids"])
    assert torch.equal(ours["img_ids"][16:, 0], torch.ones(24))  # the control's first coordinate: 1
    grid = torch.tensor([[r, c] for r in range(4) for c in range(6)], dtype=ours["img_ids"].dtype)
    assert torch.equal(ours["img_ids"][16:, 1:], grid)  # rows and columns of the control's own grid
    torch.testing.assert_close(ours["timestep"], theirs["timestep"])  # sigma, not 1000 x sigma
    torch.testing.assert_close(ours["guidance"], theirs["guidance"])
    torch.testing.assert_close(ours["encoder_hidden_states"], theirs["encoder_hidden_states"])
    torch.testing.assert_close(ours["pooled_projections"], theirs["pooled_projections"])


def test_the_loss_is_on_the_target_tokens_and_the_pipeline_samples_its_objective(family):
    """An oracle that predicts the training target (noise - x0) exactly for the target tokens and
    garbage for the control's has zero loss (the control tokens are not scored), and the stock
    pipeline sampling with it, the control as its input image, lands exactly on x0."""
    control = draw_pair(99)[0]
    target = family.encode_images(_to_tensor(draw_pair(99)[1])[None])[0]  # (1, C, 8, 8)
    cfg = family.pipe.vae.config
    x0 = FluxKontextPipeline._pack_latents((target - cfg.shift_factor) * cfg.scaling_factor, 1, 4, 8, 8)

    def oracle(module, args, kwargs, output):
        hs, s = kwargs["hidden_states"], kwargs["timestep"].view(-1, 1, 1)
        return (torch.cat([(hs[:, :16] - x0) / s, torch.full_like(hs[:, 16:], 1e3)], dim=1),)

    handle = family.denoiser.register_forward_hook(oracle, with_kwargs=True)
    try:
        z = family.encode_controls(_to_tensor(control)[None])
        loss = family.loss(family.denoiser, _batch(family, target, z))
        sampled = _pipe(family)(
            prompt=PAIR_INSTRUCTION,
            **family.control_inputs([control], 64),
            num_inference_steps=4,
            max_sequence_length=TOKENS,
            output_type="latent",
        ).images
    finally:
        handle.remove()
    assert float(loss) < 1e-10, float(loss)
    torch.testing.assert_close(sampled, x0, atol=1e-5, rtol=1e-5)


def test_control_latents_are_normalised_as_the_pipeline_encodes_its_input_image(family):
    pixels = _to_tensor(draw_pair(3)[0])[None]
    ours, _ = family.control_tokens(
        _batch(family, torch.zeros(1, 4, 8, 8), family.encode_controls(pixels)), torch.float32
    )
    want = family.pipe._encode_vae_image(pixels, generator=None)  # posterior mode, shift and scale
    torch.testing.assert_close(ours, FluxKontextPipeline._pack_latents(want, 1, 4, 8, 8))


# -- renders ----------------------------------------------------------------------------------------------


def test_small_renders_place_the_control_as_the_cache_does_and_output_its_size(family):
    """At 64 px the control is not snapped to PREFERRED_KONTEXT_RESOLUTIONS (1 MP: 4096 control
    tokens for a 16-token output) but resized into its own bucket, as training controls are, and the
    render has that size: the control's position ids then cover exactly the output's grid."""
    from train.buckets import place

    control = draw_pair(5, size=(96, 64))[0]
    inputs = family.control_inputs([control], 64)
    bucket = place(96, 64, [64], 16)[0].bucket
    assert bucket == (80, 48)
    assert inputs["image"].size == bucket and inputs["_auto_resize"] is False
    assert (inputs["width"], inputs["height"], inputs["max_area"]) == (80, 48, 80 * 48)
    seen: list[dict[str, Any]] = []
    handle = _capture(family.denoiser, seen)
    try:
        (text,) = family.encode_prompts([PAIR_INSTRUCTION], CPU)
        image = family.render(text, 64, 2, 2.5, 0, CPU, controls=[control])
        other = family.render(text, 64, 2, 2.5, 0, CPU, controls=[draw_pair(6, size=(96, 64))[0]])
    finally:
        handle.remove()
    assert image.size == bucket
    assert seen[0]["hidden_states"].shape[1] == 2 * (80 // 16) * (48 // 16)  # target and control alike
    assert image.tobytes() != other.tobytes(), "the control image does not reach the render"


def test_renders_at_one_megapixel_take_the_pipelines_own_resizing(family):
    inputs = family.control_inputs([Image.new("RGB", (1536, 1024))], 1024)
    assert inputs["_auto_resize"] is True and inputs["image"].size == (1536, 1024)  # the pipeline resizes
    w, h = inputs["width"], inputs["height"]
    assert (w, h) == (1248, 832)  # PREFERRED_KONTEXT_RESOLUTIONS' nearest to 3:2
    # what __call__ makes of height / width / max_area: the same size (its multiple is 16)
    aspect = w / h
    assert round((inputs["max_area"] * aspect) ** 0.5) // 16 * 16 == w
    assert round((inputs["max_area"] / aspect) ** 0.5) // 16 * 16 == h


# -- the registry -----------------------------------------------------------------------------------------


def test_full_fine_tune_is_allowed_as_for_flux_dev():
    from train.spec import parse_spec

    assert model_info(MODEL).full_finetune == model_info("flux-dev").full_finetune == ""
    assert parse_spec({"model": MODEL, "mode": "full"}).mode == "full"
    spec = parse_spec({"model": MODEL})
    assert spec.validation.guidance_scale == 2.5 and spec.flow.max_sequence_length == 512


# -- a full fine-tune on pairs (the LoRA's round trip is the family contract's) -------------------------


def _stock_edit(base: Path, lora_dir: Path | None = None, weight_name: str | None = None) -> np.ndarray:
    """The stock pipeline (its own text encoders) editing a held-out control at a fixed seed."""
    pipe: Any = FluxKontextPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir, **({"weight_name": weight_name} if weight_name else {}))
    out = pipe(
        prompt=PAIR_INSTRUCTION,
        image=draw_pair(99)[0],  # not one of the six training pairs
        height=64,
        width=64,
        max_area=64 * 64,
        _auto_resize=False,
        num_inference_steps=3,
        guidance_scale=model_info(MODEL).render_guidance,
        max_sequence_length=TOKENS,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    return np.asarray(out.images[0])


def test_kontext_full_fine_tune_exports_a_kontext_pipeline(tiny_weights, pair_dataset, tmp_path):
    import json

    spec = quick_spec(
        tiny_weights,
        MODEL,
        mode="full",
        steps=2,
        learning_rate=1e-3,
        **{"flow.max_sequence_length": TOKENS},
    )
    result, _ = train_quietly(spec, pair_dataset, tmp_path / "out")
    assert result is not None
    folder = result.weights[0]
    assert folder == tmp_path / "out" / "model"
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "FluxKontextPipeline"
    tuned = _stock_edit(folder)
    assert np.abs(tuned - _stock_edit(tiny_weights / model_info(MODEL).tiny_name)).max() > 0.0
