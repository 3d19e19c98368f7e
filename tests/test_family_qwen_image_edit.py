"""Qwen-Image-Edit and Edit Plus, what the family contract (tests/test_family_contract.py) does not
cover: the training step feeds the transformer what the stock edit pipeline feeds it (the control's
tokens after the target's, img_shapes, the text the VL read with the control image, sigma as the
timestep), the loss is on the target tokens only, validation renders cache what the stock edit
feeds, Edit Plus trains on two controls, and a full fine-tune is refused as Qwen-Image's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit_module
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import QwenImageEditPipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
    QwenImageEditPlusPipeline,
    calculate_dimensions,
)
from PIL import Image

from conftest import quick_spec, train_quietly
from train.cache import _to_tensor
from train.edit import GAP
from train.families import model_info
from train.models.base import Batch, BatchRandom
from train.models.qwen_image_edit.family import QwenImageEditFamily
from train.models.qwen_image_edit.tiny import EDIT_DROPPED_TOKENS, check_edit_template
from train.sample_data import PAIR_INSTRUCTION, draw_pair
from train.spec import SpecError, parse_spec

EDIT, PLUS = "qwen-image-edit", "qwen-image-edit-plus"
CPU = torch.device("cpu")
TOKENS = 64  # prompt tokens (flow.max_sequence_length): the instruction takes far fewer
pack = QwenImageEditPipeline._pack_latents


def _family(weights: Path, model: str) -> QwenImageEditFamily:
    from train.models import family_for

    spec = quick_spec(weights, model, **{"flow.max_sequence_length": TOKENS})
    family = family_for(spec, weights / model_info(model).tiny_name)
    assert isinstance(family, QwenImageEditFamily)
    family.load(torch.float32)
    return family


@pytest.fixture(scope="module")
def family(tiny_weights) -> QwenImageEditFamily:
    return _family(tiny_weights, EDIT)


@pytest.fixture(scope="module")
def plus_family(tiny_weights) -> QwenImageEditFamily:
    return _family(tiny_weights, PLUS)


def _batch(family: QwenImageEditFamily, target: torch.Tensor, controls: list, text: dict) -> Batch:
    """A batch of one whose sampled target latent is exactly ``target`` (zero posterior std); the
    controls as the cache keeps them (``encode_controls`` of each, in its bucket)."""
    return Batch(
        target,
        torch.zeros_like(target),
        {k: v[None] for k, v in text.items()},
        torch.zeros(1, 6),
        BatchRandom(torch.Generator().manual_seed(1), 1, 0, 1, CPU),
        controls=[family.encode_controls(_to_tensor(c)[None]) for c in controls],
    )


def _stock(family: QwenImageEditFamily) -> Any:
    """The stock pipeline on the family's loaded parts (its own text encoder and processor)."""
    pipe = family.pipeline_cls(**family.pipe.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _capture(module: torch.nn.Module, seen: list[dict[str, Any]]):
    return module.register_forward_pre_hook(lambda m, a, kw: seen.append(dict(kw)), with_kwargs=True)


# -- the tiny pipelines -------------------------------------------------------------------------------


def test_tiny_edit_pipelines_drop_the_system_prompt_and_the_vl_reads_the_control(family, plus_family):
    """As in the real vocabulary, the 64 tokens the pipelines drop are the system prompt; the VL's
    vision tower runs on the control image: another image, other text embeddings."""
    for f in (family, plus_family):
        check_edit_template(f.pipe)
        assert f.pipe.prompt_template_encode_start_idx == EDIT_DROPPED_TOKENS
    grey, red = draw_pair(99)
    a, _ = family.pipe.encode_prompt(PAIR_INSTRUCTION, image=grey, device=CPU)
    b, _ = family.pipe.encode_prompt(PAIR_INSTRUCTION, image=red, device=CPU)
    inputs = family.pipe.processor(text=["<|image_pad|>"], images=[grey], return_tensors="pt")
    n_image = int(inputs["image_grid_thw"].prod()) // 4  # 64 px -> 56 x 56 -> 4 x 4 patches, merged 2 x 2
    assert n_image == 4 and a.shape == b.shape and a.shape[1] > n_image
    assert (a - b).abs().amax(dim=-1)[0, 1 : 1 + n_image].min() > 0  # the image tokens
    assert not torch.allclose(a, b)


# -- the objective is the pipeline's ------------------------------------------------------------------


def test_training_inputs_are_what_the_edit_pipeline_feeds_its_transformer(family, monkeypatch):
    """One stock render (CFG with the negative prompt " ") against a training step on the same
    control: the control's tokens after the target's, img_shapes, the text the VL read with that
    image; an oracle predicting noise - x0 for the target tokens and garbage for the control's has
    zero training loss (the control is not scored), and the pipeline sampling with it lands exactly
    on x0 (sigma as the timestep). ``__call__`` sizes its input image at ~1 MP
    (``calculate_dimensions(1024 * 1024, ratio)``); patched here to 64 x 64, the size of the
    training item's control in its 64 px bucket (the stock sizing is checked with the renders of
    the trained LoRA below)."""
    monkeypatch.setattr(edit_module, "calculate_dimensions", lambda area, ratio: (64, 64, None))
    grey, red = draw_pair(99)
    (text,) = family.encode_prompts_with_controls([PAIR_INSTRUCTION], [[grey]], CPU, for_render=False)
    (negative,) = family.encode_prompts_with_controls([" "], [[grey]], CPU, for_render=False)
    target = family.encode_images(_to_tensor(red)[None])[0]  # (1, C, 8, 8)
    mean, std = family.latent_stats(CPU)
    x0 = pack((target - mean) / std, 1, 4, 8, 8)
    seen: list[dict[str, Any]] = []

    def oracle(module, args, kwargs, output):
        seen.append(kwargs)
        hs, s = kwargs["hidden_states"], kwargs["timestep"].view(-1, 1, 1)
        return (torch.cat([(hs[:, :16] - x0) / s, torch.full_like(hs[:, 16:], 1e3)], dim=1),)

    handle = family.denoiser.register_forward_hook(oracle, with_kwargs=True)
    try:
        loss = family.loss(family.denoiser, _batch(family, target, [grey], text))
        ours = seen.pop()
        sampled = _stock(family)(
            image=grey, prompt=PAIR_INSTRUCTION, negative_prompt=" ", true_cfg_scale=4.0,
            height=64, width=64, num_inference_steps=3, output_type="latent",
        ).images  # fmt: skip
    finally:
        handle.remove()
    assert float(loss) < 1e-10, float(loss)
    torch.testing.assert_close(sampled, x0, atol=1e-5, rtol=1e-5)
    cond, uncond = seen[0], seen[1]
    assert ours["hidden_states"].shape == cond["hidden_states"].shape == (1, 16 + 16, 16)
    # the control's tokens: the cache's x / 127.5 - 1 and the pipeline's x / 255 * 2 - 1 differ by an ulp
    torch.testing.assert_close(
        ours["hidden_states"][:, 16:], cond["hidden_states"][:, 16:], atol=1e-5, rtol=1e-5
    )
    assert ours["img_shapes"] == cond["img_shapes"] == [[(1, 4, 4), (1, 4, 4)]]
    torch.testing.assert_close(ours["encoder_hidden_states"], cond["encoder_hidden_states"])
    assert ours["encoder_hidden_states_mask"] is None and cond["encoder_hidden_states_mask"] is None
    torch.testing.assert_close(
        family.trimmed({k: v[None] for k, v in negative.items()})[0], uncond["encoder_hidden_states"]
    )
    sigmas = family.pipe.scheduler.sigmas[:3].float()
    torch.testing.assert_close(torch.stack([k["timestep"][0] for k in seen[::2]]), sigmas)


def test_edit_plus_takes_two_controls_as_its_pipeline_does(plus_family):
    """Edit Plus: the VL reads each control at ~384 x 384 ("Picture 1: ... Picture 2: ...") in
    training too, so a training item's text equals a render's for the same controls; both controls'
    tokens follow the target's, each with its own img_shapes entry."""
    c0, c1 = draw_pair(7)[0], draw_pair(8, size=(96, 64))[0]
    train_text, render_text = (
        plus_family.encode_prompts_with_controls([PAIR_INSTRUCTION], [[c0, c1]], CPU, for_render=r)[0]
        for r in (False, True)
    )
    for k in ("prompt_embeds", "prompt_embeds_mask"):
        torch.testing.assert_close(train_text[k], render_text[k])
    # __call__'s condition images: each at CONDITION_IMAGE_SIZE (384 x 384) at its own aspect
    sizes = [calculate_dimensions(384 * 384, c.width / c.height) for c in (c0, c1)]
    assert sizes == [(384, 384), (480, 320)]
    resize = plus_family.pipe.image_processor.resize
    want, _ = plus_family.pipe.encode_prompt(
        PAIR_INSTRUCTION, image=[resize(c, h, w) for c, (w, h) in zip((c0, c1), sizes, strict=True)]
    )
    torch.testing.assert_close(plus_family.trimmed({k: v[None] for k, v in train_text.items()})[0], want)
    seen: list[dict[str, Any]] = []
    handle = _capture(plus_family.denoiser, seen)
    try:
        target = torch.randn(1, 4, 8, 8)
        plus_family.loss(plus_family.denoiser, _batch(plus_family, target, [c0, c1], train_text))
    finally:
        handle.remove()
    assert seen[0]["img_shapes"] == [[(1, 4, 4), (1, 4, 4), (1, 4, 6)]]
    assert seen[0]["hidden_states"].shape == (1, 16 + 16 + 24, 16)


# -- the registry -------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [EDIT, PLUS])
def test_qwen_image_edit_full_fine_tune_is_refused_as_qwen_images(model):
    with pytest.raises(SpecError, match=rf"full fine-tune of {model} is refused: the 20\.4 B-parameter"):
        parse_spec({"model": model, "mode": "full"})
    spec = parse_spec({"model": model})
    assert spec.flow.max_sequence_length == 512 and spec.validation.guidance_scale == 4.0


# -- the stock edit, and Edit Plus on two controls -----------------------------------------------------


def _stock_pipe(pipe_cls: Any, base: Path) -> Any:
    pipe = pipe_cls.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _stock_edit(
    pipe: Any, image: Any, lora_dir: Path | None = None, weight_name: str | None = None, **kw: Any
) -> np.ndarray:
    """The stock pipeline (its own text encoder) editing held-out control(s) at a fixed seed, with
    the LoRA file ``lora_dir/weight_name`` alone, or none."""
    pipe.unload_lora_weights()
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir, **({"weight_name": weight_name} if weight_name else {}))
    args: dict[str, Any] = dict(negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=2)
    out = pipe(
        image=image, prompt=PAIR_INSTRUCTION, height=64, width=64,
        generator=torch.Generator().manual_seed(0), output_type="np", **{**args, **kw},
    )  # fmt: skip
    return np.asarray(out.images[0])


def test_the_stock_edit_s_transformer_inputs_are_what_validation_renders_cache(tiny_weights, family):
    """The stock pipeline on a held-out control, with its own ~1 MP sizing: its transformer inputs are
    what validation renders cache (the prompt and the negative, read by the VL with the control
    resized as ``__call__`` resizes it; the control's 64 x 64 tokens after the output's 4 x 4). The
    LoRA's round trip through the stock pipeline is the family contract's."""
    pipe, held_out = (
        _stock_pipe(QwenImageEditPipeline, tiny_weights / model_info(EDIT).tiny_name),
        draw_pair(99)[0],
    )
    seen: list[dict[str, Any]] = []
    handle = _capture(pipe.transformer, seen)
    try:
        _stock_edit(pipe, held_out)
    finally:
        handle.remove()
    (cached,) = family.encode_prompts_with_controls([PAIR_INSTRUCTION], [[held_out]], CPU, for_render=True)
    for prefix, fed in (("", seen[0]), ("negative_", seen[1])):
        text = {k: cached[prefix + k][None] for k in ("prompt_embeds", "prompt_embeds_mask")}
        torch.testing.assert_close(family.trimmed(text)[0], fed["encoder_hidden_states"])
    assert seen[0]["img_shapes"] == [[(1, 4, 4), (1, 64, 64)]]
    inputs = family.control_inputs([held_out], 64)
    assert inputs["image"] is held_out and (inputs["width"], inputs["height"]) == (64, 64)


def _two_control_pairs(out: Path, count: int = 4) -> Path:
    """Pairs with two controls each: the grey-square scene and a swatch of the colour to paint."""
    out.mkdir(parents=True)
    for i in range(count):
        control, target = draw_pair(i)
        swatch = Image.new("RGB", (64, 64), (220, 30, 30))
        target.save(out / f"pair_{i:02d}.png")
        control.save(out / f"pair_{i:02d}_control.png")
        swatch.save(out / f"pair_{i:02d}_control_1.png")
        (out / f"pair_{i:02d}.txt").write_text("paint the square in picture 1 with the colour of picture 2\n")
    return out


def test_qwen_image_edit_plus_trains_on_two_controls_and_loads_into_its_pipeline(tiny_weights, tmp_path):
    """Trains on pairs with two controls each (both control slots in every step), renders them as
    the stock pipeline does, and its LoRA loads into the stock Edit Plus pipeline. Each control
    costs a ~1 MP VAE pass in a render (``VAE_IMAGE_SIZE`` whatever the output size): the
    validation render skips CFG."""
    fields = {"flow.max_sequence_length": TOKENS, "validation.guidance_scale": 1.0}
    spec = quick_spec(tiny_weights, PLUS, steps=6, learning_rate=2e-2, **fields)
    shapes: list[Any] = []
    loss = QwenImageEditFamily.loss

    def counted(self, model, batch):
        shapes.append([tuple(c.shape) for c in batch.controls])
        return loss(self, model, batch)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(QwenImageEditFamily, "loss", counted)
        result, _ = train_quietly(spec, _two_control_pairs(tmp_path / "pairs"), tmp_path / "out")
    assert shapes and all(s == [(1, 4, 8, 8), (1, 4, 8, 8)] for s in shapes), shapes
    assert all(np.isfinite(v) for _, v in result.losses)
    # the run's validation render: the stock pipeline on both controls, shown beside them
    (sample,) = sorted((result.out_dir / "samples").glob("step-*.png"))
    with Image.open(sample) as img:
        assert img.size == (3 * 64 + 2 * GAP, 64)
    # the LoRA loads into the stock Edit Plus pipeline and changes its transformer (full renders
    # with the same loader, QwenImageLoraLoaderMixin, are checked for Edit above)
    pipe = _stock_pipe(QwenImageEditPlusPipeline, tiny_weights / model_info(PLUS).tiny_name)
    pipe.load_lora_weights(result.out_dir)
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 16 * 3, 16, generator=g),  # the target's tokens, two controls'
        encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
        timestep=torch.tensor([0.5]),
        img_shapes=[[(1, 4, 4)] * 3],
        return_dict=False,
    )
    with torch.no_grad():
        with_lora = pipe.transformer(**inputs)[0]
        pipe.disable_lora()
        plain = pipe.transformer(**inputs)[0]
    assert (with_lora - plain).abs().max() > 1e-3, "the LoRA does not change the Edit Plus transformer"
