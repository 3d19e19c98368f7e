"""Speed levers for the training step, each behind a spec switch (``speed`` section).

Every lever must leave the numbers as they were (tests/test_speed.py compares each against
the plain path on the tiny models) — speed never silently costs quality. Which ones pay, and
by how much, is measured with ``bench/`` on a GPU; the defaults stay conservative until then.

- ``attention``: the scaled-dot-product-attention backend on CUDA. ``auto`` allows flash and
  memory-efficient attention but not cuDNN's, whose backward pass crashed on the H200 with the
  stock stack (docs/benchmarks.md, "The stock baseline"). No effect on a CPU.
- ``compile``: ``blocks`` compiles the repeated transformer blocks (regional compilation:
  a fraction of whole-model compile time, the same step speed-up). ``auto`` (the default)
  does so on a GPU for runs of COMPILE_MIN_STEPS or more: the stock baseline on the H200 went
  from 0.638 to 0.452 s/step at Flux 1024² for 30-55 s of warm-up, which 200 steps repay.
  Under ``auto`` a graph that fails to compile runs eagerly instead of failing the job.
- ``channels_last``: NHWC memory format for the SDXL UNet's convolutions (``auto``: on CUDA).
- ``cache_on_device``: keep the cached latents and text embeddings on the accelerator, so a
  step copies nothing from the host (``auto``: when they fit in 5 % of free memory).
- ``fuse_qkv``: Flux attention's q/k/v projections and their LoRA as one matmul each
  (train/fused.py); the LoRA keeps its modules, so checkpoints and exports do not change.
- ``fuse_lora``: every other LoRA linear stacks its LoRA down matrix under the base weight, so
  one matmul gives both outputs and one matmul both input gradients (train/fused.py).
- ``fp8_base``: the frozen base's linears in the repeated blocks run fp8 matmuls (train/fp8.py).
  The one lever that is not numerically equivalent: e4m3 keeps 3 mantissa bits, so each base
  matmul is off by ~3 % (relative RMS); tests/test_fp8.py bounds what that does to the loss
  and the LoRA. Off by default; a choice for speed on Ada/Hopper GPUs.
"""

from __future__ import annotations

import os
from typing import Any, Protocol, cast

import torch
import torch._dynamo as dynamo

from .families import model_info
from .fp8 import Fp8FrozenLinear, convert_frozen_linears
from .fused import fuse_flux_attention, fuse_lora_layers

CACHE_FRACTION_OF_FREE = 0.05
COMPILE_MIN_STEPS = 200


def apply_attention_backend(choice: str, cuda: bool) -> str:
    """Set torch's SDPA backend switches for ``choice``; returns what was done (for the log)."""
    if not cuda:
        return "attention: CPU (backend switches do not apply)"
    b = torch.backends.cuda
    wanted = {
        "auto": {"flash", "efficient", "math"},
        "flash": {"flash"},
        "efficient": {"efficient"},
        "math": {"math"},
        "cudnn": {"cudnn", "math"},
    }[choice]
    b.enable_flash_sdp("flash" in wanted)
    b.enable_mem_efficient_sdp("efficient" in wanted)
    b.enable_math_sdp("math" in wanted)
    b.enable_cudnn_sdp("cudnn" in wanted)
    return f"attention: SDPA backends {', '.join(sorted(wanted))}"


def compile_blocks(model: torch.nn.Module) -> str:
    """Regional compilation of the repeated blocks (diffusers' ``compile_repeated_blocks``).

    ``fullgraph`` stays off: with peft's LoRA layers it found no compiled frames (gpu-baseline.md).
    ADVANCED_TRAINER_COMPILE_BACKEND picks another dynamo backend (tests use ``aot_eager``).
    """
    backend = os.environ.get("ADVANCED_TRAINER_COMPILE_BACKEND", "inductor")
    cast(Any, model).compile_repeated_blocks(fullgraph=False, dynamic=False, backend=backend)
    names = sorted(set(getattr(model, "_repeated_blocks", ())))
    return f"compile: repeated blocks {names} with {backend}"


def use_compile(spec, cuda: bool) -> bool:
    if spec.speed.compile == "auto":
        return cuda and spec.steps >= COMPILE_MIN_STEPS
    return spec.speed.compile == "blocks"


def use_channels_last(choice: str, model: str, cuda: bool) -> bool:
    if choice == "on":
        return model_info(model).channels_last  # a transformer has no convolutions to speed up
    return choice == "auto" and cuda and model_info(model).channels_last


def cache_fits_on_device(choice: str, cache_bytes: int, free_bytes: int | None) -> bool:
    if choice == "off" or free_bytes is None:
        return False
    if choice == "on":
        return True
    return cache_bytes <= CACHE_FRACTION_OF_FREE * free_bytes


def resident_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's weights take on the device, fp8 copies included (for the memory plan)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total + sum(m.nbytes() for m in model.modules() if isinstance(m, Fp8FrozenLinear))


class ModelConverter(Protocol):
    """A speed lever that changes the model's modules: asked whether it applies, then run.

    The structure levers run in the order of ``STRUCTURE_CONVERTERS``, before the memory plan
    (fp8 changes what the weights take); compilation runs last, after checkpointing is set.
    Each returns the lines to log, so the run says what it did.
    """

    def wanted(self, spec: Any, cuda: bool) -> bool: ...

    def convert(self, spec: Any, model: torch.nn.Module, cuda: bool) -> list[str]: ...


class ChannelsLast:
    def wanted(self, spec: Any, cuda: bool) -> bool:
        return use_channels_last(spec.speed.channels_last, spec.model, cuda)

    def convert(self, spec: Any, model: torch.nn.Module, cuda: bool) -> list[str]:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # nn.Module.to takes it
        return ["channels_last: on (UNet convolutions in NHWC)"]


class FuseQkv:
    def wanted(self, spec: Any, cuda: bool) -> bool:
        return spec.speed.fuse_qkv == "on"

    def convert(self, spec: Any, model: torch.nn.Module, cuda: bool) -> list[str]:
        if not model_info(spec.model).fuse_qkv:
            return [
                f"fuse_qkv: Flux.1 attention only; nothing fused in this {model_info(spec.model).title} model"
            ]
        n, skipped = fuse_flux_attention(model)
        return [
            f"fuse_qkv: {n} q/k/v projections fused with their LoRA"
            + (f"; left unfused: {'; '.join(skipped[:3])}" if skipped else "")
        ]


class Fp8Base:
    def wanted(self, spec: Any, cuda: bool) -> bool:
        return spec.speed.fp8_base == "on"

    def convert(self, spec: Any, model: torch.nn.Module, cuda: bool) -> list[str]:
        n, n_params = convert_frozen_linears(model)
        lines = [f"fp8_base: {n} frozen linears ({n_params / 1e6:.1f} M parameters) run fp8 e4m3 matmuls"]
        if not use_compile(spec, cuda) and cuda:
            lines.append(
                "fp8_base: without speed.compile=blocks the per-token quantisation runs unfused (slower)"
            )
        return lines


class FuseLora:
    def wanted(self, spec: Any, cuda: bool) -> bool:
        return spec.speed.fuse_lora == "on"

    def convert(self, spec: Any, model: torch.nn.Module, cuda: bool) -> list[str]:
        n, skipped = fuse_lora_layers(model)
        return [
            f"fuse_lora: {n} LoRA linears compute base and LoRA down projection as one matmul"
            + (f"; left as they were: {'; '.join(skipped[:3])}" if skipped else "")
        ]


# The order matters: q/k/v fuse before fp8 (the stacked weight goes fp8 as one matmul), and LoRA
# fusion comes after fp8 (layers that went fp8 keep that path).
STRUCTURE_CONVERTERS: tuple[ModelConverter, ...] = (ChannelsLast(), FuseQkv(), Fp8Base(), FuseLora())


def apply_structure_levers(
    spec: Any,
    model: torch.nn.Module,
    cuda: bool,
    converters: tuple[ModelConverter, ...] = STRUCTURE_CONVERTERS,
) -> list[str]:
    """Levers that change the modules (and fp8: the weights' memory): before the memory plan."""
    lines: list[str] = []
    for converter in converters:
        if converter.wanted(spec, cuda):
            lines += converter.convert(spec, model, cuda)
    return lines


def apply_compile(spec, model: torch.nn.Module, cuda: bool) -> list[str]:
    """Regional compilation, last: it must see the final modules (checkpointing included)."""
    lines = []
    if use_compile(spec, cuda):
        if spec.speed.compile == "auto":
            dynamo.config.suppress_errors = True  # a graph that cannot compile runs eagerly
        auto = f" (auto: a GPU run of {COMPILE_MIN_STEPS}+ steps)" if spec.speed.compile == "auto" else ""
        lines.append(compile_blocks(model) + auto)
    return lines


def describe(spec: Any) -> dict[str, str]:
    return dict(spec.speed.model_dump())
