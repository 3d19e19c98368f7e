"""Real shapes without real weights: every registered model's full-size denoiser on the meta device.

Tiny pipelines hide sizes. A module built on the meta device has every parameter's shape and
no memory, so the figures the registry states (denoiser parameters, the default LoRA's size and
its kohya/ComfyUI copy's) are counted here from the published configurations each family keeps in
``configs.py`` (``DENOISER_CLASS``, ``DENOISERS``); tests/test_shapes.py holds the registry to
them, and ``python -m train.models.meta`` prints them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from ..families import MODEL_IDS, model_info
from ..spec import parse_spec


def full_size_denoiser(model: str) -> torch.nn.Module:
    """``model``'s published denoiser architecture on the meta device (no memory, no weights)."""
    import diffusers

    configs = importlib.import_module(f"{__package__}.{model_info(model).family}.configs")
    cls = getattr(diffusers, configs.DENOISER_CLASS)
    with torch.device("meta"):
        return cls(**configs.DENOISERS[model])


@dataclass(frozen=True)
class Counts:
    denoiser: int  # parameters of the full-size denoiser
    lora: int  # the default LoRA's (rank 16, the model's default targets): the diffusers file
    kohya: int  # its kohya/ComfyUI copy's (0 where the family has no such convention)
    lora_keys: int  # tensors in the diffusers file
    kohya_keys: int


def default_lora_counts(model: str, rank: int = 16) -> Counts:
    """The full-size counts for ``model``'s default LoRA at ``rank``, with the trainer's own LoRA set-up
    (``make_trainable``) and kohya naming (``Family.kohya_state_dict``) run on the meta device."""
    from peft.utils import get_peft_model_state_dict

    from ..loop import make_trainable
    from . import family_class

    spec = parse_spec({"model": model, "lora": {"rank": rank}})
    denoiser = full_size_denoiser(model)
    n_denoiser = sum(p.numel() for p in denoiser.parameters())
    make_trainable(spec, denoiser)
    lora = get_peft_model_state_dict(denoiser)
    family = family_class(model)(spec, Path("unused"))
    family.pipe = SimpleNamespace(**{family.denoiser_name: denoiser})  # what kohya naming reads
    alpha = spec.lora.alpha
    assert alpha is not None
    with torch.device("meta"):
        kohya = family.kohya_state_dict(lora, alpha) or {}
    kohya_weights = {k: v for k, v in kohya.items() if not k.endswith(".alpha")}
    return Counts(
        denoiser=n_denoiser,
        lora=sum(v.numel() for v in lora.values()),
        kohya=sum(v.numel() for v in kohya_weights.values()),
        lora_keys=len(lora),
        kohya_keys=len(kohya),
    )


def main() -> None:
    print("| model | denoiser (B) | default LoRA, rank 16 (M) | its kohya copy (M) |")
    print("|---|---|---|---|")
    for model in MODEL_IDS:
        c = default_lora_counts(model)
        print(f"| {model} | {c.denoiser / 1e9:.3f} | {c.lora / 1e6:.2f} | {c.kohya / 1e6:.2f} |")


if __name__ == "__main__":
    main()
