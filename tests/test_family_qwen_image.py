"""Qwen-Image on its tiny pipeline: the LoRA learns, the stock pipeline loads both exports (the
kohya/ComfyUI one renders the same image), the objective is the one the pipeline samples with,
the run entry renders it, and a full fine-tune is refused."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import quick_spec, train_quietly
from train.inference import InferenceSession, RenderRequest
from train.models.base import Batch, BatchRandom, Family
from train.models.qwen_image import QwenImageFamily
from train.spec import SpecError, parse_spec

PROMPT = "sks, a red circle on a blue background"


def _tenths(losses: list[float]) -> tuple[float, float]:
    n = max(1, len(losses) // 10)
    return statistics.mean(losses[:n]), statistics.mean(losses[-n:])


def _train_once(weights: Path, sample_dataset: Path, out: Path, model: str) -> Any:
    """The one LoRA run a family's tests share (alpha != rank: both export formats must carry
    the scale); ``weights`` is the Cog weights folder (the tiny pipelines with a manifest)."""
    spec = quick_spec(weights, model, steps=30, learning_rate=2e-2, trigger_word="sks", **{"lora.alpha": 8})
    result, _ = train_quietly(spec, sample_dataset, out)
    return result


def _assert_loss_falls(result: Any) -> None:
    first, last = _tenths([v for _, v in result.losses])
    assert last < first * 0.9, f"loss did not fall: first tenth {first:.4f}, last tenth {last:.4f}"


def _stock_render(
    pipe_cls: Any, base: Path, lora_dir: Path | None = None, weight_name: str | None = None, **kw
):
    pipe = pipe_cls.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir, **({"weight_name": weight_name} if weight_name else {}))
    out = pipe(
        PROMPT,
        num_inference_steps=3,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **kw,
    )
    return np.asarray(out.images[0])


def _assert_exports_load(result: Any, weights: Path, model: str, pipe_cls: Any, **kw) -> None:
    """The LoRA changes the stock render, and its kohya/ComfyUI file renders the same image as
    the diffusers one (both loaded with the stock pipeline's load_lora_weights)."""
    assert [p.name for p in result.weights] == ["pytorch_lora_weights.safetensors", "lora_kohya.safetensors"]
    base, out = weights / f"tiny-{model}", result.out_dir
    plain = _stock_render(pipe_cls, base, **kw)
    with_lora = _stock_render(pipe_cls, base, out, **kw)
    with_kohya = _stock_render(pipe_cls, base, out, weight_name="lora_kohya.safetensors", **kw)
    assert np.abs(with_lora - plain).max() > 0.02, "the LoRA does not change the image"
    np.testing.assert_allclose(
        with_kohya, with_lora, atol=1e-4, err_msg="kohya export differs from diffusers"
    )


def _assert_run_entry_renders(monkeypatch, weights: Path, result: Any, tmp_path: Path, model: str) -> None:
    """train.inference (predict.py's core) renders the base alone and with the trained LoRA."""
    monkeypatch.setenv("ADVANCED_TRAINER_WEIGHTS", str(weights))
    monkeypatch.setattr("train.weights.WEIGHTS_DIR", weights)
    monkeypatch.setenv("ADVANCED_TRAINER_RUN_MODEL", model)
    monkeypatch.setenv("ADVANCED_TRAINER_RUN_BASE", f"tiny-{model}")
    req = RenderRequest(
        prompt="sks, a red circle", aspect_ratio="custom", width=64, height=64,
        num_inference_steps=2, seed=3, output_format="png",
    )  # fmt: skip
    plain = InferenceSession(None, log=lambda _: None, cache_dir=tmp_path / "cache")
    trained = InferenceSession(str(result.out_dir), log=lambda _: None, cache_dir=tmp_path / "cache")
    assert trained.trained is not None and trained.trained.model == model
    a = np.asarray(_open(plain.predict(req, tmp_path / "a")[0]), dtype=int)
    b = np.asarray(_open(trained.predict(req, tmp_path / "b")[0]), dtype=int)
    assert a.shape == (64, 64, 3) and a.std() > 0
    assert np.abs(a - b).max() > 2, "the trained LoRA changed nothing in the run entry's render"


def _open(path: Path):
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB").copy()


def _loaded(tiny_weights: Path, model: str) -> Family:
    from train.models import family_for

    spec = quick_spec(tiny_weights, model)
    family = family_for(spec, tiny_weights / f"tiny-{model}")
    family.load(torch.float32)
    return family


def _batch(family: Family, latent: torch.Tensor, prompt: str) -> Batch:
    """A batch of one whose sampled latent is exactly ``latent`` (zero posterior std)."""
    (text,) = family.encode_prompts([prompt], torch.device("cpu"))
    rng = BatchRandom(torch.Generator().manual_seed(0), 1, 0, 1, torch.device("cpu"))
    return Batch(
        latent[None],
        torch.zeros_like(latent[None]),
        {k: v[None] for k, v in text.items()},
        torch.zeros(1, 6),
        rng,
    )


def _pixels() -> torch.Tensor:
    from PIL import Image

    from train.cache import _to_tensor

    root = Path(__file__).resolve().parents[1] / "examples" / "sample-dataset"
    with Image.open(root / "shape_00.png") as img:
        return _to_tensor(img.convert("RGB").resize((64, 64)))[None]


# -- the tests ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(cog_weights, sample_dataset, tmp_path_factory):
    return _train_once(
        cog_weights, sample_dataset, tmp_path_factory.mktemp("qwen-image") / "out", "qwen-image"
    )


def test_qwen_image_lora_lowers_the_loss(run):
    _assert_loss_falls(run)


def test_qwen_image_exports_load_into_the_stock_pipeline(run, cog_weights):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline

    _assert_exports_load(
        run, cog_weights, "qwen-image", QwenImagePipeline,
        negative_prompt=" ", true_cfg_scale=4.0, max_sequence_length=64,
    )  # fmt: skip


def test_qwen_image_text_conditioning_is_the_pipelines(tiny_weights):
    """Cached prompts (padded to the prompt length, with a mask) come back, trimmed per batch, as
    exactly what the pipeline's encode_prompt gives the transformer for those prompts."""
    family = _loaded(tiny_weights, "qwen-image")
    assert isinstance(family, QwenImageFamily)
    prompts = ["a red circle", "sks, a small blue square on a green background"]
    cached = family.encode_prompts(prompts, torch.device("cpu"))
    assert all(c["prompt_embeds"].shape[0] == family.spec.flow.max_sequence_length for c in cached)
    embeds, mask = family.trimmed({k: torch.stack([c[k] for c in cached]) for k in cached[0]})
    want, want_mask = family.pipe.encode_prompt(prompts, device=torch.device("cpu"))
    torch.testing.assert_close(embeds, want)
    assert mask is not None and want_mask is not None and torch.equal(mask, want_mask)
    alone, alone_mask = family.trimmed({k: v[None] for k, v in cached[0].items()})
    torch.testing.assert_close(alone, family.pipe.encode_prompt(prompts[0])[0])
    assert alone_mask is None  # one prompt: nothing padded, no mask (as the pipeline passes it)


def test_qwen_image_objective_is_what_the_pipeline_samples(tiny_weights):
    """An oracle that reads its inputs with the loss's conventions (timestep = sigma, packed
    latents normalised by the VAE statistics, target = noise - x0) has zero training loss, and
    the stock pipeline sampling with it lands exactly on the image's latent."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline

    family = _loaded(tiny_weights, "qwen-image")
    assert isinstance(family, QwenImageFamily)
    z = family.encode_images(_pixels())[0][0]  # (C, h, w): the posterior mean of a 64 px image
    mean, std = family.latent_stats(torch.device("cpu"))
    x0 = QwenImagePipeline._pack_latents(((z - mean[0]) / std[0])[None], 1, *z.shape)
    seen: list[dict[str, Any]] = []

    def oracle(module, args, kwargs, output):
        seen.append(kwargs)
        s = kwargs["timestep"].view(-1, 1, 1)
        return ((kwargs["hidden_states"] - x0) / s,)

    handle = family.denoiser.register_forward_hook(oracle, with_kwargs=True)
    try:
        loss = family.loss(family.denoiser, _batch(family, z, PROMPT))
        assert float(loss) < 1e-10, float(loss)
        assert seen[0]["img_shapes"] == [[(1, 4, 4)]]
        text = family.render_inputs(
            family.encode_prompts([PROMPT], torch.device("cpu"))[0], torch.device("cpu")
        )
        pipe: Any = QwenImagePipeline(
            **{"text_encoder": None, "tokenizer": None, **family.render_components()}
        )
        pipe.set_progress_bar_config(disable=True)
        seen.clear()
        image = pipe(
            **text, true_cfg_scale=1.0, height=64, width=64, num_inference_steps=4, output_type="pt"
        ).images
    finally:
        handle.remove()
    # what the pipeline fed the transformer: sigma as the timestep, the same RoPE grid
    sigmas = pipe.scheduler.sigmas[:4]
    torch.testing.assert_close(torch.stack([k["timestep"][0] for k in seen]), sigmas.float())
    assert all(k["img_shapes"] == [[(1, 4, 4)]] for k in seen)
    decoded = family.pipe.vae.decode(z[None, :, None], return_dict=False)[0][:, :, 0]
    want = pipe.image_processor.postprocess(decoded, output_type="pt")
    torch.testing.assert_close(image, want, atol=1e-4, rtol=0)


def test_qwen_image_run_entry_renders_with_and_without_the_lora(monkeypatch, cog_weights, run, tmp_path):
    _assert_run_entry_renders(monkeypatch, cog_weights, run, tmp_path, "qwen-image")


def test_qwen_image_full_fine_tune_is_refused_naming_the_size():
    with pytest.raises(SpecError, match=r"full fine-tune of qwen-image is refused: the 20\.4 B-parameter"):
        parse_spec({"model": "qwen-image", "mode": "full"})
    spec = parse_spec({"model": "qwen-image"})
    assert spec.flow.max_sequence_length == 512 and spec.validation.guidance_scale == 4.0
    with pytest.raises(SpecError, match="accepts at most 1024"):
        parse_spec({"model": "qwen-image", "flow": {"max_sequence_length": 2048}})
