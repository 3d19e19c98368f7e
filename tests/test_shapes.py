"""Real shapes without real weights: every registered model's full-size denoiser, built on the meta
device from the published configuration its family keeps (``configs.py``), against the registry.

The registry's parameter counts drive the memory plan, the card warnings and the estimates; the
LoRA counts drive the output-size estimate. Tiny configs cannot check them; the meta device can,
in seconds and no memory. Names depend on module names only, so the kohya/ComfyUI naming of the
full-size model's every LoRA key is checked here too.
"""

from __future__ import annotations

import pytest

from train.families import MODEL_IDS, model_info
from train.models.meta import default_lora_counts


@pytest.fixture(scope="module")
def counts():
    """Each distinct (denoiser architecture, LoRA maths, default targets) counted once: models that
    share them (the [klein] base models, the Qwen-Image edit models, Kontext) share the count."""
    import importlib
    import json

    from train.models import family_class

    done: dict[str, object] = {}
    out = {}
    for m in MODEL_IDS:
        info = model_info(m)
        config = importlib.import_module(f"train.models.{info.family}.configs").DENOISERS[m]
        cls = family_class(m)
        key = json.dumps(
            [config, cls.kohya_state_dict.__qualname__, info.target_presets[info.default_targets]],
            default=str,
        )
        if key not in done:
            done[key] = default_lora_counts(m)
        out[m] = done[key]
    return out


@pytest.mark.parametrize("model", MODEL_IDS)
def test_the_registry_s_figures_are_the_full_size_architecture_s(model, counts):
    info, c = model_info(model), counts[model]
    assert abs(c.denoiser / 1e9 - info.denoiser_params_b) <= 0.01 * info.denoiser_params_b, (
        f"{model}: the registry says {info.denoiser_params_b} B, the published architecture has "
        f"{c.denoiser / 1e9:.3f} B"
    )
    # every default LoRA target resolves (peft raises on none; here: a LoRA the size the estimate uses)
    assert c.lora > 0 and abs(c.lora / 1e6 - info.lora_params_m) <= 0.005 * info.lora_params_m, (model, c)
    if info.comfy_naming:  # every LoRA module of the full-size model has a kohya/ComfyUI name
        assert c.kohya > 0 and abs(c.kohya / 1e6 - info.kohya_params_m) <= 0.005 * info.kohya_params_m
        assert c.kohya_keys > 0  # the converters raise on a module they cannot name
    else:
        assert c.kohya == 0 and info.kohya_params_m == 0


def test_the_memory_table_plans_with_the_counted_lora(monkeypatch):
    """docs/memory.md's plans (card_plan) train the counted default LoRA, not a guessed share."""
    from train import memory

    seen = []
    real = memory.choose_memory_plan

    def spy(*args, **kw):
        seen.append(kw["trainable_params"])
        return real(*args, **kw)

    monkeypatch.setattr(memory, "choose_memory_plan", spy)
    memory.card_plan("flux-dev", 80)
    assert seen and set(seen) == {int(model_info("flux-dev").lora_params_m * 1e6)}
