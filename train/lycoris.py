"""LoKr and LoHa, the LyCORIS adapters: their peft configs for training, their files, and loading any
LyCORIS file (ours or another trainer's) into a denoiser as a peft adapter.

The scale: peft multiplies every LoKr / LoHa delta by ``alpha / r``. The loaders people use do not
agree with it for LoKr: LyCORIS, ComfyUI and Forge apply ``alpha / dim`` only where a factor is
split into a low-rank pair (``dim`` its rank) and 1 where both factors are whole matrices. So the
files we write hold the scale folded into the first factor (``lokr_w1`` / ``lokr_w1_a``,
``hada_w1_a``) and an ``alpha`` equal to that rank: every loader then applies exactly 1, and the
delta is the one that trained. Reading a file, the other way round: the loaders' scale is folded
in, and the peft adapter is built with ``alpha = r`` per module.

peft builds a layer's layout (which factor is split, and how the sides factorise) from its config,
not from tensors, so loading infers the config that reproduces the file's shapes: the rank per
module (``rank_pattern``), ``decompose_both``, the Kronecker ``decompose_factor`` and the Tucker
(``use_effective_conv2d``) layout of convolutions. A file whose modules factorise in ways one peft
config cannot express is refused with the reason.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any, cast

import torch

KINDS = ("lokr", "loha")
# A LyCORIS tensor: <module name>.<parameter>
_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<param>lokr_w[12](?:_[ab])?|lokr_t[12]|hada_w[12]_[ab]|hada_t[12]|alpha|dora_scale)$"
)
# How other trainers name a module: diffusers paths behind a component prefix, or the path with its
# dots turned to underscores behind a LyCORIS / kohya / OneTrainer prefix (ComfyUI maps all of them).
DOTTED_PREFIXES = ("transformer.", "unet.", "diffusion_model.", "model.diffusion_model.")
FLAT_PREFIXES = ("lycoris_", "lora_unet_", "lora_transformer_")
COMFY_PREFIX = "lycoris"  # what we write: SimpleTuner's LyCORIS names, ComfyUI and Forge map them


class LycorisError(ValueError):
    """A LyCORIS file that does not fit the model; the message names the file's problem."""


def adapter_kind(keys: Iterable[str]) -> str | None:
    """``lokr`` or ``loha`` for a state dict's (or file's) tensor names; None for a plain LoRA."""
    for key in keys:
        m = _KEY.match(key)
        if m and m["param"].startswith("lokr"):
            return "lokr"
        if m and m["param"].startswith("hada"):
            return "loha"
    return None


def training_config(kind: str, rank: int, alpha: float, factor: int, targets: str | list[str]) -> Any:
    """The peft config a LoKr / LoHa trains with. LoKr starts as LyCORIS does (the second factor 0,
    the first random); LoHa as peft does (one product's second matrix 0): both deltas start at 0."""
    from peft import LoHaConfig, LoKrConfig

    if kind == "lokr":
        return LoKrConfig(
            r=rank,
            alpha=alpha,  # pyright: ignore[reportArgumentType]  # peft types it int; a float alpha is valid
            decompose_factor=factor,
            init_weights="lycoris",
            target_modules=targets,
        )
    return LoHaConfig(
        r=rank,
        alpha=alpha,  # pyright: ignore[reportArgumentType]  # as above
        init_weights=True,
        target_modules=targets,
    )


# -- the factored forward -----------------------------------------------------------------------
# peft's LoKr and LoHa linears build the whole delta weight (out x in) on every forward and multiply
# the input by it: a second full-size matmul beside the base layer's, and two more in the backward
# (bench/adapters.py: 2.4-3.1x a LoRA's layer time, full-size Flux shapes on the CPU). The delta's
# product with the input can be computed from the factors instead, as LyCORIS's "bypass" mode does:
#   LoKr: kron(W1, W2) x = vec(W1 X W2^T) with X the input folded to (in_m, in_n);
#   LoHa: ((A1 B1) * (A2 B2)) x = N (M x), a rank r1*r2 product with M the row-wise Kronecker
#         products of B1 and B2, and N the same of A1 and A2.
# Same numbers (to float rounding), same parameters, a fraction of the work; layers where the
# factored route would cost more than the full one keep peft's.


def _factored_lokr(self: Any, adapter: str, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    peft_way = type(self).__mro__[1]._get_delta_activations  # peft's LoKr Linear
    if self.training and self.rank_dropout[adapter]:
        return peft_way(self, adapter, x, *args, **kwargs)
    w1 = (
        self.lokr_w1[adapter]
        if adapter in self.lokr_w1
        else self.lokr_w1_a[adapter] @ self.lokr_w1_b[adapter]
    )
    full_w2 = adapter in self.lokr_w2
    w2 = self.lokr_w2[adapter] if full_w2 else None
    (out_l, in_m), base = w1.shape, self.get_base_layer()
    out_k, in_n = base.out_features // out_l, base.in_features // in_m
    # multiply-adds per input row: through W2 (whole, or its low-rank pair), then through W1
    if full_w2:
        through_w2 = in_n * out_k
    else:
        rank = self.lokr_w2_b[adapter].shape[0]
        through_w2 = rank * (in_n + out_k)
    factored = in_m * (through_w2 + out_l * out_k)
    if factored >= base.in_features * base.out_features:
        return peft_way(self, adapter, x, *args, **kwargs)
    x = self._cast_input_dtype(x, w1.dtype)
    lead = x.shape[:-1]
    folded = x.reshape(*lead, in_m, in_n)
    if w2 is not None:
        z = folded @ w2.T
    else:
        z = (folded @ self.lokr_w2_b[adapter].T) @ self.lokr_w2_a[adapter].T
    y = (z.transpose(-1, -2) @ w1.T).transpose(-1, -2)  # (..., out_l, out_k)
    return y.reshape(*lead, out_l * out_k) * self.scaling[adapter]


def _factored_loha(self: Any, adapter: str, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    peft_way = type(self).__mro__[1]._get_delta_activations  # peft's LoHa Linear
    if self.training and self.rank_dropout[adapter]:
        return peft_way(self, adapter, x, *args, **kwargs)
    a1, b1 = self.hada_w1_a[adapter], self.hada_w1_b[adapter]
    a2, b2 = self.hada_w2_a[adapter], self.hada_w2_b[adapter]
    out, inp, rank = a1.shape[0], b1.shape[1], a1.shape[1] * a2.shape[1]
    if rank * (inp + out) >= inp * out:
        return peft_way(self, adapter, x, *args, **kwargs)
    m = (b1[:, None, :] * b2[None, :, :]).reshape(rank, inp)
    n = (a1[:, :, None] * a2[:, None, :]).reshape(out, rank)
    x = self._cast_input_dtype(x, m.dtype)
    return (x @ m.T) @ n.T * self.scaling[adapter]


def _forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's LycorisLayer forward without its module-dropout draw (``torch.rand(1)`` on every call,
    a data-dependent branch that breaks torch.compile's graph at every adapted layer) when no active
    adapter has module dropout; otherwise peft's own."""
    active = [a for a in self.active_adapters if a in self._available_adapters]
    if (
        self.disable_adapters
        or self.merged
        or (self.training and any(self.module_dropout[a] for a in active))
    ):
        return type(self).__mro__[1].forward(self, x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    for adapter in active:
        result = result + self._get_delta_activations(adapter, x, *args, **kwargs)
    return result.to(x.dtype)


_FACTORED: dict[type, type] = {}


def _factored_class(cls: type) -> type | None:
    """Our subclass of peft's LoKr / LoHa layer ``cls`` (None for other modules): linears multiply
    through the factors; convolutions keep peft's delta and lose only the module-dropout draw."""
    from peft.tuners.loha import layer as loha
    from peft.tuners.lokr import layer as lokr

    if cls in _FACTORED.values():
        return cls
    deltas: dict[type, Any] = {lokr.Linear: _factored_lokr, loha.Linear: _factored_loha}
    if cls not in (*deltas, lokr.Conv2d, lokr.Conv1d, loha.Conv2d, loha.Conv1d):
        return None
    if cls not in _FACTORED:
        body: dict[str, Any] = {"forward": _forward, "__module__": __name__}
        if cls in deltas:
            body["_get_delta_activations"] = deltas[cls]
        kind = "LoKr" if cls.__module__ == lokr.__name__ else "LoHa"
        _FACTORED[cls] = type(f"Factored{kind}{cls.__name__}", (cls,), body)
    return _FACTORED[cls]


def factored_forward(model: torch.nn.Module) -> int:
    """Make every LoKr / LoHa layer of ``model`` an instance of our subclass of peft's (the same
    parameters and state dict; torch.compile sees an ordinary module class): linears multiply
    through the factors (above), and no layer draws peft's module-dropout number when it has none.
    Returns how many linears multiply through the factors."""
    linears = 0
    for module in model.modules():
        cls = _factored_class(type(module))
        if cls is not None:
            module.__class__ = cls
            linears += "_get_delta_activations" in vars(cls)
    return linears


def lopsided(model: torch.nn.Module, factor: int) -> list[str]:
    """The LoKr layers whose first factor peft makes the larger one: a side shorter than
    ``factor``² splits as (factor, side / factor). ComfyUI and Forge apply such a layer as it is;
    LyCORIS's own reader expects the first factor to be the smaller and refuses the file."""
    from peft.tuners.lokr.layer import LoKrLayer, factorization

    out = []
    for name, module in model.named_modules():
        if isinstance(module, LoKrLayer):
            for side in _sides(module):
                m, n = factorization(side, factor)
                if m > n:
                    out.append(name)
                    break
    return out


# -- writing ------------------------------------------------------------------------------------


def _first_factor(kind: str, params: dict[str, torch.Tensor]) -> str:
    """The tensor a module's scale is folded into."""
    if kind == "lokr":
        return "lokr_w1" if "lokr_w1" in params else "lokr_w1_a"
    return "hada_w1_a"


def _loader_rank(kind: str, params: dict[str, torch.Tensor]) -> int | None:
    """The rank the loaders divide ``alpha`` by (None: a LoKr of two whole factors, scale 1)."""
    if kind == "loha":
        return int(params["hada_w1_b"].shape[0])
    if "lokr_w2_b" in params:
        return int(params["lokr_w2_b"].shape[0])
    if "lokr_w1_b" in params:
        return int(params["lokr_w1_b"].shape[0])
    return None


def _by_module(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = _KEY.match(key)
        if not m:
            raise LycorisError(f"{key}: not a LoKr / LoHa tensor name")
        out.setdefault(m["module"], {})[m["param"]] = tensor
    return out


def baked(state: dict[str, torch.Tensor], kind: str, scale: float) -> dict[str, torch.Tensor]:
    """peft's state dict (its uniform ``alpha / r`` = ``scale``) with the scale folded into each
    module's first factor: the delta at scale 1, which is what every loader applies."""
    out = dict(state)
    for module, params in _by_module(state).items():
        name = f"{module}.{_first_factor(kind, params)}"
        out[name] = state[name] * scale
    return out


def comfy_state_dict(state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """A baked state dict (``baked``) in LyCORIS's own naming: ``lycoris_<module path with _>`` and an
    ``alpha`` equal to the loaders' rank, so LyCORIS, ComfyUI and Forge apply scale 1."""
    out: dict[str, torch.Tensor] = {}
    for module, params in _by_module(state).items():
        flat = f"{COMFY_PREFIX}_{module.replace('.', '_')}"
        for param, tensor in params.items():
            out[f"{flat}.{param}"] = tensor
        rank = _loader_rank(kind, params)
        out[f"{flat}.alpha"] = torch.tensor(float(rank if rank is not None else 1))
    return out


def export_metadata(config: dict[str, Any]) -> dict[str, Any]:
    """The adapter config stored beside a baked file: ``alpha = r`` (the scale is in the tensors),
    so diffusers' ``load_lora_adapter`` rebuilds the exact layers and applies scale 1."""
    out = dict(config)
    out["alpha"] = out.get("r", 1)
    out["alpha_pattern"] = dict(out.get("rank_pattern") or {})
    return out


# -- reading ------------------------------------------------------------------------------------


def _module_names(model: torch.nn.Module) -> tuple[set[str], dict[str, str]]:
    names = {n for n, _ in model.named_modules() if n}
    return names, {n.replace(".", "_"): n for n in names}


def _resolve(name: str, names: set[str], flat: dict[str, str]) -> str | None:
    """The model's module a file's module name means (see DOTTED_PREFIXES / FLAT_PREFIXES)."""
    if name in names:
        return name
    for prefix in DOTTED_PREFIXES:
        if name.startswith(prefix) and name[len(prefix) :] in names:
            return name[len(prefix) :]
    for prefix in FLAT_PREFIXES:
        if name.startswith(prefix) and name[len(prefix) :] in flat:
            return flat[name[len(prefix) :]]
    return None


def _loader_scale(kind: str, params: dict[str, torch.Tensor], default_alpha: float | None) -> float:
    """The scale ComfyUI / LyCORIS apply to this module's delta (module docstring)."""
    rank = _loader_rank(kind, params)
    alpha = float(params["alpha"]) if "alpha" in params else default_alpha
    if alpha is None or rank is None:
        return 1.0
    return alpha / rank


def _sides(module: torch.nn.Module) -> tuple[int, int]:
    base = cast(Any, module).get_base_layer() if hasattr(module, "get_base_layer") else module
    if isinstance(base, torch.nn.Linear):
        return base.out_features, base.in_features
    if isinstance(base, torch.nn.Conv1d | torch.nn.Conv2d):
        return base.out_channels, base.in_channels
    raise LycorisError(f"a {type(base).__name__} takes no LoKr / LoHa (only Linear and convolutions)")


def _w1_shape(params: dict[str, torch.Tensor]) -> tuple[int, int]:
    if "lokr_w1" in params:
        return int(params["lokr_w1"].shape[0]), int(params["lokr_w1"].shape[1])
    return int(params["lokr_w1_a"].shape[0]), int(params["lokr_w1_b"].shape[1])


def _lokr_rank(params: dict[str, torch.Tensor]) -> int:
    """The peft ``r`` that gives this module's layout: the split factor's rank (a Tucker core's), else
    one large enough that peft keeps both factors whole."""
    if "lokr_t2" in params:
        return int(params["lokr_t2"].shape[0])
    split = _loader_rank("lokr", params)
    return split or max(max(t.shape[:2]) for k, t in params.items() if k.startswith("lokr_w"))


def _lokr_factor(
    modules: dict[str, dict[str, torch.Tensor]], sides: dict[str, tuple[int, int]], hint: int | None
) -> int:
    """The one ``decompose_factor`` whose factorisation gives every module's first factor's shape."""
    from peft.tuners.lokr.layer import factorization

    wanted = {name: _w1_shape(p) for name, p in modules.items()}
    candidates = [hint] if hint else []
    candidates += [-1, *sorted({s for shape in wanted.values() for s in shape})]
    for f in candidates:
        if all(
            (factorization(out, f)[0], factorization(inp, f)[0]) == wanted[name]
            for name, (out, inp) in sides.items()
        ):
            return f
    name = next(iter(wanted))
    raise LycorisError(
        f"its LoKr factors (e.g. {name}: first factor {wanted[name]}) follow no single factorisation "
        "of the layer sizes, which peft's LoKr layer needs"
    )


def load_config(
    kind: str,
    modules: dict[str, dict[str, torch.Tensor]],
    sides: dict[str, tuple[int, int]],
    metadata: dict[str, Any] | None = None,
) -> Any:
    """The peft config that rebuilds these modules' layouts, at scale 1 (``alpha = r`` per module)."""
    from peft import LoHaConfig, LoKrConfig

    if kind == "lokr":
        ranks = {name: _lokr_rank(p) for name, p in modules.items()}
    else:
        ranks = {name: int(p["hada_w1_b"].shape[0]) for name, p in modules.items()}
    # peft reads a pattern's key as a regex after an optional "<anything>." and a target list by
    # suffix: anchored, a name cannot also claim a deeper module of the same tail (Flux's top-level
    # proj_out and every single block's)
    pattern = {"^" + re.escape(name): r for name, r in ranks.items()}
    first = next(iter(ranks.values()))
    common: dict[str, Any] = {
        "r": first,
        "alpha": first,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": "|".join(re.escape(name) for name in sorted(modules)),  # peft: re.fullmatch
        "use_effective_conv2d": any(("lokr_t2" in p or "hada_t1" in p) for p in modules.values()),
    }
    if kind == "loha":
        return LoHaConfig(**common)
    hint = (metadata or {}).get("decompose_factor")
    return LoKrConfig(
        **common,
        decompose_both=any("lokr_w1_a" in p for p in modules.values()),
        decompose_factor=_lokr_factor(modules, sides, hint if isinstance(hint, int) else None),
    )


def _file_metadata(raw: dict[str, str] | None) -> dict[str, Any] | None:
    """The adapter config diffusers' ``save_lora_weights`` stores (keys behind a component prefix)."""
    text = (raw or {}).get("lora_adapter_metadata")
    if not text:
        return None
    try:
        meta = json.loads(text)
    except ValueError:
        return None
    return {k.split(".", 1)[1]: v for k, v in meta.items() if "." in k} or meta


def load_adapter(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    adapter_name: str,
    file_metadata: dict[str, str] | None = None,
) -> str:
    """Add the LyCORIS ``state`` (any naming in DOTTED_PREFIXES / FLAT_PREFIXES, ours or another
    trainer's) to ``model`` as the peft adapter ``adapter_name``; returns its kind. Raises
    ``LycorisError`` naming what does not fit, and leaves no adapter behind then."""
    from peft.utils import set_peft_model_state_dict

    kind = adapter_kind(state)
    if kind is None:
        raise LycorisError("it holds no LoKr or LoHa tensors")
    meta = _file_metadata(file_metadata)
    names, flat = _module_names(model)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for name, params in _by_module(state).items():
        target = _resolve(name, names, flat)
        if target is None:
            unknown.append(name)
        else:
            modules[target] = {k: v.float() for k, v in params.items()}
    if unknown:
        raise LycorisError(f"it names {len(unknown)} module(s) the model does not have, e.g. {unknown[:3]}")
    if any("dora_scale" in p for p in modules.values()):
        raise LycorisError("it holds DoRA scales (dora_scale), which this loader does not apply")
    sides = {name: _sides(model.get_submodule(name)) for name in modules}
    # A file diffusers wrote (its adapter config stored beside it) is scaled as peft scales it:
    # alpha / r for every module; other files as the LyCORIS loaders scale them.
    peft_scale = None
    if meta and isinstance(meta.get("alpha"), int | float) and isinstance(meta.get("r"), int) and meta["r"]:
        peft_scale = float(meta["alpha"]) / meta["r"]
    peft_state: dict[str, torch.Tensor] = {}
    for name, params in modules.items():
        scale = _loader_scale(kind, params, None) if peft_scale is None or "alpha" in params else peft_scale
        first = _first_factor(kind, params)
        for param, tensor in params.items():
            if param != "alpha":
                peft_state[f"{name}.{param}"] = tensor * scale if param == first else tensor
    config = load_config(kind, modules, sides, meta)
    _add(model, config, adapter_name)
    try:
        result = set_peft_model_state_dict(model, peft_state, adapter_name=adapter_name)
    except RuntimeError as exc:  # a tensor of another shape than the layout inferred
        _delete(model, adapter_name)
        raise LycorisError(f"its {kind} layout does not fit: {' '.join(str(exc).split())[:300]}") from None
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        _delete(model, adapter_name)
        raise LycorisError(f"tensors peft did not place: {unexpected[:3]}")
    factored_forward(model)
    return kind


def _add(model: torch.nn.Module, config: Any, name: str) -> None:
    """diffusers' ``add_adapter`` on a denoiser (it records the adapter for ``set_adapters``);
    peft's injection on a plain module."""
    if hasattr(model, "add_adapter"):
        cast(Any, model).add_adapter(config, adapter_name=name)
    else:
        from peft import inject_adapter_in_model

        inject_adapter_in_model(config, model, adapter_name=name)


def _delete(model: torch.nn.Module, name: str) -> None:
    if hasattr(model, "delete_adapters"):
        cast(Any, model).delete_adapters([name])
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.delete_adapter(name)
