"""fp8 matmuls for the frozen base of a LoRA run (``speed.fp8_base``).

A LoRA run never updates the base weights, so each frozen linear needs two matmuls a step:
the forward one (x @ Wᵀ) and the input gradient (dy @ W). Both run here on fp8 tensor cores
(Ada/Hopper: twice the bf16 rate) through ``torch._scaled_mm``:

- the weight is quantised once, at conversion, to e4m3 with one power-of-two scale per
  output row, and the bf16 weight is freed: the frozen base takes half the memory it took
  (Flux-dev: ~11 GiB instead of ~22), which the memory policy counts;
- activations and output gradients are quantised per row (per token) on the fly, e4m3,
  with power-of-two scales (exact to apply; the rounding error is only e4m3's 3 mantissa bits);
- no weight gradient is computed and no high-precision input is saved for backward.

Why not torchao's ``Float8Linear``: its backward always computes the weight gradient and
saves the bf16 input (torchao 0.18, float8_linear.py), a third more linear FLOPs and the
activation memory a frozen base does not need. The equivalence test (tests/test_fp8.py) bounds
what fp8 costs in accuracy on the tiny models; the GPU benchmark measures what it buys.
"""

from __future__ import annotations

from typing import Protocol, cast, runtime_checkable

import torch

# torch's fp8 matmul: private by name, the one public entry to the fp8 tensor cores in torch 2.13
_scaled_mm = torch._scaled_mm  # pyright: ignore[reportPrivateImportUsage]

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` runs in here: autocast's, when it is on, else ``x``'s."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 tensor, float32 dequantisation scale of shape (rows, 1)) for a 2-D tensor.

    Each row's scale is the power of two that brings its largest magnitude closest to, but not
    over, e4m3's maximum, so scaling itself adds no rounding error.
    """
    t = t.contiguous()  # the fp8 kernels read their first operand row-major; a transposed view is not
    amax = t.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    exponent = torch.floor(torch.log2(E4M3_MAX / amax))
    quant_scale = torch.exp2(exponent)
    q = (t.float() * quant_scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, torch.exp2(-exponent)


class _Fp8FrozenMatmul(torch.autograd.Function):
    """y = x @ Wᵀ with W = diag(s) · W_q (W_q e4m3, one scale per output row), and dx = dy @ W.

    Forward: x quantised per row, ``_scaled_mm(x_q, W_qᵀ)`` with the row scales of both.
    Backward: the weight's row scales sit on the contraction axis, where ``_scaled_mm`` takes
    none, so they are folded into dy first (dy · diag(s) @ W_q is the same product); dy is then
    quantised per row, and W_q is handed over column-major (a transient transposed copy of one
    layer, 1 byte per weight) because that is the layout the kernel reads its second operand in.
    """

    @staticmethod
    def forward(ctx, x, w_q, w_scale, out_dtype):  # type: ignore[override]
        ctx.save_for_backward(w_q, w_scale)
        ctx.in_dtype, ctx.out_dtype = x.dtype, out_dtype
        shape = x.shape
        qx, sx = quantize_rows(x.reshape(-1, shape[-1]))
        y = _scaled_mm(qx, w_q.t(), scale_a=sx, scale_b=w_scale.t(), out_dtype=out_dtype)
        return y.reshape(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        w_q, w_scale = ctx.saved_tensors
        shape = grad_out.shape
        qg, sg = quantize_rows(grad_out.reshape(-1, shape[-1]).float() * w_scale.t())
        w_col = w_q.t().contiguous().t()  # (N, K), column-major
        ones = torch.ones(1, w_q.shape[1], dtype=torch.float32, device=w_q.device)
        gx = _scaled_mm(qg, w_col, scale_a=sg, scale_b=ones, out_dtype=ctx.out_dtype)
        return gx.reshape(*shape[:-1], gx.shape[-1]).to(ctx.in_dtype), None, None, None


class Fp8FrozenLinear(torch.nn.Module):
    """A frozen ``nn.Linear`` whose matmuls run in fp8; the drop-in for a LoRA layer's base.

    Holds the weight once, in e4m3 (half the bytes of bf16). The quantised weight is a plain
    attribute, not a parameter or buffer: nothing trains it, data-parallel wrappers must not
    broadcast it, and checkpoints hold only the LoRA. Convert after the model is on its device.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        w = weight.detach()
        self.out_features, self.in_features = w.shape
        self.w_q, self.w_scale = quantize_rows(w)  # one power-of-two scale per output row
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)

    def nbytes(self) -> int:
        return self.w_q.numel() + self.w_scale.numel() * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind, dtype = x.device.type, compute_dtype(x)
        with torch.autocast(kind, enabled=False):
            y = _Fp8FrozenMatmul.apply(x.to(dtype), self.w_q, self.w_scale, dtype)
            if self.bias is not None:
                y = y + self.bias.to(dtype)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 rowwise"


@runtime_checkable
class Fp8Convertible(Protocol):
    """A module with a frozen weight that is not an ``nn.Linear`` but can run it in fp8 itself
    (train/fused.py's stacked q/k/v). ``use_fp8`` returns the parameters it converted."""

    fp8: Fp8FrozenLinear | None

    def use_fp8(self) -> int: ...


def fp8_supported(device: torch.device) -> str | None:
    """None when fp8 matmuls run on ``device``, else why not."""
    if device.type == "cpu":
        return None  # torch's CPU _scaled_mm: slow, but exact enough to test with
    if device.type != "cuda":
        return f"fp8 matmuls need a CUDA GPU, not {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return f"fp8 matmuls need an Ada or Hopper GPU (compute capability 8.9+); this one is {major}.{minor}"
    return None


def convertible(name: str, module: torch.nn.Module) -> bool:
    """Frozen linears of the repeated blocks worth converting.

    LoRA's own A/B layers train; the adaptive-norm linears see one token per image (nothing to
    gain, and the modulation they produce is the most sensitive); dims must be multiples of 16
    (the fp8 kernels' rule).
    """
    if (
        type(module) is not torch.nn.Linear
        or module.weight.requires_grad
        or getattr(module, "fused_into", None)
    ):
        return False
    if ".lora_" in name or "norm" in name:
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def convert_frozen_linears(model: torch.nn.Module) -> tuple[int, int]:
    """Swap every convertible linear inside the model's repeated blocks for ``Fp8FrozenLinear``.

    Returns (linears converted, parameters they hold).
    """
    block_types = set(getattr(model, "_repeated_blocks", ()))
    targets: list[tuple[torch.nn.Module, str, torch.nn.Linear, str]] = []
    for block_name, block in model.named_modules():
        if type(block).__name__ not in block_types:
            continue
        for name, module in block.named_modules():
            if not name or not convertible(f"{block_name}.{name}", module):
                continue
            parent_name, _, attr = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            targets.append((parent, attr, cast(torch.nn.Linear, module), f"{block_name}.{name}"))
    n_params, n_linears = 0, len(targets)
    while targets:  # one at a time, dropping each bf16 linear as it goes: the peak stays near the weights
        parent, attr, linear, _ = targets.pop()
        n_params += linear.weight.numel()
        setattr(parent, attr, Fp8FrozenLinear(linear.weight, linear.bias))
        del linear
    # modules holding a frozen weight of their own (fused q/k/v, speed.fuse_qkv) convert themselves:
    # the stacked weight goes fp8 as one matmul
    stacked = [m for m in model.modules() if isinstance(m, Fp8Convertible) and m.fp8 is None]
    for m in stacked:
        n_params += m.use_fp8()
    return n_linears + len(stacked), n_params
