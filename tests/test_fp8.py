"""fp8 matmuls for the frozen base (speed.fp8_base): what they cost in accuracy, bounded.

Unlike the other levers, fp8 is not numerically equivalent: e4m3 keeps 3 mantissa bits, so
each quantised value is off by up to 2^-4 (6.25 %) relative, ~3.6 % RMS. A matmul mixes the
independent errors of both operands, so its output is off by ~3-5 % RMS relative; we require
< 6 %. Through training, the loss is dominated by the sampled noise, which fp8 does not touch:
per-step losses agree within 1 % (observed ~0.1 % on the tiny models over 20 steps), and the
trained LoRA points the same way: cosine similarity of the B matrices (zero at init, so they
are the whole update) > 0.98 (observed 0.994-0.995). A broken scale or a transposed weight
gives errors of order 100 % and a cosine near 0, so these bounds catch real faults.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import quick_spec, train_quietly

SDXL_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_out"]
STEPS = 20


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_fp8_linear_approximates_the_linear_and_its_input_gradient():
    from train.fp8 import Fp8FrozenLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128).requires_grad_(False)
    fp8 = Fp8FrozenLinear(linear.weight, linear.bias)
    x = torch.randn(2, 50, 256, requires_grad=True)
    y = fp8(x)
    y.square().sum().backward()
    grad_fp8, x.grad = x.grad.clone(), None
    ref = linear(x)
    ref.square().sum().backward()
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert 1e-3 < _rel(y, ref) < 0.06  # really quantised, and within e4m3's error
    assert 1e-3 < _rel(grad_fp8, x.grad) < 0.06
    assert not any(p.requires_grad for p in fp8.parameters())  # nothing of the base trains
    assert fp8.w_q.dtype == torch.float8_e4m3fn and fp8.w_q.shape == (128, 256)
    assert fp8.nbytes() < linear.weight.numel() * 2 / 1.9  # under half of what bf16 takes


def test_quantize_rows_uses_power_of_two_scales_and_survives_zero_rows():
    from train.fp8 import E4M3_MAX, quantize_rows

    t = torch.tensor([[0.0, 0.0, 0.0], [1.0, -3.0, 0.5], [1e-8, 2e-8, 0.0]])
    q, scale = quantize_rows(t)
    assert torch.isfinite(q.float()).all() and torch.isfinite(scale).all()
    assert torch.equal(torch.log2(scale), torch.log2(scale).round())  # exact powers of two
    assert (q.float().abs().amax(dim=-1) <= E4M3_MAX).all()
    assert torch.allclose(q.float() * scale, t, rtol=0.07, atol=0)


def _train(tiny_weights, sample_dataset, out, model, **fields):
    extra = {"lora.targets": SDXL_TARGETS} if model == "sdxl" else {}
    spec = quick_spec(tiny_weights, model, **{"steps": STEPS, "batch_size": 2, **extra, **fields})
    result, log = train_quietly(spec, sample_dataset, out)
    return result, log, load_file(str(result.lora_file))


def _cosine_of_updates(a: dict, b: dict) -> float:
    keys = [k for k in a if "lora_B" in k]
    dot = sum((a[k] * b[k]).sum().item() for k in keys)
    na = math.sqrt(sum(a[k].square().sum().item() for k in keys))
    nb = math.sqrt(sum(b[k].square().sum().item() for k in keys))
    return dot / (na * nb)


@pytest.mark.parametrize(
    "model,extra",
    [("flux-dev", {}), ("sdxl", {}), ("flux-dev", {"speed.fuse_qkv": "on"})],
    ids=["flux", "sdxl", "flux-fused-qkv"],
)
def test_fp8_base_trains_like_the_plain_base(tiny_weights, sample_dataset, tmp_path, model, extra):
    plain = _train(tiny_weights, sample_dataset, tmp_path / "plain", model)
    fp8 = _train(tiny_weights, sample_dataset, tmp_path / "fp8", model, **{"speed.fp8_base": "on", **extra})
    assert "run fp8 e4m3 matmuls" in fp8[1]
    la, lb = [v for _, v in plain[0].losses], [v for _, v in fp8[0].losses]
    assert la != lb  # fp8 really ran
    assert lb == pytest.approx(la, rel=0.01)
    assert set(fp8[2]) == set(plain[2])  # the same LoRA file layout: loaders see no difference
    assert _cosine_of_updates(plain[2], fp8[2]) > 0.98


def test_fp8_base_compiles(tiny_weights, sample_dataset, tmp_path, monkeypatch):
    """fp8 is meant to run under regional compilation (the quantisation fuses); same numbers."""
    monkeypatch.setenv("ADVANCED_TRAINER_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    eager = _train(
        tiny_weights, sample_dataset, tmp_path / "eager", "flux-dev", steps=4, **{"speed.fp8_base": "on"}
    )
    compiled = _train(
        tiny_weights,
        sample_dataset,
        tmp_path / "compiled",
        "flux-dev",
        steps=4,
        **{"speed.fp8_base": "on", "speed.compile": "blocks"},
    )
    assert "compile: repeated blocks" in compiled[1]
    assert [v for _, v in compiled[0].losses] == pytest.approx([v for _, v in eager[0].losses], rel=1e-5)


def test_fp8_base_refuses_full_fine_tunes_and_old_gpus(tiny_weights, monkeypatch):
    from train.loop import TrainingError, check_machine
    from train.spec import SpecError, parse_spec

    with pytest.raises(SpecError, match="speed.fp8_base: on needs mode lora"):
        parse_spec({"mode": "full", "speed": {"fp8_base": "on"}})
    spec = quick_spec(tiny_weights, "flux-dev", **{"speed.fp8_base": "on"})
    check_machine(spec, cuda=False)  # the CPU runs torch's own fp8 matmul (how these tests run)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(TrainingError, match=r"speed.fp8_base: .*compute capability 8.9\+\); this one is 8.0"):
        check_machine(spec, cuda=True)
    # the row-scaled fp8 kernels write bf16: an fp32 run on a capable GPU is refused before loading
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    fp32 = quick_spec(tiny_weights, "flux-dev", precision="fp32", **{"speed.fp8_base": "on"})
    with pytest.raises(TrainingError, match="speed.fp8_base: needs bf16 precision on a GPU"):
        check_machine(fp32, cuda=True)


def test_memory_plan_counts_fp8_weights_at_one_byte(tiny_weights):
    from train.fp8 import Fp8FrozenLinear, convert_frozen_linears
    from train.models import family_for
    from train.speed import resident_weight_bytes

    family = family_for(quick_spec(tiny_weights, "flux-dev"), tiny_weights / "tiny-flux-dev")
    family.load(torch.float32)
    model = family.denoiser
    before = resident_weight_bytes(model)
    n, n_params = convert_frozen_linears(model)
    converted = [m for m in model.modules() if isinstance(m, Fp8FrozenLinear)]
    assert n == len(converted) > 0
    scales = sum(m.w_scale.numel() for m in converted)
    # each converted weight: 4 bytes (fp32 here; 2 in bf16) -> 1 byte plus one fp32 scale per row
    assert before - resident_weight_bytes(model) == n_params * 4 - (n_params + scales * 4)
