"""Qwen-Image 2.1's image-conditioned mode (``qwen-image-2.1-edit``) beyond the family contract: a
training step on a before/after pair feeds the transformer what ``QwenImage21Pipeline(image=...)``
feeds it at its first step. (The contract covers the rest: it trains through the Cog train entry on
pairs, its LoRA changes the stock pipeline's edit, the run entry renders as the stock pipeline.)"""

from __future__ import annotations

from typing import Any

import torch

from conftest import assert_rows_predict_as_alone, quick_spec
from train.cache import _to_tensor
from train.models import family_for
from train.models.base import Batch, BatchRandom
from train.models.qwen_image21.family import QwenImage21EditFamily
from train.sample_data import PAIR_INSTRUCTION, draw_pair

MODEL = "qwen-image-2.1-edit"
CPU = torch.device("cpu")


def test_an_edit_step_feeds_the_transformer_what_the_pipeline_feeds_it(tiny_weights, monkeypatch):
    """At sigma 1 from the same noise, with the control at the size the pipeline reads it
    (``output_resolution`` 64: 64 x 64): the condition latents before the target's, ``img_shapes``
    (condition, then target), ``img_mask`` (the image placeholders among the text, then one slot per
    2x2 target tokens), the text the VL read with the image, its mask, the timestep."""
    spec = quick_spec(tiny_weights, MODEL)
    family = family_for(spec, tiny_weights / "tiny-qwen-image-2.1-edit")
    assert isinstance(family, QwenImage21EditFamily)
    family.load(torch.float32)
    grey, red = draw_pair(99)
    seen: list[dict[str, Any]] = []
    handle = family.denoiser.register_forward_pre_hook(
        lambda m, a, kw: seen.append(dict(kw)), with_kwargs=True
    )
    try:
        family.pipe(
            prompt=PAIR_INSTRUCTION, image=grey, output_resolution=64, height=64, width=64,
            num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent",
        )  # fmt: skip
        theirs = seen[0]
        (text,) = family.encode_prompts_with_controls([PAIR_INSTRUCTION], [[grey]], CPU, for_render=False)
        mean, std = family.encode_images(_to_tensor(red)[None])
        rng = BatchRandom(torch.Generator().manual_seed(0), 1, 0, 1, CPU)  # the pipeline's seed
        controls = [family.encode_controls(_to_tensor(grey)[None])]
        batch = Batch(
            mean, std, {k: v[None] for k, v in text.items()}, torch.zeros(1, 6), rng, controls=controls
        )
        monkeypatch.setattr(family, "sample_latents", lambda b: b.latent_mean)
        first = family.pipe.scheduler.sigmas[:1].float()
        monkeypatch.setattr(family, "sample_sigmas", lambda rng, n: first)
        family.loss(family.denoiser, batch)
        ours = seen[-1]
    finally:
        handle.remove()
    n = 4 * 4  # 64 px, 16x VAE, unpatched: 16 tokens per image
    assert ours["hidden_states"].shape == theirs["hidden_states"].shape == (1, n + n, 4)
    # the condition's tokens (the cache's x / 127.5 - 1 and the pipeline's x / 255 * 2 - 1 differ by an ulp)
    torch.testing.assert_close(ours["hidden_states"], theirs["hidden_states"], atol=1e-5, rtol=1e-5)
    assert ours["img_shapes"] == theirs["img_shapes"] == [[(1, 4, 4), (1, 4, 4)]]
    assert torch.equal(ours["img_mask"], theirs["img_mask"]) and int(theirs["img_mask"][0].sum()) > n // 4
    torch.testing.assert_close(ours["encoder_hidden_states"], theirs["encoder_hidden_states"])
    assert ours["encoder_hidden_states_mask"] is None and theirs["encoder_hidden_states_mask"] is None
    torch.testing.assert_close(ours["timestep"], theirs["timestep"])


def test_prompts_of_different_lengths_in_one_edit_batch_train_as_each_alone(tiny_weights):
    """The transformer lays out every row's images after the first row's text slots: a batch of
    instructions of different lengths (with their conditions) trains each row as it alone, as a
    render of one instruction runs."""
    family = family_for(quick_spec(tiny_weights, MODEL), tiny_weights / "tiny-qwen-image-2.1-edit")
    family.load(torch.float32)
    grey = draw_pair(99)[0]
    prompts = [PAIR_INSTRUCTION, PAIR_INSTRUCTION + ", and keep the background exactly as it is"]
    texts = family.encode_prompts_with_controls(prompts, [[grey], [grey]], CPU, for_render=False)
    lengths = [int(t["prompt_embeds_mask"].sum()) for t in texts]
    assert lengths[0] < lengths[1], lengths
    control = family.encode_controls(_to_tensor(grey)[None])
    assert_rows_predict_as_alone(family, texts, [control.expand(2, -1, -1, -1)])
