"""Hardware prices and job estimates.

Replicate bills by the second of ``metrics.predict_time``. The prices below are Replicate's
public list prices (USD per hour, rounded); `advanced-trainer hardware` shows them next to
what the API lists. Step times are rough figures for this trainer on each card (1024 px,
batch 1, LoRA); they scale with pixels and batch size. Estimates are for planning and for
spend limits, not invoices: the ledger uses the real predict_time once a job ends.
"""

from __future__ import annotations

from dataclasses import dataclass

# sku -> (name, USD per hour, GPUs)
HARDWARE: dict[str, tuple[str, float, int]] = {
    "cpu": ("CPU", 0.36, 0),
    "gpu-t4": ("Nvidia T4 GPU", 0.81, 1),
    "gpu-l40s": ("Nvidia L40S GPU", 3.51, 1),
    "gpu-l40s-2x": ("2x Nvidia L40S GPU", 7.02, 2),
    "gpu-l40s-4x": ("4x Nvidia L40S GPU", 14.04, 4),
    "gpu-l40s-8x": ("8x Nvidia L40S GPU", 28.08, 8),
    "gpu-a100-large": ("Nvidia A100 (80GB) GPU", 5.04, 1),
    "gpu-a100-large-2x": ("2x Nvidia A100 (80GB) GPU", 10.08, 2),
    "gpu-a100-large-4x": ("4x Nvidia A100 (80GB) GPU", 20.16, 4),
    "gpu-a100-large-8x": ("8x Nvidia A100 (80GB) GPU", 40.32, 8),
    "gpu-h100": ("Nvidia H100 GPU", 5.49, 1),
    "gpu-h100-2x": ("2x Nvidia H100 GPU", 10.98, 2),
    "gpu-h100-4x": ("4x Nvidia H100 GPU", 21.96, 4),
    "gpu-h100-8x": ("8x Nvidia H100 GPU", 43.92, 8),
}
# seconds per optimizer step at 1024 px, batch 1, LoRA, on one card of the family
_STEP_S = {
    "flux": {"t4": 20.0, "l40s": 2.4, "a100": 1.6, "h100": 1.0, "cpu": 600.0},
    "sdxl": {"t4": 3.0, "l40s": 0.55, "a100": 0.4, "h100": 0.28, "cpu": 120.0},
}
FULL_FINETUNE_FACTOR = 1.6  # full fine-tunes: larger backward and optimizer
STARTUP_S = 180  # boot, weights, staging and caching, export (typical)
PER_IMAGE_CACHE_S = 0.3


class UnknownHardware(ValueError):
    pass


def price_per_second(sku: str) -> float:
    if sku not in HARDWARE:
        raise UnknownHardware(f"unknown hardware {sku!r}; choose from {', '.join(HARDWARE)}")
    return HARDWARE[sku][1] / 3600.0


@dataclass(frozen=True)
class Estimate:
    hardware: str
    seconds: float
    usd: float
    price_per_hour: float

    def describe(self) -> str:
        minutes = self.seconds / 60
        return f"~{minutes:.0f} min on {HARDWARE[self.hardware][0]} at ${self.price_per_hour:.2f}/h ≈ ${self.usd:.2f}"


def estimate(spec, sku: str, n_images: int = 20) -> Estimate:
    """Time and cost of a job for ``spec`` (a train.spec.TrainingSpec) on ``sku``."""
    price = price_per_second(sku)
    name, per_hour, gpus = HARDWARE[sku]
    card = next((k for k in ("t4", "l40s", "a100", "h100") if k in sku), "cpu")
    step = _STEP_S[spec.family][card]
    res = max(spec.resolutions)
    step *= (res / 1024) ** 2 * spec.batch_size * spec.gradient_accumulation_steps
    if spec.mode == "full":
        step *= FULL_FINETUNE_FACTOR
    step /= max(1, gpus) ** 0.9  # data parallel: near-linear on one machine
    seconds = STARTUP_S + n_images * len(spec.resolutions) * PER_IMAGE_CACHE_S + step * spec.steps
    return Estimate(sku, seconds, seconds * price, per_hour)
