"""Fused q/k/v projections with their LoRA (``speed.fuse_qkv``), for Flux attention.

Stock peft runs an attention's q, k and v projections as three base matmuls plus, per
projection, a LoRA down matmul, an up matmul, a scale and an add: 15 kernels, each reading
the same input. Fused, it is one base matmul over the stacked weights, one down matmul over
the stacked A matrices and one up matmul over the block-diagonal B matrices: 3 kernels.

The LoRA's structure does not change: peft's own A and B parameters are used (stacked each
step, a few hundred kilobytes), so the optimizer, checkpoints and exports see exactly the
modules they see without fusion. The stacked base weight is made once, and each projection's
own base weight becomes a view into it, so no memory is added. diffusers' Flux attention
processor reads ``to_qkv`` / ``to_added_qkv`` when ``fused_projections`` is set, which is how
the fused path is taken.

Same numbers as the unfused path up to float summation order (tests/test_speed.py): the
block-diagonal zeros add exact zeros. Fused only where the projections share one LoRA scale
and LoRA dropout is 0 (one dropout mask for three projections would change the maths).
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F

from .fp8 import Fp8FrozenLinear, compute_dtype

ADAPTER = "default"


# peft's LoRA layers (``lora.Linear``) are reached through plain ``nn.Module`` references here;
# their adapter dicts (lora_A, lora_B, scaling) are read as ``Any``: torch types every module
# attribute as ``Tensor | Module``.


def _base(part: torch.nn.Module) -> torch.nn.Linear:
    return cast(torch.nn.Linear, getattr(part, "base_layer", part))


def _lora(part: torch.nn.Module) -> tuple[torch.nn.Linear, torch.nn.Linear, float] | None:
    """(A, B, scale) of a peft LoRA layer's adapter, or None for a plain linear."""
    layer: Any = part
    if not hasattr(layer, "lora_A") or ADAPTER not in layer.lora_A:
        return None
    return layer.lora_A[ADAPTER], layer.lora_B[ADAPTER], float(layer.scaling[ADAPTER])


def can_fuse(parts: list[torch.nn.Module]) -> str | None:
    """None when the projections fuse, else why not."""
    loras = [_lora(p) for p in parts]
    if any(type(_base(p)) is not torch.nn.Linear for p in parts):
        return "a projection is not a plain linear"
    if len({_base(p).in_features for p in parts}) != 1:
        return "the projections take different inputs"
    scales = {lo[2] for lo in loras if lo is not None}
    if len(scales) > 1:
        return "the projections' LoRA scales differ"
    for p, lo in zip(parts, loras, strict=True):
        if lo is not None and not isinstance(cast(Any, p).lora_dropout[ADAPTER], torch.nn.Identity):
            return "LoRA dropout is on"
        if lo is not None and (
            getattr(p, "merged", False)
            or getattr(p, "disable_adapters", False)
            or ADAPTER in getattr(p, "lora_variant", {})
        ):
            return "the LoRA is merged, disabled or not a plain LoRA"
    return None


class FusedProjection(torch.nn.Module):
    """Several projections of one input as one matmul, each projection's LoRA included.

    ``parts`` stay where they are (and are not registered here: the state dict keeps its keys);
    their base weights become views into this module's stacked weight.
    """

    def __init__(self, parts: list[torch.nn.Module]):
        super().__init__()
        bases = [_base(p) for p in parts]
        self._parts = tuple(parts)  # a tuple: not registered as submodules
        weight = torch.cat([b.weight.detach() for b in bases])
        bias = None
        if any(b.bias is not None for b in bases):
            bias = torch.cat(
                [
                    b.bias.detach()
                    if b.bias is not None
                    else torch.zeros(b.out_features, dtype=weight.dtype, device=weight.device)
                    for b in bases
                ]
            )
        row = 0
        for b in bases:  # each projection now reads its rows of the stacked weight: no second copy
            _mark_fused(b, self.__class__.__name__)  # unused by the forward now (fp8 skips it)
            b.weight.data = weight[row : row + b.out_features]
            if b.bias is not None:
                assert bias is not None
                b.bias.data = bias[row : row + b.out_features]
            row += b.out_features
        self.weight, self.bias = weight, bias  # plain attributes: frozen, never broadcast or saved
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.fp8 = None
        loras = [_lora(p) for p in parts]
        self._lora_parts = [i for i, lo in enumerate(loras) if lo is not None]
        self.scale = next((lo[2] for lo in loras if lo is not None), 1.0)

    def use_fp8(self) -> int:
        """Run the stacked base matmul in fp8 (train/fp8.py) and free the bf16 weights; returns
        the parameters converted."""
        assert self.weight is not None, "already fp8"
        n_params = self.weight.numel()
        self.fp8 = Fp8FrozenLinear(self.weight, self.bias)
        empty = torch.empty(0, dtype=self.weight.dtype, device=self.weight.device)
        for p in self._parts:  # only the fused path runs now; the views would keep the bf16 storage alive
            _base(p).weight.data = empty
            if _base(p).bias is not None:
                _base(p).bias.data = empty
        self.weight = self.bias = None
        return n_params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8 is not None:
            y = self.fp8(x)
        else:
            assert self.weight is not None
            y = F.linear(x, self.weight, self.bias)
        if not self._lora_parts:
            return y
        loras = [_lora(p) for p in self._parts]
        a = torch.cat([lo[0].weight for lo in loras if lo is not None])
        blocks = []
        for p, lo in zip(self._parts, loras, strict=True):  # zero blocks for projections without a LoRA
            blocks.append(
                lo[1].weight
                if lo is not None
                else torch.zeros(_base(p).out_features, 0, dtype=a.dtype, device=a.device)
            )
        b = torch.block_diag(*blocks)
        result_dtype = y.dtype
        h = F.linear(x.to(a.dtype), a)  # peft casts the input to the LoRA's dtype the same way
        return (y + F.linear(h, b) * self.scale).to(result_dtype)


def _mark_fused(linear: torch.nn.Module, into: str) -> None:
    """Marks a base linear whose weight now lives in a fused matmul (fp8 and the fusers skip it).
    A plain attribute: set past ``Module.__setattr__``, which types values as tensors or modules."""
    object.__setattr__(linear, "fused_into", into)


def fuse_flux_attention(model: torch.nn.Module) -> tuple[int, list[str]]:
    """Fuse q/k/v (and the text stream's add_q/k/v) of every Flux attention in ``model``.

    Returns (projections fused, reasons for any left unfused).
    """
    fused, skipped = 0, []
    for name, attn in model.named_modules():
        if type(attn).__name__ != "FluxAttention" or getattr(attn, "fused_projections", False):
            continue
        a: Any = attn  # diffusers' FluxAttention: its projections are typed Tensor | Module by torch
        groups: dict[str, list[torch.nn.Module]] = {"to_qkv": [a.to_q, a.to_k, a.to_v]}
        if getattr(a, "add_q_proj", None) is not None:
            groups["to_added_qkv"] = [a.add_q_proj, a.add_k_proj, a.add_v_proj]
        reasons = {key: can_fuse(parts) for key, parts in groups.items()}
        if any(reasons.values()):  # all or nothing: the processor reads both fused projections
            skipped += [f"{name}: {why}" for why in reasons.values() if why]
            continue
        for key, parts in groups.items():
            setattr(attn, key, FusedProjection(parts))
            fused += 1
        a.fused_projections = True  # diffusers' processor then reads to_qkv / to_added_qkv
    return fused, skipped


class _StackedMatmul(torch.autograd.Function):
    """z = x @ [W; A]ᵀ for a LoRA layer whose base weight W is the top of ``stacked``.

    The A rows of ``stacked`` are refreshed from the trained (fp32) A on every forward, so one
    matmul yields both the base output and the LoRA's down projection, and one matmul gives the
    input gradient of both (dz @ [W; A]). Only A gets a weight gradient: dAᵀ = dhᵀ x.
    """

    @staticmethod
    def forward(ctx, x, stacked, a):  # type: ignore[override]
        rows = stacked.shape[0] - a.shape[0]
        with torch.no_grad():
            stacked[rows:].copy_(a.detach())
        ctx.save_for_backward(x, stacked)
        ctx.rows, ctx.a_dtype = rows, a.dtype
        return F.linear(x, stacked)

    @staticmethod
    def backward(ctx, grad_z):  # type: ignore[override]
        x, stacked = ctx.saved_tensors
        grad_x = grad_z @ stacked
        grad_h = grad_z[..., ctx.rows :]
        grad_a = grad_h.reshape(-1, grad_h.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        return grad_x, None, grad_a.to(ctx.a_dtype)


def _fused_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Replaces a peft ``lora.Linear``'s forward: base and LoRA down projection as one matmul."""
    a = self.lora_A[ADAPTER].weight
    b = self.lora_B[ADAPTER].weight
    base = self.base_layer
    kind, dtype = x.device.type, compute_dtype(x)
    with torch.autocast(kind, enabled=False):
        stacked = self._stacked if self._stacked.dtype == dtype else self._stacked.to(dtype)
        z = _StackedMatmul.apply(x.to(dtype), stacked, a)
        y, h = z[..., : base.out_features], z[..., base.out_features :]
        if base.bias is not None:
            y = y + base.bias.to(dtype)
        return y + F.linear(h, b.to(dtype)) * self.scaling[ADAPTER]


def fuse_lora_layers(model: torch.nn.Module) -> tuple[int, list[str]]:
    """Run each LoRA linear (not already fused or fp8) with its down projection stacked under the
    base weight. Returns (layers fused, reasons for any skipped)."""
    fused, skipped = 0, []
    for name, layer in model.named_modules():
        if _lora(layer) is None or type(layer.base_layer) is not torch.nn.Linear:
            continue
        if getattr(layer.base_layer, "fused_into", None):
            continue  # part of a fused q/k/v group, which has its own path
        why = can_fuse([layer])
        if why:
            skipped.append(f"{name}: {why}")
            continue
        peft_layer: Any = layer
        base, a = peft_layer.base_layer, peft_layer.lora_A[ADAPTER].weight
        stacked = torch.cat([base.weight.detach(), a.detach().to(base.weight.dtype)])
        base.weight.data = stacked[: base.out_features]  # the base reads its rows: no second copy
        _mark_fused(base, "stacked LoRA")
        layer._stacked = stacked  # a plain attribute: frozen (its A rows are rewritten each step)
        layer.forward = _fused_lora_forward.__get__(layer)
        fused += 1
    return fused, skipped
