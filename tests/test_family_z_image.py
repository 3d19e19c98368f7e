"""Z-Image (turbo and base), what the family contract (tests/test_family_contract.py) does not
cover: cached prompts are the pipeline's, the objective's flipped time and negated output are the
pipeline's (an oracle denoiser), the base renders with CFG and a negative prompt, and a full
fine-tune trains and exports a pipeline the stock class loads."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from conftest import quick_spec, train_quietly
from test_family_qwen_image import (
    PROMPT,
    _batch,
    _loaded,
    _open,
    _pixels,
)
from train.inference import InferenceSession, RenderRequest
from train.models.z_image.family import ZImageFamily
from train.spec import parse_spec


def test_z_image_text_conditioning_is_the_pipelines(tiny_weights):
    """Cached prompts (padded to the prompt length, with a mask) come back as exactly the
    variable-length embeddings the pipeline's encode_prompt gives the transformer."""
    family = _loaded(tiny_weights, "z-image-turbo")
    assert isinstance(family, ZImageFamily)
    prompts = ["a red circle", "sks, a small blue square on a green background"]
    cached = family.encode_prompts(prompts, torch.device("cpu"))
    assert all(c["prompt_embeds"].shape[0] == family.spec.flow.max_sequence_length for c in cached)
    got = family.caption_list({k: torch.stack([c[k] for c in cached]) for k in cached[0]})
    want, _ = family.pipe.encode_prompt(
        prompts, device=torch.device("cpu"), do_classifier_free_guidance=False, max_sequence_length=512
    )
    assert [g.shape for g in got] == [w.shape for w in want] and got[0].shape != got[1].shape
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("model", ["z-image-turbo", "z-image"])
def test_z_image_objective_is_what_the_pipeline_samples(tiny_weights, model):
    """An oracle that reads its inputs with the loss's conventions (time = 1 - sigma, output =
    x0 - noise, latents scaled and shifted as the VAE config says) has zero training loss, and
    the stock pipeline sampling with it lands exactly on the image's latent."""
    from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline

    family = _loaded(tiny_weights, model)
    assert isinstance(family, ZImageFamily)
    z = family.encode_images(_pixels())[0][0]  # (C, h, w): the posterior mean of a 64 px image
    cfg = family.pipe.vae.config
    x0 = ((z - cfg.shift_factor) * cfg.scaling_factor)[:, None]  # (C, 1 frame, h, w)
    times: list[torch.Tensor] = []

    def oracle(module, args, kwargs, output):
        xs, t = args[0], args[1]
        times.append(t)
        return ([-(x - x0) / (1 - ti) for x, ti in zip(xs, t, strict=True)],)

    handle = family.denoiser.register_forward_hook(oracle, with_kwargs=True)
    try:
        loss = family.loss(family.denoiser, _batch(family, z, PROMPT))
        assert float(loss) < 1e-10, float(loss)
        text = family.render_inputs(
            family.encode_prompts([PROMPT], torch.device("cpu"))[0], torch.device("cpu")
        )
        pipe: Any = ZImagePipeline(**{"text_encoder": None, "tokenizer": None, **family.render_components()})
        pipe.set_progress_bar_config(disable=True)
        times.clear()
        guidance = 0.0 if model == "z-image-turbo" else 4.0  # with CFG the oracle's two halves agree
        image = pipe(
            **text, guidance_scale=guidance, height=64, width=64, num_inference_steps=4, output_type="pt"
        ).images
    finally:
        handle.remove()
    # what the pipeline fed the transformer: 1 - sigma, sigma from the scheduler's fixed shift
    sigmas = pipe.scheduler.sigmas[:4]
    assert pipe.scheduler.config.shift == (3.0 if model == "z-image-turbo" else 6.0)
    torch.testing.assert_close(torch.stack([t[0] for t in times]), 1 - sigmas.float())
    decoded = family.pipe.vae.decode(z[None], return_dict=False)[0]
    want = pipe.image_processor.postprocess(decoded, output_type="pt")
    torch.testing.assert_close(image, want, atol=1e-4, rtol=0)


def test_z_image_base_renders_with_cfg_and_a_negative_prompt(monkeypatch, cog_weights, tmp_path):
    monkeypatch.setenv("ADVANCED_TRAINER_WEIGHTS", str(cog_weights))
    monkeypatch.setattr("train.weights.WEIGHTS_DIR", cog_weights)
    monkeypatch.setenv("ADVANCED_TRAINER_RUN_MODEL", "z-image")
    monkeypatch.setenv("ADVANCED_TRAINER_RUN_BASE", "tiny-z-image")
    session = InferenceSession(None, log=lambda _: None, cache_dir=tmp_path / "cache")
    base: dict[str, Any] = dict(
        prompt="a red circle", aspect_ratio="custom", width=64, height=64, num_inference_steps=2, seed=3,
        output_format="png",
    )  # fmt: skip
    plain = np.asarray(_open(session.predict(RenderRequest(**base), tmp_path / "a")[0]), dtype=int)
    negative = RenderRequest(**base, negative_prompt="blue")
    other = np.asarray(_open(session.predict(negative, tmp_path / "b")[0]), dtype=int)
    assert np.abs(plain - other).max() > 2, "negative_prompt changed nothing on Z-Image (base)"


def test_z_image_full_fine_tune_trains_and_exports_a_pipeline(cog_weights, sample_dataset, tmp_path):
    from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline

    assert parse_spec({"model": "z-image-turbo", "mode": "full"}).mode == "full"  # 6.15 B fits 80 GB
    spec = quick_spec(cog_weights, "z-image-turbo", mode="full", steps=2, learning_rate=1e-3)
    result, _ = train_quietly(spec, sample_dataset, tmp_path / "out")
    assert result is not None and result.weights == [tmp_path / "out" / "model"]
    pipe: Any = ZImagePipeline.from_pretrained(tmp_path / "out" / "model")
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red circle", num_inference_steps=2, height=64, width=64, guidance_scale=0.0,
        generator=torch.Generator().manual_seed(0),
    ).images[0]  # fmt: skip
    assert image.size == (64, 64)
    base = ZImagePipeline.from_pretrained(cog_weights / "tiny-z-image-turbo").transformer.state_dict()
    trained = pipe.transformer.state_dict()
    assert any(not torch.equal(base[k], trained[k]) for k in base), "the full fine-tune changed no weight"
