"""Estimates as the CLI and the local server show them: per SKU, with the profile's trainer model,
where the figures came from (the table or the user's own jobs), the "same images, fewer steps"
alternative on multi-GPU machines, and the cheapest hardware within a deadline."""

from __future__ import annotations

import re
from typing import Any

from train.families import model_info
from train.spec import EXPORT_DTYPES, TrainingSpec

from . import pricing
from .calibration import Calibration, calibrated_estimate
from .config import Settings
from .errors import UserError
from .profiles import profile_for

__all__ = [
    "DEFAULT_SKUS",
    "checked_hardware",
    "hardware_estimate",
    "estimate_row",
    "cheapest",
    "parse_duration",
]

DEFAULT_SKUS = ("gpu-l40s", "gpu-a100-large", "gpu-h100")
SCALE_FLAG = "--scale-steps-to-gpus"


def checked_hardware(hardware: str, from_settings: bool = False) -> str:
    """``hardware`` when Replicate sells it; else a UserError naming the right SKU (and, for a
    misspelt one kept in settings.json, how to fix it there)."""
    try:
        return pricing.check_sku(hardware).sku
    except pricing.UnknownHardware as exc:
        hint = pricing.suggest(hardware) or "<sku>"
        where = f" (from settings.json; fix it with `advanced-trainer config set hardware {hint}`)"
        raise UserError(f"{exc}{where if from_settings else ''}") from None


MB = 2**20


def output_sizes(spec: TrainingSpec, lora_params: int | None = None) -> dict[str, float | None]:
    """Sizes of what the job delivers (MiB): the trained weights (the chosen step's LoRA in
    ``export.dtype``, and its kohya/ComfyUI copy where the family has one), every other kept
    validation step's diffusers file (``steps/step-N/``), a full fine-tune's denoiser (published to
    the job's Hub repo or bucket, not in output.zip), and the final resumable checkpoint when
    ``resumable`` (the trainable weights in fp32 and their two AdamW moments: about 3x a LoRA in
    fp32). ``lora_params``: the LoRA's parameter count when known (a run's file); by default the
    registry's count for the model's default targets (counted on the full-size architecture),
    scaled by rank; other targets are estimated as if they were the default ones."""
    info = model_info(spec.model)
    published = None
    if spec.mode == "full":
        params = info.denoiser_params_b * 1e9
        # the fine-tuned denoiser in bf16 goes to the publish target; output.zip carries a pointer
        weights, kept, published = 0.0, 0.0, params * 2
    else:
        # the registry's counts are the full-size default LoRA's at rank 16 (linear in the rank)
        params = lora_params or info.lora_params_m * 1e6 * spec.lora.rank / 16
        one = params * EXPORT_DTYPES[spec.export.dtype]
        kohya = one * info.kohya_params_m / info.lora_params_m if spec.export.writes_kohya(spec.model) else 0
        weights = one + kohya  # the diffusers file (+ its kohya/ComfyUI copy)
        interval = spec.validation.interval
        kept_steps = set(range(interval, spec.steps + 1, interval)) if interval else set()
        kept = one * (len(kept_steps | {spec.steps}) - 1)  # each validation step's but the chosen one
    checkpoint = params * 12 if spec.resumable else None  # fp32 weights + AdamW's two moments
    return {
        "weights_mb": round(weights / MB, 1),
        "kept_steps_mb": round(kept / MB, 1),
        "published_model_mb": None if published is None else round(published / MB, 1),
        "resumable_checkpoint_mb": None if checkpoint is None else round(checkpoint / MB, 1),
    }


def hardware_estimate(
    spec: TrainingSpec,
    hardware: str,
    n_images: int,
    calibration: Calibration | None,
    steps: int | None = None,
) -> pricing.Estimate:
    """The estimate on ``hardware``, calibrated from the job store when it has such jobs."""
    return calibrated_estimate(spec, checked_hardware(hardware), n_images, calibration, steps)


def estimate_row(
    spec: TrainingSpec,
    sku: str,
    n_images: int,
    calibration: Calibration | None,
    settings: Settings,
    scale_steps: bool = False,
) -> dict[str, Any]:
    """One SKU's estimate as a plain dict. On several GPUs the steps stay the spec's unless
    ``scale_steps``; the steps / N alternative is shown next to it either way."""
    gpus = max(1, pricing.check_sku(checked_hardware(sku)).gpus)
    fewer = pricing.scaled_steps(spec, gpus)
    est = hardware_estimate(spec, sku, n_images, calibration, fewer if scale_steps else None)
    row = est.to_dict()
    row.update(
        description=est.describe(),
        **output_sizes(spec),
        trainer_model=profile_for(settings, sku).model,
        steps_scaled_to_gpus=scale_steps and gpus > 1,
        same_images_fewer_steps=None,
    )
    if gpus > 1 and not scale_steps:
        alt = hardware_estimate(spec, sku, n_images, calibration, fewer)
        row["same_images_fewer_steps"] = {
            "flag": SCALE_FLAG,
            "steps": alt.steps,
            "seconds": round(alt.seconds),
            "usd": round(alt.usd, 4),
        }
    return row


def cheapest(
    spec: TrainingSpec,
    n_images: int,
    calibration: Calibration | None,
    settings: Settings,
    deadline_s: float | None = None,
    scale_steps: bool = False,
) -> list[dict[str, Any]]:
    """Every training SKU ranked: those done within ``deadline_s`` first, cheapest first; then the
    rest, fastest first. Each row says ``within_deadline``."""
    rows = [
        estimate_row(spec, sku, n_images, calibration, settings, scale_steps) for sku in pricing.TRAINING_SKUS
    ]
    for row in rows:
        row["within_deadline"] = deadline_s is None or row["seconds"] <= deadline_s
    rows.sort(key=lambda r: (not r["within_deadline"], r["usd"] if r["within_deadline"] else r["seconds"]))
    return rows


_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


def parse_duration(name: str, text: str) -> float:
    """Seconds in ``30m``, ``1h30m``, ``90s``, ``2h`` or a bare number of minutes; a UserError
    naming ``name`` otherwise."""
    value = text.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", value):
        return float(value) * 60
    m = _DURATION.match(value)
    if not value or m is None or not any(m.groups()):
        raise UserError(f"{name}: expected a duration such as 30m, 1h30m or 90s, got {text!r}")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in m.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise UserError(f"{name}: must be longer than zero, got {text!r}")
    return total
