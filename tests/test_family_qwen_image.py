"""Qwen-Image, what the family contract (tests/test_family_contract.py) does not cover: cached
prompts come back trimmed exactly as the pipeline's encode_prompt gives them, the objective is the
one the pipeline samples with (an oracle denoiser: zero loss, and the pipeline lands on the data),
and a full fine-tune is refused naming the size. Its helpers serve Z-Image's tests too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import quick_spec
from train.models.base import Batch, BatchRandom, Family
from train.models.qwen_image.family import QwenImageFamily
from train.spec import SpecError, parse_spec

PROMPT = "sks, a red circle on a blue background"


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


def test_qwen_image_full_fine_tune_is_refused_naming_the_size():
    with pytest.raises(SpecError, match=r"full fine-tune of qwen-image is refused: the 20\.4 B-parameter"):
        parse_spec({"model": "qwen-image", "mode": "full"})
    spec = parse_spec({"model": "qwen-image"})
    assert spec.flow.max_sequence_length == 512 and spec.validation.guidance_scale == 4.0
    with pytest.raises(SpecError, match="accepts at most 1024"):
        parse_spec({"model": "qwen-image", "flow": {"max_sequence_length": 2048}})
