"""The family contract, over the whole registry: what every model must do, tested on its tiny pipeline.

For each registered model (edit models on before/after pairs):

- the Cog train entry on the real coglet server trains it as Replicate would (the entry runs
  ``python -m train`` as its child: a non-zero exit fails the paid job), on a GPU's dtype path
  (``precision: bf16``: the frozen weights in bf16, the LoRA in fp32 under bf16 autocast, bf16
  validation renders) and delivers output.zip; the trainer's closing summary names what it wrote;
  the loss falls;
- the stock diffusers pipeline loads the LoRA with ``load_lora_weights`` and its image changes, in
  fp32 and in bf16;
  where the family writes a kohya/ComfyUI copy, that file renders as the diffusers one;
- the run entry (``train.inference``, what predict.py serves) renders with and without the LoRA as
  the stock pipeline does;
- a flow-matching model's training step feeds its denoiser exactly what the stock pipeline's first
  step feeds it (same noise at sigma 1: every argument equal).

A model added to the registry is covered by being registered (a video model by the video contract,
tests/test_family_video.py). What is particular to one family
(its conditioning, its edit path, its kohya naming's details) stays in its own test file. The Cog
server renders one model of each family in tests/test_cog_families.py.
"""

from __future__ import annotations

import io
import json
import re
import statistics
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import SLOW_IN_BF16_ON_A_CPU, run_entry_render, stock_render
from train.families import MODEL_IDS, model_info
from train.models import family_class
from train.progress import parse_progress_line
from train.sample_data import draw_pair

PROMPT = "sks, a red circle"
STEPS = 40
# Flux.1's kohya names fuse the single blocks' q/k/v and MLP input into linear1; diffusers' reader
# hard-codes the full-size widths of that split, so on the tiny models the copy is read back only
# without LoRA there (tests/test_kohya.py checks that fusion numerically).
_FLUX1_KOHYA_READABLE = [
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
TARGETS = {
    "flux": _FLUX1_KOHYA_READABLE,
    "flux_kontext": _FLUX1_KOHYA_READABLE,
    "chroma": _FLUX1_KOHYA_READABLE,
}
# SDXL's tiny UNet learns little through attention alone in a few dozen steps
TARGETS["sdxl"] = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_out",
]
LEARNING_RATE = {"flux2-klein-4b": 3e-2, "flux2-klein-9b": 3e-2}  # distilled: a harder push shows
TOLERANCE = 2  # 8-bit levels between the run entry and the stock pipeline (the same fp32 ops)
CONTROL = draw_pair(99)[0]  # the held-out image an edit model edits (never trained on)


def _spec(base: Path, model: str) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": model,
        "base_weights": str(base),
        "steps": STEPS,
        "resolutions": "64",
        "learning_rate": LEARNING_RATE.get(model, 1e-2),
        "caption_dropout": 0.0,
        "seed": 7,
        "trigger_word": "sks",
        "lora": {"rank": 4, "alpha": 8, "targets": TARGETS.get(model_info(model).family, "default")},
        "validation": {"num_inference_steps": 2},
        "export": {"kohya": "on"},  # every family's kohya/ComfyUI naming, FLUX.1's too (off by default)
        # what every GPU run uses; on a CPU the same code path, slower (see SLOW_IN_BF16_ON_A_CPU)
        "precision": "fp32" if model in SLOW_IN_BF16_ON_A_CPU else "bf16",
    }
    return spec


def _train_through_cog(train_server, upload_sink, spec: dict[str, Any], data: Path, out: Path) -> str:
    """A training through the Cog train entry on the real coglet server, as Replicate runs it: the
    entry runs ``python -m train`` as its child and uploads ``output.zip``, unpacked into ``out``.
    Returns the training's logs (the child's output, relayed)."""
    from cogserver import data_uri

    response = train_server.post(
        "/trainings", {"input": {"dataset": data_uri(data), "spec": json.dumps(spec), "model": spec["model"]}}
    )
    body = response.json()
    assert body["status"] == "succeeded", (
        f"{spec['model']}: {body.get('error')}\n{body.get('logs', '')[-3000:]}"
    )
    with zipfile.ZipFile(io.BytesIO(upload_sink.get(body["output"]))) as zf:
        zf.extractall(out)
    return body["logs"]


def _stock(
    model: str,
    base: Path,
    lora_dir: Path | None = None,
    weight_name: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> np.ndarray:
    """What a user gets from the model's stock diffusers pipeline (and ``load_lora_weights``)."""
    control = CONTROL if model_info(model).controls_required else None
    return stock_render(model, base, lora_dir, weight_name, dtype, control, PROMPT)


def _run_entry(model: str, base: Path, weights: Path | None, cache: Path, monkeypatch) -> np.ndarray:
    """The run entry's render (predict.py's session), with the trained weights or the plain base."""
    control = CONTROL if model_info(model).controls_required else None
    return run_entry_render(model, base, weights, cache, monkeypatch, control)


def _losses(log: str) -> list[float]:
    """The loss of every step, from the machine-readable progress lines (one per step here)."""
    rows = [r for r in map(parse_progress_line, log.splitlines()) if r and r.get("phase") == "train"]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert {"loss", "lr", "s_per_step", "eta_s", "total"} <= set(rows[-1])
    return [r["loss"] for r in rows]


IMAGE_MODELS = [m for m in MODEL_IDS if not model_info(m).video]


@pytest.mark.parametrize("model", IMAGE_MODELS)
def test_every_model_trains_through_the_cog_train_entry_and_its_lora_loads_where_users_load_it(
    model, cog_weights, train_server, upload_sink, sample_zip, pair_zip, tmp_path, monkeypatch
):
    info = model_info(model)
    base = cog_weights / info.tiny_name
    out = tmp_path / "out"
    log = _train_through_cog(
        train_server, upload_sink, _spec(base, model), pair_zip if info.controls_required else sample_zip, out
    )

    # python -m train's closing summary names what it wrote; the archive delivers it
    summary = dict(line.split(":", 1) for line in log.splitlines() if line.startswith(("LoRA (", "config")))
    assert "LoRA (diffusers)" in summary and (out / "pytorch_lora_weights.safetensors").is_file()
    kohya = summary.get("LoRA (kohya)")
    assert (kohya is not None) == bool(info.comfy_naming), f"{model}: kohya copy {kohya!r}"
    assert (out / "lora_kohya.safetensors").is_file() == bool(info.comfy_naming)
    assert (out / "config.json").is_file()

    bf16 = model not in SLOW_IN_BF16_ON_A_CPU
    assert ("precision: bf16 on a CPU: the GPU's dtype path" in log) == bf16
    # the frozen base in bf16 (on a CPU: fp32), but for the modules a model keeps in fp32 (Krea 2's norms)
    frozen = re.search(r"trainable parameters in float32 on a ([\w/]+) base", log)
    assert frozen is not None, log[-2000:]
    assert frozen.group(1) in (("bfloat16", "bfloat16/float32") if bf16 else ("float32",)), frozen.group(0)
    losses = _losses(log)
    assert len(losses) == STEPS
    assert all(np.isfinite(losses)), f"{model}: a bf16 loss is not finite"
    tenth = STEPS // 5
    first, last = statistics.mean(losses[:tenth]), statistics.mean(losses[-tenth:])
    assert last < first, f"{model}: the loss did not fall (first fifth {first:.4f}, last fifth {last:.4f})"

    plain, with_lora = _stock(model, base), _stock(model, base, out)
    assert np.abs(with_lora - plain).max() > 2, f"{model}: the trained LoRA does not change the image"
    if bf16:
        plain16 = _stock(model, base, dtype=torch.bfloat16)
        with_lora16 = _stock(model, base, out, dtype=torch.bfloat16)
        assert np.abs(with_lora16 - plain16).max() > 2, f"{model}: in bf16 the LoRA does not change the image"
    if kohya is not None:
        with_kohya = _stock(model, base, out, "lora_kohya.safetensors")
        assert np.abs(with_kohya - with_lora).max() <= 1, f"{model}: the kohya copy renders differently"
        with safe_open(str(out / "lora_kohya.safetensors"), "pt") as f:
            assert (f.metadata() or {}).get("modelspec.architecture") == info.kohya_architecture
            # kohya's flattened names, or the original checkpoint's behind diffusion_model. (Krea 2, FLUX.3)
            prefix = "lora_unet_" if info.comfy_naming == "kohya" else "diffusion_model."
            assert all(k.startswith(prefix) for k in f.keys())

    cache = tmp_path / "run"
    assert np.abs(_run_entry(model, base, None, cache / "0", monkeypatch) - plain).max() <= TOLERANCE, (
        f"{model}: the run entry's base render differs from the stock pipeline's"
    )
    assert np.abs(_run_entry(model, base, out, cache / "1", monkeypatch) - with_lora).max() <= TOLERANCE, (
        f"{model}: the run entry's LoRA render differs from the stock pipeline's"
    )


# -- the training step feeds the denoiser what the pipeline feeds it ----------------------------------

FLOW_TEXT_TO_IMAGE = [
    m for m in IMAGE_MODELS if model_info(m).options == "flow" and not model_info(m).controls_required
]


def _capture(module: torch.nn.Module, into: list[tuple[tuple, dict]]):
    return module.register_forward_pre_hook(
        lambda _m, args, kwargs: into.append((args, kwargs)) and None, with_kwargs=True
    )


def _given(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments that say something: not None, not an empty dict, not ``return_dict``, not an
    inference cache (Qwen-Image 2.1's first step fills its KV cache from the whole sequence)."""
    skip = ("return_dict", "kv_cache", "kv_cache_mode")
    return {k: v for k, v in kwargs.items() if v is not None and v != {} and k not in skip}


def _assert_same(ours: Any, theirs: Any, where: str) -> None:
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor), where
        if theirs.dim() == ours.dim() + 1 and theirs.shape[0] == 1:
            theirs = theirs[0]  # position ids with a batch axis of one: the transformers read its first row
        assert ours.shape == theirs.shape, f"{where}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
        if ours.is_floating_point() and not theirs.is_floating_point():
            # a scheduler that truncates its timesteps to integers (UniPC): training feeds the exact value
            assert bool(((ours - theirs) >= 0).all() and ((ours - theirs) < 1).all()), (
                f"{where}: {ours} vs {theirs}"
            )
            return
        torch.testing.assert_close(ours.to(theirs.dtype), theirs, msg=where)
    elif isinstance(theirs, (list, tuple)):
        assert isinstance(ours, (list, tuple)) and len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            _assert_same(a, b, f"{where}[{i}]")
    else:
        assert ours == theirs, f"{where}: {ours!r} != {theirs!r}"


@pytest.mark.parametrize("model", FLOW_TEXT_TO_IMAGE)
def test_the_training_step_feeds_the_denoiser_what_the_pipeline_feeds_it(model, tiny_weights, monkeypatch):
    """At sigma 1 from the same noise (the pipeline's first step), every argument the training step
    gives the denoiser equals the stock pipeline's: the latent packing and position ids, the timestep
    convention, the text conditioning and its masks, the guidance value."""
    from train.models.base import Batch, BatchRandom
    from train.spec import parse_spec

    info = model_info(model)
    base = tiny_weights / info.tiny_name
    spec = parse_spec(_spec(base, model))
    family = family_class(model)(spec, base)
    family.load(torch.float32)
    pipeline_calls: list[tuple[tuple, dict]] = []
    handle = _capture(family.denoiser, pipeline_calls)
    sizes = family.control_inputs([], 64)  # the pipeline's size arguments for a 64 px render
    # the guidance embedding gets the training value; a model without one renders without CFG at 0
    guidance = family_class(model).guidance_kwargs(spec.flow.guidance if info.guidance_embed else 0.0, "")
    family.pipe(
        prompt=PROMPT,
        num_inference_steps=2,  # one step would put Qwen-Image's terminal-shifted schedule at NaN
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        **({"max_sequence_length": spec.flow.max_sequence_length} if info.max_text_tokens else {}),
        **sizes,
        **guidance,
    )
    handle.remove()
    assert len(pipeline_calls) == 2, (  # one call a step: no CFG batch
        f"{model}: the pipeline ran CFG ({len(pipeline_calls)} calls); no CFG wanted"
    )

    text = family.encode_prompts([PROMPT], torch.device("cpu"))[0]
    width, height = family.rendered_size(64, 64)  # the size the pipeline rendered (HiDream: its own area)
    pixels = torch.zeros(1, 3, height, width)
    mean, std = family.encode_images(pixels)
    rng = BatchRandom(torch.Generator().manual_seed(0), 1, 0, 1, torch.device("cpu"))  # the pipeline's seed
    batch = Batch(mean, std, {k: v[None] for k, v in text.items()}, torch.zeros(1, 6), rng)
    monkeypatch.setattr(family, "sample_latents", lambda b: b.latent_mean)  # no draw before the noise
    # the pipeline's first step: sigma 1 (UniPC with flow sigmas, HiDream-I1 Full's, starts just below)
    first = family.pipe.scheduler.sigmas[:1].float()
    monkeypatch.setattr(family, "sample_sigmas", lambda rng, n: first)
    training_calls: list[tuple[tuple, dict]] = []

    def denoiser(*args, **kwargs):
        training_calls.append((args, kwargs))
        first = kwargs.get("hidden_states", args[0] if args else None)
        return ([torch.zeros_like(x) for x in first] if isinstance(first, list) else torch.zeros_like(first),)

    family.loss(denoiser, batch)  # pyright: ignore[reportArgumentType]
    (ours_args, ours), (theirs_args, theirs) = training_calls[0], pipeline_calls[0]
    _assert_same(ours_args, theirs_args, f"{model}: positional arguments")
    given = set(_given(theirs))
    assert set(_given(ours)) == given, model
    if "target_timestep" in given:  # a flow map (FLUX.3 [klein] distilled) trains on its diagonal
        _assert_same(ours["target_timestep"], ours["timestep"], f"{model}: the flow map's target time")
        given.discard("target_timestep")  # the pipeline's first step jumps to its second step's time
    for key in sorted(given):
        _assert_same(ours[key], theirs[key], f"{model}: {key}")
