"""Chroma on the tiny pipeline: the loss falls, the LoRA loads into the stock ChromaPipeline and
changes its image, its kohya/ComfyUI copy renders the same image, training feeds the transformer
what the pipeline feeds it (mask included, also under gradient checkpointing), the run entry
renders with and without the LoRA as the stock pipeline does, and a full fine-tune is refused."""

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
from train.models.chroma import ChromaFamily
from train.models.sd3 import scheduler_shift, shifted
from train.spec import SpecError, parse_spec

PROMPT = "sks, a red circle"
GUIDANCE = model_info("chroma").render_guidance
# What diffusers' Flux kohya converter reads back on a tiny model: it hard-codes the full-size
# widths of the fused single-block linear1 (q/k/v/mlp), so those stay out (as in test_training.py).
KOHYA_TARGETS = [
    "transformer_blocks.0.attn.to_q",
    "transformer_blocks.0.attn.to_k",
    "transformer_blocks.0.attn.to_v",
    "transformer_blocks.0.attn.to_out.0",
    "transformer_blocks.0.attn.add_q_proj",
    "transformer_blocks.0.attn.add_k_proj",
    "transformer_blocks.0.attn.add_v_proj",
    "transformer_blocks.0.attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "single_transformer_blocks.0.proj_out",
]


def _stock(base, lora_dir=None, weight_name=None, seed: int = 3, steps: int = 2) -> np.ndarray:
    """What a user gets from the stock pipeline (with ``load_lora_weights`` where a LoRA is given)."""
    from diffusers.pipelines.chroma.pipeline_chroma import ChromaPipeline

    pipe = ChromaPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir, **({"weight_name": weight_name} if weight_name else {}))
    out = pipe(
        PROMPT,
        num_inference_steps=steps,
        height=64,
        width=64,
        guidance_scale=GUIDANCE,
        max_sequence_length=512,
        generator=torch.Generator().manual_seed(seed),
    )
    return np.asarray(out.images[0].convert("RGB")).astype(int)  # pyright: ignore[reportAttributeAccessIssue]


@pytest.fixture(scope="module")
def base(tiny_weights):
    return tiny_weights / model_info("chroma").tiny_name


@pytest.fixture(scope="module")
def trained(tiny_weights, sample_dataset, tmp_path_factory):
    """A LoRA run with the default targets (attention + MLP of every block)."""
    spec = quick_spec(tiny_weights, "chroma", steps=60, learning_rate=5e-3, trigger_word="sks")
    result, _ = train_quietly(spec, sample_dataset, tmp_path_factory.mktemp("chroma"))
    assert result is not None
    return result


def test_loss_falls_and_the_lora_changes_the_stock_pipeline_image(trained, base):
    losses = [v for _, v in trained.losses]
    n = len(losses) // 10
    first, last = statistics.mean(losses[:n]), statistics.mean(losses[-n:])
    assert last < first * 0.9, f"loss did not fall: first tenth {first:.4f}, last tenth {last:.4f}"
    assert np.abs(_stock(base, trained.out_dir) - _stock(base)).max() > 5, (
        "the LoRA does not change the image"
    )


def test_the_kohya_copy_renders_as_the_diffusers_file(tiny_weights, sample_dataset, tmp_path, base):
    # alpha != rank: both formats must carry the scale, not just the matrices
    spec = quick_spec(
        tiny_weights,
        "chroma",
        steps=10,
        learning_rate=1e-2,
        **{"lora.targets": KOHYA_TARGETS, "lora.alpha": 8},
    )
    result, _ = train_quietly(spec, sample_dataset, tmp_path / "out")
    assert result is not None and result.kohya_file is not None
    with safe_open(str(result.kohya_file), "pt") as f:
        keys = list(f.keys())
        arch = (f.metadata() or {}).get("modelspec.architecture")
    assert arch == "chroma/lora"
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys  # BFL names, q/k/v fused
    assert "lora_unet_single_blocks_0_linear2.lora_up.weight" in keys
    with_lora = _stock(base, result.out_dir)
    with_kohya = _stock(base, result.out_dir, weight_name="lora_kohya.safetensors")
    assert np.abs(with_lora - _stock(base)).max() > 5
    assert np.abs(with_kohya - with_lora).max() <= 1, "the kohya copy renders differently"


def test_the_run_entry_renders_as_the_stock_pipeline(trained, base, tmp_path, monkeypatch):
    monkeypatch.setenv("ADVANCED_TRAINER_RUN_MODEL", "chroma")
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
    with_lora = image(
        InferenceSession(str(trained.out_dir), log=lambda _: None, cache_dir=tmp_path / "c1"), "lora"
    )
    assert np.abs(plain - _stock(base)).max() <= 2
    assert np.abs(with_lora - _stock(base, trained.out_dir)).max() <= 2
    assert np.abs(with_lora - plain).max() > 5


def _batch(family, texts, image_side: int = 64) -> Batch:
    pixels = (
        torch.rand(len(texts), 3, image_side, image_side, generator=torch.Generator().manual_seed(0)) * 2 - 1
    )
    mean, std = family.encode_images(pixels)
    text = {k: torch.stack([t[k] for t in texts]) for k in texts[0]}
    rng = BatchRandom(torch.Generator().manual_seed(0), len(texts), 0, len(texts), torch.device("cpu"))
    return Batch(mean, std * 0, text, torch.zeros(len(texts), 6), rng)


def test_training_feeds_the_transformer_what_the_pipeline_feeds_it(tiny_weights, base, monkeypatch):
    family = ChromaFamily(quick_spec(tiny_weights, "chroma"), base)
    family.load(torch.float32)
    pipe, seen = family.pipe, {}
    # auto: Chroma's bump density (median 0.5) moved by the pipeline's resolution-dependent shift
    rng = BatchRandom(torch.Generator().manual_seed(1), 20000, 0, 20000, torch.device("cpu"))
    median = float(family.sample_sigmas(rng, 16).median())
    assert abs(median - float(shifted(torch.tensor(0.5), scheduler_shift(pipe.scheduler.config, 16)))) < 0.01

    pipe.transformer.register_forward_pre_hook(
        lambda _m, _a, kw: seen.setdefault("pipeline", kw) and None, with_kwargs=True
    )
    # one step from pure noise, no CFG: the pipeline's first call is at sigma 1
    pipe(PROMPT, num_inference_steps=1, height=64, width=64, guidance_scale=1.0, output_type="latent")
    texts = family.encode_prompts([PROMPT], torch.device("cpu"))
    monkeypatch.setattr(family, "sample_sigmas", lambda rng, n: torch.ones(1))

    def model_call(**kw):
        seen["training"] = kw
        return (torch.zeros_like(kw["hidden_states"]),)

    family.loss(model_call, _batch(family, texts))  # pyright: ignore[reportArgumentType]
    ours, theirs = seen["training"], seen["pipeline"]
    assert set(ours) - {"return_dict"} == set(theirs) - {"return_dict", "joint_attention_kwargs"}
    assert ours["hidden_states"].shape == theirs["hidden_states"].shape == (1, 16, 16)  # packed 2x2
    for key in ("timestep", "encoder_hidden_states", "txt_ids", "img_ids", "attention_mask"):
        torch.testing.assert_close(ours[key], theirs[key], msg=key)
    mask = ours["attention_mask"]
    assert mask.dtype == theirs["attention_mask"].dtype == torch.float32  # as the pipeline builds it
    n_text = len(family.pipe.tokenizer(PROMPT).input_ids)  # the prompt's tokens with </s>
    assert mask[0, : n_text + 1].all() and not mask[0, n_text + 1 : 512].any()  # + the first pad
    assert mask[0, 512:].all()  # image tokens


def test_gradient_checkpointing_keeps_the_text_mask(tiny_weights, base):
    """diffusers drops the mask when it checkpoints a single block; the family puts it back."""
    family = ChromaFamily(quick_spec(tiny_weights, "chroma"), base)
    family.load(torch.float32)
    texts = family.encode_prompts([PROMPT, "a blue square on a white background"], torch.device("cpu"))
    model = family.pipe.transformer  # a ChromaTransformer2DModel (Family.denoiser says only Module)
    model.train()
    plain = family.loss(model, _batch(family, texts))
    model.enable_gradient_checkpointing()
    checkpointed = family.loss(model, _batch(family, texts))
    torch.testing.assert_close(checkpointed, plain)


def test_full_fine_tune_is_refused_naming_the_size():
    with pytest.raises(SpecError, match=r"full fine-tune of chroma is refused: .*8\.9 B.*80 GB"):
        parse_spec({"model": "chroma", "mode": "full"})
