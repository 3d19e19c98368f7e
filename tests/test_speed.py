"""Every speed lever gives the numbers of the plain path on the tiny models (issue: speed never
silently costs quality).

Tolerances, fp32 on the CPU: a lever may reorder float operations (compiled graphs, NHWC
convolutions), so results agree to rounding, not bit for bit. Losses: 1e-5 relative. LoRA
weights: AdamW moves every weight by up to ~lr per step whatever the gradient's size, so a
coordinate whose gradient is ~0 can move differently on rounding noise alone; we require the
mean difference to stay at rounding level (1e-6) and the largest below steps x lr."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import quick_spec, train_quietly

SDXL_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_out"]


def _run(tiny_weights, sample_dataset, out, model, **fields):
    extra = {"lora.targets": SDXL_TARGETS} if model == "sdxl" else {}
    spec = quick_spec(tiny_weights, model, steps=STEPS, learning_rate=LR, batch_size=2, **extra, **fields)
    result, log = train_quietly(spec, sample_dataset, out)
    return result, log, load_file(str(result.lora_file))


STEPS, LR = 4, 2e-3


def _assert_same(a, b):
    (ra, _, wa), (rb, _, wb) = a, b
    la, lb = [v for _, v in ra.losses], [v for _, v in rb.losses]
    assert la == pytest.approx(lb, rel=1e-5)
    diffs = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])
    assert diffs.mean().item() < 1e-6, diffs.mean().item()
    assert diffs.max().item() < STEPS * LR


@pytest.mark.parametrize("model", ["flux-dev", "sdxl"])
def test_compiled_blocks_match_eager(tiny_weights, sample_dataset, tmp_path, monkeypatch, model):
    # aot_eager traces and runs the graphs dynamo captures without generating C++ (slow on 2 cores);
    # inductor is what a GPU run uses, and bench/ measures it there.
    monkeypatch.setenv("ADVANCED_TRAINER_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    plain = _run(tiny_weights, sample_dataset, tmp_path / "plain", model)
    compiled = _run(tiny_weights, sample_dataset, tmp_path / "compiled", model, **{"speed.compile": "blocks"})
    assert "compile: repeated blocks" in compiled[1] and "aot_eager" in compiled[1]
    _assert_same(plain, compiled)


def test_channels_last_unet_matches(tiny_weights, sample_dataset, tmp_path):
    plain = _run(tiny_weights, sample_dataset, tmp_path / "plain", "sdxl", **{"speed.channels_last": "off"})
    nhwc = _run(tiny_weights, sample_dataset, tmp_path / "nhwc", "sdxl", **{"speed.channels_last": "on"})
    assert "channels_last: on" in nhwc[1]
    _assert_same(plain, nhwc)


def test_cache_on_device_gives_identical_batches(tiny_weights, sample_dataset, tmp_path):
    """Moving the cache changes no value, and leaves nothing a step reads on the host."""
    from train.cache import collate
    from train.models.base import BatchRandom
    from train.speed import cache_fits_on_device

    assert not cache_fits_on_device("auto", 10, None)  # CPU: never
    assert cache_fits_on_device("auto", 10 * 2**20, 80 * 2**30) and not cache_fits_on_device(
        "auto", 8 * 2**30, 80 * 2**30
    )
    assert cache_fits_on_device("on", 8 * 2**30, 80 * 2**30) and not cache_fits_on_device(
        "off", 1, 80 * 2**30
    )

    from train.cache import build_cache
    from train.data import stage_dataset
    from train.models import family_for

    spec = quick_spec(tiny_weights, "sdxl", steps=1)
    family = family_for(spec, tiny_weights / "tiny-sdxl")
    family.load(torch.float32)
    ds = stage_dataset(sample_dataset, tmp_path / "job")
    cache = build_cache(family, ds, [64], ["x"], torch.device("cpu"), 10**8)
    cpu = torch.device("cpu")
    gen = lambda: BatchRandom(torch.Generator().manual_seed(0), 2, 0, 2, cpu)  # noqa: E731
    before = collate(cache, [0, 1], [False, True], cpu, torch.float32, gen())
    # values: the move keeps every item in its place; text embeddings arrive in the step's dtype
    cache.to(cpu, torch.bfloat16)
    after = collate(cache, [0, 1], [False, True], cpu, torch.bfloat16, gen())
    assert torch.equal(before.latent_mean, after.latent_mean) and torch.equal(before.time_ids, after.time_ids)
    assert after.text["prompt_embeds"].dtype == torch.bfloat16
    assert torch.equal(before.text["prompt_embeds"].to(torch.bfloat16), after.text["prompt_embeds"])
    # residency: after a move nothing a batch is built from is left on the host (the meta device
    # stands in for CUDA here: a tensor the move forgot would still say "cpu")
    cache.to(torch.device("meta"), torch.bfloat16)
    resident = [t for it in cache.items for t in (it.mean, it.std, it.time_ids)]
    resident += [t for d in [*cache.texts, cache.empty_text] for t in d.values()]
    assert resident and {t.device.type for t in resident} == {"meta"}
    assert cache.nbytes() > 0


def test_attention_backend_switches(monkeypatch):
    from train.speed import apply_attention_backend

    calls = {}
    for name in ("enable_flash_sdp", "enable_mem_efficient_sdp", "enable_math_sdp", "enable_cudnn_sdp"):
        monkeypatch.setattr(torch.backends.cuda, name, lambda on, _n=name: calls.__setitem__(_n, on))
    assert "CPU" in apply_attention_backend("auto", cuda=False) and not calls
    apply_attention_backend("auto", cuda=True)
    assert calls == {
        "enable_flash_sdp": True,
        "enable_mem_efficient_sdp": True,
        "enable_math_sdp": True,
        "enable_cudnn_sdp": False,
    }  # cuDNN's backward crashed on the H200
    apply_attention_backend("cudnn", cuda=True)
    assert calls["enable_cudnn_sdp"] is True and calls["enable_flash_sdp"] is False


def test_fused_qkv_matches_and_keeps_the_lora_layout(tiny_weights, sample_dataset, tmp_path, monkeypatch):
    """speed.fuse_qkv: the same numbers, the same LoRA file, and no second copy of the weights."""
    plain = _run(tiny_weights, sample_dataset, tmp_path / "plain", "flux-dev")
    fused = _run(tiny_weights, sample_dataset, tmp_path / "fused", "flux-dev", **{"speed.fuse_qkv": "on"})
    assert "fuse_qkv: 3 q/k/v projections fused with their LoRA" in fused[1]  # double: 2, single: 1
    _assert_same(plain, fused)
    assert set(fused[2]) == set(plain[2])
    # under regional compilation too
    monkeypatch.setenv("ADVANCED_TRAINER_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    compiled = _run(
        tiny_weights,
        sample_dataset,
        tmp_path / "compiled",
        "flux-dev",
        **{"speed.fuse_qkv": "on", "speed.compile": "blocks"},
    )
    _assert_same(plain, compiled)


def test_fused_projection_shares_the_weights_and_skips_what_it_cannot_fuse(tiny_weights):
    from peft import LoraConfig

    from train.fused import FusedProjection, fuse_flux_attention
    from train.models import family_for

    def model_with(dropout):
        spec = quick_spec(tiny_weights, "flux-dev")
        family = family_for(spec, tiny_weights / "tiny-flux-dev")
        family.load(torch.float32)
        model = family.denoiser
        model.add_adapter(
            LoraConfig(r=4, lora_alpha=4, lora_dropout=dropout, target_modules=spec.lora_target_modules())
        )
        return model

    model = model_with(0.0)
    attn = model.transformer_blocks[0].attn
    q_before = attn.to_q.base_layer.weight.detach().clone()
    assert fuse_flux_attention(model) == (3, [])
    assert isinstance(attn.to_qkv, FusedProjection) and attn.fused_projections
    fused_storage = attn.to_qkv.weight.untyped_storage().data_ptr()
    for proj in (attn.to_q, attn.to_k, attn.to_v):  # views into the stacked weight, not copies
        assert proj.base_layer.weight.untyped_storage().data_ptr() == fused_storage
    assert torch.equal(attn.to_q.base_layer.weight, q_before)
    assert not any(k.startswith("transformer_blocks.0.attn.to_qkv") for k in model.state_dict())

    n, skipped = fuse_flux_attention(model_with(0.1))
    assert n == 0 and skipped and all("LoRA dropout is on" in s for s in skipped)


def test_compile_auto_is_on_for_long_gpu_runs_only(tiny_weights):
    from train.speed import COMPILE_MIN_STEPS, use_compile

    long_run = quick_spec(tiny_weights, "flux-dev", steps=COMPILE_MIN_STEPS)
    short_run = quick_spec(tiny_weights, "flux-dev", steps=COMPILE_MIN_STEPS - 1)
    assert long_run.speed.compile == "auto"  # the default
    assert use_compile(long_run, cuda=True) and not use_compile(short_run, cuda=True)
    assert not use_compile(long_run, cuda=False)  # a CPU run never pays the warm-up
    forced = quick_spec(tiny_weights, "flux-dev", **{"speed.compile": "blocks"})
    off = quick_spec(tiny_weights, "flux-dev", steps=5000, **{"speed.compile": "off"})
    assert use_compile(forced, cuda=False) and not use_compile(off, cuda=True)


@pytest.mark.parametrize("model", ["flux-dev", "sdxl"])
def test_fused_lora_layers_match(tiny_weights, sample_dataset, tmp_path, model):
    """speed.fuse_lora: base and LoRA down projection as one matmul; the same numbers and files."""
    plain = _run(tiny_weights, sample_dataset, tmp_path / "plain", model)
    fused = _run(tiny_weights, sample_dataset, tmp_path / "fused", model, **{"speed.fuse_lora": "on"})
    n = {"flux-dev": 17, "sdxl": 32}[model]  # every LoRA linear (SDXL's conv LoRA keeps its own path)
    assert f"fuse_lora: {n} LoRA linears" in fused[1]
    _assert_same(plain, fused)
    assert set(fused[2]) == set(plain[2])


def test_every_exact_lever_together_under_compile(tiny_weights, sample_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("ADVANCED_TRAINER_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    plain = _run(tiny_weights, sample_dataset, tmp_path / "plain", "flux-dev")
    fast = _run(
        tiny_weights,
        sample_dataset,
        tmp_path / "fast",
        "flux-dev",
        **{"speed.fuse_qkv": "on", "speed.fuse_lora": "on", "speed.compile": "blocks"},
    )
    assert "fuse_qkv: 3" in fast[1] and "fuse_lora: 8" in fast[1]  # q/k/v groups take 9 of the 17
    _assert_same(plain, fast)


def test_fused_lora_leaves_fp8_layers_alone(tiny_weights):
    from peft import LoraConfig

    from train.fp8 import Fp8FrozenLinear, convert_frozen_linears
    from train.fused import fuse_lora_layers
    from train.models import family_for

    spec = quick_spec(tiny_weights, "flux-dev")
    family = family_for(spec, tiny_weights / "tiny-flux-dev")
    family.load(torch.float32)
    model = family.denoiser
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=spec.lora_target_modules()))
    convert_frozen_linears(model)
    fp8_bases = sum(isinstance(getattr(m, "base_layer", None), Fp8FrozenLinear) for m in model.modules())
    assert fp8_bases == 17
    assert fuse_lora_layers(model) == (0, [])  # every LoRA base here runs fp8: nothing to stack
