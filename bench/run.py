"""Time one benchmark case with one implementation in this process; print one JSON line.

    python -m bench.run --case flux1024 --impl project [--tiny] [--steps 10]

``project`` is this trainer's own step (``train.loop.micro_step``: the family loss from
cached-style inputs, backward, clipping, optimizer) with the LoRA set up as the trainer sets
it up, and the spec's ``speed`` section from BENCH_SPEED (JSON). ``stock`` is the plain
diffusers + peft step of the stock baseline (docs/benchmarks.md): the same architecture and LoRA
rank, fp32 LoRA under bf16 autocast, fused AdamW, MSE against a fixed target;
``stock-compiled`` is that step with diffusers' ``compile_repeated_blocks()``. All use random
inputs of the real shapes.

A case with ``memory_gib`` caps this process's CUDA memory at that size (an L40S is 44 GiB);
the project plans its memory for the cap under policy ``auto``, the stock step turns on
gradient checkpointing.
"""

# diffusers exports its classes through a lazy module that pyright cannot see into; the names are
# diffusers' documented public API.
# pyright: reportPrivateImportUsage=false

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from .cases import CASES, Case

IMPLS = ["stock", "stock-compiled", "project"]
PEAK_TFLOPS = float(os.environ.get("PEAK_TFLOPS", "989"))  # H200 dense bf16; set yours elsewhere
# The stock baseline's LoRA targets (all 14 Flux linear types; SDXL attention).
STOCK_TARGETS = {
    "flux": [
        "attn.to_k",
        "attn.to_q",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
        "proj_mlp",
        "proj_out",
    ],
    "sdxl": ["to_q", "to_k", "to_v", "to_out.0"],
}


# A diffusers FluxTransformer2DModel or UNet2DConditionModel: its config and adapter methods are
# dynamic attributes that torch.nn.Module's typing cannot describe.
Model = Any


@dataclass
class TimedStep:
    """One implementation's optimizer step, ready to time, and what it was set up with."""

    run: Callable[[], None]
    trainable: int  # trainable parameters
    gradient_checkpointing: bool
    levers: list[str] = field(default_factory=list)


def build_model(case: Case, tiny: bool, device: torch.device, dtype: torch.dtype) -> Model:
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    cls = FluxTransformer2DModel if case.family == "flux" else UNet2DConditionModel
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(**case.config(tiny))
    finally:
        torch.set_default_dtype(previous)
    return model.requires_grad_(False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cap_memory(case: Case, device: torch.device) -> int | None:
    """Limit this process to ``case.memory_gib`` of CUDA memory; returns the free bytes under the cap."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    if case.memory_gib is None:
        return free
    cap = int(case.memory_gib * 2**30)
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
    return max(0, min(free, cap - torch.cuda.memory_reserved(device)))


def project_step(case: Case, model: Model, device: torch.device, dtype: torch.dtype) -> TimedStep:
    """A step of this trainer, through the same functions the training loop calls."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from train.loop import build_optimizer, make_trainable, micro_step
    from train.memory import choose_memory_plan
    from train.models import family_for
    from train.models.base import Batch, BatchRandom
    from train.spec import parse_spec
    from train.speed import (
        apply_attention_backend,
        apply_compile,
        apply_structure_levers,
        resident_weight_bytes,
    )

    cuda = device.type == "cuda"
    spec = parse_spec(
        {
            "model": "flux-dev" if case.family == "flux" else "sdxl",
            "base_weights": "bench",
            "resolutions": [max(case.resolution, 64)],
            "batch_size": case.batch_size,
            "memory_policy": os.environ.get("BENCH_MEMORY_POLICY") or ("auto" if case.memory_gib else "off"),
            "speed": json.loads(os.environ.get("BENCH_SPEED") or "{}"),
            "flow": {"max_sequence_length": min(case.text_tokens, 512)},
        }
    )
    # no pipeline folder: the parts the loss needs are stand-ins set below (hence untyped)
    family: Any = family_for(spec, Path("unused"))
    cfg = model.config
    if case.family == "flux":
        family.pipe = SimpleNamespace(
            transformer=model,
            vae=SimpleNamespace(config=SimpleNamespace(shift_factor=0.1159, scaling_factor=0.3611)),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
        )
        channels = cfg.in_channels // 4
        text = {
            "prompt_embeds": torch.randn(case.batch_size, case.text_tokens, cfg.joint_attention_dim),
            "pooled_prompt_embeds": torch.randn(case.batch_size, cfg.pooled_projection_dim),
        }
    else:
        family.pipe = SimpleNamespace(
            unet=model, vae=SimpleNamespace(config=SimpleNamespace(scaling_factor=0.13025))
        )
        family.noise_scheduler = DDPMScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
        )
        family.prediction_type = "epsilon"
        channels = cfg.in_channels
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        text = {
            "prompt_embeds": torch.randn(case.batch_size, case.text_tokens, cfg.cross_attention_dim),
            "pooled_prompt_embeds": torch.randn(case.batch_size, pooled),
        }
    params = make_trainable(spec, model)
    levers = apply_structure_levers(spec, model, cuda)  # the order of train.loop: these, plan, compile
    if cuda:
        torch.cuda.empty_cache()
    plan = choose_memory_plan(
        spec.memory_policy,
        cap_memory(case, device),
        model=spec.model,
        weight_bytes=resident_weight_bytes(model),
        trainable_params=sum(p.numel() for p in params),
        optimizer=spec.optimizer,
        resolution=case.resolution,
        batch_size=case.batch_size,
        text_tokens=case.text_tokens,
    )
    if plan.gradient_checkpointing:
        from train.memory import enable_checkpointing

        enable_checkpointing(model, plan.checkpoint_fraction)
    apply_attention_backend(spec.speed.attention, cuda)
    levers += apply_compile(spec, model, cuda)
    model.train()
    accelerator = Accelerator(mixed_precision="bf16" if cuda else "no", cpu=not cuda)
    optimizer = build_optimizer(spec, params, cuda)
    model, optimizer = accelerator.prepare(model, optimizer)
    side = case.resolution // 8
    gen = torch.Generator(device=device).manual_seed(0)
    batch = Batch(
        latent_mean=torch.randn(case.batch_size, channels, side, side, device=device),
        latent_std=torch.full((case.batch_size, channels, side, side), 0.05, device=device),
        text={k: v.to(device, dtype) for k, v in text.items()},
        time_ids=torch.tensor(
            [[case.resolution, case.resolution, 0, 0, case.resolution, case.resolution]] * case.batch_size,
            device=device,
            dtype=torch.float32,
        ),
        rng=BatchRandom(gen, case.batch_size, 0, case.batch_size, device),
    )

    def step():
        micro_step(family, model, batch, accelerator, optimizer, params, spec.max_grad_norm)

    return TimedStep(
        step, sum(p.numel() for p in params), plan.gradient_checkpointing, [plan.reason, *levers]
    )


def stock_step(
    case: Case, model: Model, device: torch.device, dtype: torch.dtype, compiled: bool = False
) -> TimedStep:
    from peft import LoraConfig

    cuda = device.type == "cuda"
    model.add_adapter(
        LoraConfig(
            r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=STOCK_TARGETS[case.family]
        )
    )
    cap_memory(case, device)
    if case.memory_gib:
        model.enable_gradient_checkpointing()
    if compiled:  # what a stock user gets; the tests' tiny runs may pick a cheaper backend
        model.compile_repeated_blocks(backend=os.environ.get("ADVANCED_TRAINER_COMPILE_BACKEND", "inductor"))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
    cfg, b, side = model.config, case.batch_size, case.resolution // 8
    if case.family == "flux":
        n_img = (side // 2) ** 2
        ids = torch.zeros(side // 2, side // 2, 3, device=device)
        ids[..., 1] += torch.arange(side // 2, device=device)[:, None]
        ids[..., 2] += torch.arange(side // 2, device=device)[None, :]
        inputs = dict(
            hidden_states=torch.randn(b, n_img, cfg.in_channels, device=device, dtype=dtype),
            encoder_hidden_states=torch.randn(
                b, case.text_tokens, cfg.joint_attention_dim, device=device, dtype=dtype
            ),
            pooled_projections=torch.randn(b, cfg.pooled_projection_dim, device=device, dtype=dtype),
            timestep=torch.rand(b, device=device, dtype=dtype),
            guidance=torch.ones(b, device=device, dtype=dtype),
            img_ids=ids.reshape(-1, 3).to(dtype),
            txt_ids=torch.zeros(case.text_tokens, 3, device=device, dtype=dtype),
        )
    else:
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs = dict(
            sample=torch.randn(b, cfg.in_channels, side, side, device=device, dtype=dtype),
            timestep=torch.randint(0, 1000, (b,), device=device),
            encoder_hidden_states=torch.randn(
                b, case.text_tokens, cfg.cross_attention_dim, device=device, dtype=dtype
            ),
            added_cond_kwargs=dict(
                text_embeds=torch.randn(b, pooled, device=device, dtype=dtype),
                time_ids=torch.randn(b, 6, device=device, dtype=dtype),
            ),
        )
    target = {}

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            out = model(**inputs, return_dict=False)[0]
        if "t" not in target:
            target["t"] = torch.randn_like(out)
        torch.nn.functional.mse_loss(out.float(), target["t"].float()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    levers = ["gradient checkpointing"] * bool(case.memory_gib) + ["compile_repeated_blocks"] * compiled
    return TimedStep(step, sum(p.numel() for p in params), bool(case.memory_gib), levers)


def measure(case_name: str, impl: str, tiny: bool, steps: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(
            False
        )  # cuDNN SDPA's backward crashed on the H200 (gpu-baseline.md)
    case = CASES[case_name].scaled(tiny)
    model = build_model(case, tiny, device, dtype)
    base_params = sum(p.numel() for p in model.parameters())
    if impl == "project":
        timed = project_step(case, model, device, dtype)
    else:
        timed = stock_step(case, model, device, dtype, compiled=impl == "stock-compiled")
    step = timed.run

    t0 = time.perf_counter()
    step()  # the first step pays for compilation, if any
    _sync(device)
    first = time.perf_counter() - t0
    for _ in range(1 if tiny else 2):
        step()
    _sync(device)
    warmup = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    _sync(device)
    tflop = counter.get_total_flops() / 1e12
    med = statistics.median(times)
    return {
        "case": case_name,
        "impl": impl,
        "tiny": tiny,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "resolution": case.resolution,
        "batch_size": case.batch_size,
        "s_per_step": round(med, 5),
        "s_min": round(min(times), 5),
        "s_max": round(max(times), 5),
        "warmup_s": round(warmup, 2),
        "first_step_s": round(first, 2),
        "memory_cap_gib": case.memory_gib,
        "tflop_per_step": float(f"{tflop:.4g}"),
        "mfu_pct": round(100 * tflop / med / PEAK_TFLOPS, 2) if device.type == "cuda" else None,
        "peak_gib": round(peak, 2) if peak is not None else None,
        "trainable_m": round(timed.trainable / 1e6, 2),
        "base_params_b": round(base_params / 1e9, 3),
        "gradient_checkpointing": timed.gradient_checkpointing,
        "steps": steps,
        "levers": timed.levers,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.run")
    parser.add_argument("--case", required=True, choices=sorted(CASES))
    parser.add_argument("--impl", required=True, choices=IMPLS)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    print(json.dumps(measure(args.case, args.impl, args.tiny, args.steps)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
