"""LoRA in kohya / ComfyUI naming, converted from the peft state dict we train.

Every module is written as ``<name>.lora_down.weight`` (r x in), ``<name>.lora_up.weight``
(out x r) and ``<name>.alpha``. The ``alpha / rank`` scale is baked into ``lora_up`` and
``alpha`` is set to the rank, so every loader (sd-scripts, ComfyUI, Forge, diffusers) applies
exactly the trained update whatever it does with alphas.

- SDXL: ``lora_unet_`` + the diffusers module path with ``_`` for ``.``; ComfyUI and
  diffusers both map these names.
- Flux: the sd-scripts names of the original (BFL) model: ``lora_unet_double_blocks_{i}_...``
  and ``lora_unet_single_blocks_{i}_...``. BFL fuses projections diffusers keeps apart
  (q/k/v -> ``qkv``; q/k/v/mlp -> ``linear1``): the fused LoRA has ``down`` = the parts'
  downs stacked and ``up`` = their ups on the block diagonal, which is the same update,
  exactly. Parts without a LoRA get zero blocks so every fused module keeps the
  "rank = parts x r, block-sparse" shape sd-scripts writes.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

_DOUBLE = {
    "attn.to_out.0": "img_attn_proj",
    "ff.net.0.proj": "img_mlp_0",
    "ff.net.2": "img_mlp_2",
    "norm1.linear": "img_mod_lin",
    "attn.to_add_out": "txt_attn_proj",
    "ff_context.net.0.proj": "txt_mlp_0",
    "ff_context.net.2": "txt_mlp_2",
    "norm1_context.linear": "txt_mod_lin",
}
_DOUBLE_FUSED = {
    "img_attn_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
}
_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation_lin"}
_SINGLE_FUSED = {"linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]}
_GLOBAL = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in_out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in_in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in_out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
    "proj_out": "final_layer_linear",
    "norm_out.linear": "final_layer_adaLN_modulation_1",
}


def _pairs(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module path -> (A, B) from peft keys ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, a in state_dict.items():
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            out[module] = (a, state_dict[module + ".lora_B.weight"])
    unknown = [k for k in state_dict if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    assert not unknown, f"unexpected LoRA keys: {unknown[:5]}"
    return out


def diffusion_model_lora(
    state_dict: dict[str, torch.Tensor], alpha: float, name: Callable[[str], str] = str
) -> dict[str, torch.Tensor]:
    """ComfyUI's ``diffusion_model.<module>.lora_A/B.weight`` naming (``name`` maps a diffusers module
    path to the original checkpoint's), with alpha / rank folded into ``lora_B``: diffusers' readers
    of this naming (LTX-2, HiDream, Krea 2) take no ``.alpha`` keys."""
    out: dict[str, torch.Tensor] = {}
    for module, (a, b) in _pairs(state_dict).items():
        key = f"diffusion_model.{name(module)}"
        out[f"{key}.lora_A.weight"] = a.contiguous()
        out[f"{key}.lora_B.weight"] = (b * (alpha / a.shape[0])).contiguous()
    return out


def _entry(name: str, down: torch.Tensor, up: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    return {
        f"{name}.lora_down.weight": down.contiguous(),
        f"{name}.lora_up.weight": (up * scale).contiguous(),
        f"{name}.alpha": torch.tensor(float(down.shape[0])),
    }


def sdxl_to_kohya(state_dict: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for module, (a, b) in _pairs(state_dict).items():
        out.update(_entry("lora_unet_" + module.replace(".", "_"), a, b, alpha / a.shape[0]))
    return out


def fuse(
    parts: list[tuple[torch.Tensor, torch.Tensor] | None], out_dims: list[int], in_dim: int, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA for a fused projection from its parts' LoRAs (None = part without LoRA)."""
    n = len(parts)
    ref = next(p for p in parts if p is not None)[0]
    down = torch.zeros(n * rank, in_dim, dtype=ref.dtype)
    up = torch.zeros(sum(out_dims), n * rank, dtype=ref.dtype)
    row = 0
    for j, (part, dim) in enumerate(zip(parts, out_dims, strict=True)):
        if part is not None:
            a, b = part
            assert a.shape == (rank, in_dim) and b.shape == (dim, rank), (a.shape, b.shape, rank, dim)
            down[j * rank : (j + 1) * rank] = a
            up[row : row + dim, j * rank : (j + 1) * rank] = b
        row += dim
    return down, up


def flux_to_kohya(
    state_dict: dict[str, torch.Tensor], alpha: float, transformer: torch.nn.Module
) -> dict[str, torch.Tensor]:
    pairs = _pairs(state_dict)
    modules = dict(transformer.named_modules())
    out: dict[str, torch.Tensor] = {}
    done: set[str] = set()

    def out_features(path: str) -> int:
        layer = modules[path]
        for candidate in (layer, getattr(layer, "base_layer", None)):  # peft wraps the targeted layers
            features = getattr(candidate, "out_features", None)
            if isinstance(features, int):
                return features
        raise AssertionError(f"{path}: no out_features ({type(layer).__name__})")

    def emit_fused(prefix: str, name: str, parts: list[str]) -> None:
        paths = [f"{prefix}.{p}" for p in parts]
        if not any(p in pairs for p in paths):
            return
        rank = next(pairs[p][0].shape[0] for p in paths if p in pairs)
        in_dim = next(pairs[p][0].shape[1] for p in paths if p in pairs)
        down, up = fuse([pairs.get(p) for p in paths], [out_features(p) for p in paths], in_dim, rank)
        out.update(_entry(name, down, up, alpha / rank))
        done.update(paths)

    n_double = len(getattr(transformer, "transformer_blocks", []))
    n_single = len(getattr(transformer, "single_transformer_blocks", []))
    for i in range(n_double):
        prefix = f"transformer_blocks.{i}"
        for name, parts in _DOUBLE_FUSED.items():
            emit_fused(prefix, f"lora_unet_double_blocks_{i}_{name}", parts)
        for sub, name in _DOUBLE.items():
            if f"{prefix}.{sub}" in pairs:
                a, b = pairs[f"{prefix}.{sub}"]
                out.update(_entry(f"lora_unet_double_blocks_{i}_{name}", a, b, alpha / a.shape[0]))
                done.add(f"{prefix}.{sub}")
    for i in range(n_single):
        prefix = f"single_transformer_blocks.{i}"
        for name, parts in _SINGLE_FUSED.items():
            emit_fused(prefix, f"lora_unet_single_blocks_{i}_{name}", parts)
        for sub, name in _SINGLE.items():
            if f"{prefix}.{sub}" in pairs:
                a, b = pairs[f"{prefix}.{sub}"]
                out.update(_entry(f"lora_unet_single_blocks_{i}_{name}", a, b, alpha / a.shape[0]))
                done.add(f"{prefix}.{sub}")
    for path, name in _GLOBAL.items():
        if path in pairs:
            a, b = pairs[path]
            if path == "norm_out.linear":  # diffusers orders this output (scale, shift); BFL (shift, scale)
                b = torch.cat(b.chunk(2, dim=0)[::-1], dim=0)
            out.update(_entry(f"lora_unet_{name}", a, b, alpha / a.shape[0]))
            done.add(path)
    missing = sorted(set(pairs) - done)
    if missing:
        raise ValueError(f"no kohya name for LoRA modules {missing[:5]}; export the diffusers format instead")
    return out


def kohya_delta(sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The weight update ``up @ down * alpha / rank`` one kohya module applies (for checks)."""
    down, up = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"]
    alpha = float(sd.get(f"{name}.alpha", torch.tensor(float(down.shape[0]))))
    return (up.float() @ down.float()) * alpha / down.shape[0]


KOHYA_NAME = re.compile(r"^lora_(unet|te\d?)_[A-Za-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
