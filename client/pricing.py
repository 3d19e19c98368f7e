"""Hardware as Replicate sells it, and what a job will cost on it.

SKUs and prices are Replicate's, as its pricing page lists them (USD per second; Replicate bills
the seconds of ``metrics.predict_time``). Note the two spellings of multi-GPU machines: the L40S
ones put the count first (``gpu-2x-l40s``), the A100 and H100 ones put it last
(``gpu-h100-2x``). A name Replicate does not sell is refused, with the right one suggested.

The time model, for data-parallel training as this trainer does it (``batch_size`` is per GPU,
``steps`` stay steps, so N GPUs see N times the images per step):

    seconds = start-up + steps x step_s(N GPUs)
    step_s(N) = step_s(1) x (1 + sync x log2 N)

``step_s(1)`` is a single-GPU table figure (1024 px, batch 1, LoRA), scaled by pixels, batch
size, gradient accumulation, full fine-tuning and output preservation. The second term is the gradient all-reduce
once per optimizer step: a ring all-reduce grows about with log2 N in latency, and its share of
a step is small for LoRA (megabytes of gradients) and larger for full fine-tunes (gigabytes),
larger again over PCIe (L40S machines have no NVLink). Running the same images in fewer steps
(steps / N) is a choice the caller makes explicitly (``scale_steps``), never applied here.

``client.calibration`` replaces the table with figures fitted to the user's own finished jobs
(a ``StepFit``); estimates say which they used and how far off they are expected to be.
Estimates are for planning and for spend limits, not invoices: the ledger uses the real
``predict_time`` once a job ends.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from train.families import model_info
from train.memory import card_plan
from train.models.flux import FLUX_DEV


@dataclass(frozen=True)
class Sku:
    sku: str
    name: str
    usd_per_s: float
    card: str  # the GPU model: "l40s", "a100", "h100", ... ("cpu" for none)
    gpus: int

    @property
    def usd_per_hour(self) -> float:
        return self.usd_per_s * 3600


SKUS: dict[str, Sku] = {
    s.sku: s
    for s in (
        Sku("cpu", "CPU", 0.0001, "cpu", 0),
        Sku("gpu-t4", "Nvidia T4 GPU", 0.000225, "t4", 1),
        Sku("gpu-a40-small", "Nvidia A40 GPU", 0.000575, "a40", 1),
        Sku("gpu-a40-large", "Nvidia A40 (Large) GPU", 0.000725, "a40", 1),
        Sku("gpu-l40s", "Nvidia L40S GPU", 0.000975, "l40s", 1),
        Sku("gpu-2x-l40s", "2x Nvidia L40S GPU", 0.00195, "l40s", 2),
        Sku("gpu-4x-l40s", "4x Nvidia L40S GPU", 0.0039, "l40s", 4),
        Sku("gpu-8x-l40s", "8x Nvidia L40S GPU", 0.0078, "l40s", 8),
        Sku("gpu-a100-large", "Nvidia A100 (80GB) GPU", 0.0014, "a100", 1),
        Sku("gpu-a100-large-2x", "2x Nvidia A100 (80GB) GPU", 0.0028, "a100", 2),
        Sku("gpu-a100-large-4x", "4x Nvidia A100 (80GB) GPU", 0.0056, "a100", 4),
        Sku("gpu-a100-large-8x", "8x Nvidia A100 (80GB) GPU", 0.0112, "a100", 8),
        Sku("gpu-h100", "Nvidia H100 GPU", 0.001525, "h100", 1),
        Sku("gpu-h100-2x", "2x Nvidia H100 GPU", 0.00305, "h100", 2),
        Sku("gpu-h100-4x", "4x Nvidia H100 GPU", 0.0061, "h100", 4),
        Sku("gpu-h100-8x", "8x Nvidia H100 GPU", 0.0122, "h100", 8),
    )
}
# sku -> (name, USD per hour, GPUs): the view the price listings show
HARDWARE: dict[str, tuple[str, float, int]] = {k: (s.name, s.usd_per_hour, s.gpus) for k, s in SKUS.items()}
# the machines the trainer is built for (L40S / A100 / H100, 1-8 GPUs): what `--cheapest` ranks
TRAINING_SKUS: tuple[str, ...] = tuple(k for k, s in SKUS.items() if s.card in ("l40s", "a100", "h100"))

# Seconds per optimizer step on ONE card at 1024 px, batch 1, LoRA: each model's ``step_s`` in
# the family registry (train/families.py). A card a model has no figure for is scaled from its
# H100 figure by Flux.1-dev's ratio between the two cards.
FULL_FINETUNE_FACTOR = 1.6  # full fine-tunes: larger backward and optimizer
# output preservation: a step is the training pass (forward F + backward ~2F) plus a forward without
# the LoRA and a second pass with it (F + 3F): ~7F / 3F. Measured 2.26x on the CPU (tests/test_preservation.py)
PRESERVATION_FACTOR = 2.3
# LoKr / LoHa (lora.type): their linears multiply through the factors (train/lycoris.py), 0.8-1.3x a
# LoRA's layer time at full-size Flux shapes on the CPU (python -m bench.adapters); counted as 1.2x a step
ADAPTER_FACTOR = {"lora": 1.0, "lokr": 1.2, "loha": 1.2}
# share of a step spent in the gradient all-reduce, per doubling of GPUs
SYNC_PER_DOUBLING = {
    ("lora", "nvlink"): 0.01,
    ("lora", "pcie"): 0.03,
    ("full", "nvlink"): 0.05,
    ("full", "pcie"): 0.15,
}
PCIE_CARDS = ("l40s", "a40", "t4")
STARTUP_S = 180  # boot, weights, staging, export (typical)
PER_IMAGE_CACHE_S = 0.3  # latents + text embeddings, per image and resolution
# autocaption (a guess until calibrated, not measured on a GPU): loading the 7B captioner, and each
# image's caption (~60 tokens, batches of 8; Qwen2.5-VL-7B in bf16 on an H100-class card)
CAPTIONER_LOAD_S = 60.0
CAPTION_S_PER_IMAGE = 0.6
TABLE_ERROR = 0.4  # how far off a table estimate may be (the table is a guess until calibrated)


class UnknownHardware(ValueError):
    pass


def suggest(sku: str) -> str | None:
    """The SKU Replicate sells that ``sku`` most likely means: the GPU count moved to where that
    card's SKUs put it (``gpu-l40s-2x`` -> ``gpu-2x-l40s``), else the closest spelling."""
    for pattern, swap in ((r"^gpu-(\d+)x-(.+)$", "gpu-{b}-{a}x"), (r"^gpu-(.+?)-(\d+)x$", "gpu-{b}x-{a}")):
        m = re.match(pattern, sku)
        if m and swap.format(a=m.group(1), b=m.group(2)) in SKUS:
            return swap.format(a=m.group(1), b=m.group(2))
    close = difflib.get_close_matches(sku, list(SKUS), n=1, cutoff=0.75)
    return close[0] if close else None


def check_sku(sku: str, listed: Iterable[str] | None = None) -> Sku:
    """The SKU, or UnknownHardware naming the right one and the valid ones. With ``listed`` (the
    SKUs ``GET /v1/hardware`` answered), a SKU the API no longer sells is refused too."""
    known = SKUS.get(sku)
    listed = list(listed) if listed is not None else None
    if known is not None and (not listed or sku in listed):
        return known
    hint = suggest(sku) if known is None else None
    valid = [s for s in SKUS if not listed or s in listed]
    raise UnknownHardware(
        f"unknown hardware {sku!r}"
        + (f" (did you mean {hint}?)" if hint else "")
        + ("" if known is None else " (not listed by Replicate's API now)")
        + f"; choose from {', '.join(valid)}"
    )


def price_per_second(sku: str) -> float:
    return check_sku(sku).usd_per_s


def single_gpu_sku(sku: str) -> str:
    """The one-GPU SKU of the same card (a destination model renders on one GPU)."""
    card = check_sku(sku)
    return next(k for k, s in SKUS.items() if s.card == card.card and s.gpus <= 1)


def single_gpu_step_s(spec, card: str) -> tuple[float, str | None]:
    """Table seconds per step of ``spec.model`` on one ``card`` at 1024 px, batch 1, LoRA, and a
    note when the registry has no figure for that card (then it is scaled from the H100's)."""
    table = model_info(spec.model).step_s
    if card in table:
        return table[card], None
    ref = FLUX_DEV.step_s
    if "h100" not in table or card not in ref:
        # no figures to scale from: Flux.1-dev's, so a spend limit errs on the safe side
        return ref.get(
            card, max(ref.values())
        ), f"no step-time figures for {spec.model} on {card}; used FLUX.1-dev's"
    return table["h100"] * ref[card] / ref["h100"], f"{spec.model} on {card}: scaled from its H100 figure"


def work_units(spec) -> float:
    """A step's work relative to the table's (1024 px, batch 1, one micro-batch, LoRA; a video
    model's default frames per sample)."""
    units = (max(spec.resolutions) / 1024) ** 2 * spec.batch_size * spec.gradient_accumulation_steps
    info = model_info(spec.model)
    if info.video and spec.video.frames:  # tokens scale with the latent frames of the longest sample
        units *= info.latent_frames(max(spec.video.frames)) / info.latent_frames()
    if spec.preservation.on:
        units *= PRESERVATION_FACTOR
    if spec.mode == "full":
        return units * FULL_FINETUNE_FACTOR
    return units * ADAPTER_FACTOR[spec.lora.type]


def sync_factor(mode: str, card: str, gpus: int) -> float:
    """Step time on ``gpus`` GPUs over step time on one (the all-reduce term)."""
    if gpus <= 1:
        return 1.0
    link = "pcie" if card in PCIE_CARDS else "nvlink"
    return 1.0 + SYNC_PER_DOUBLING[(mode, link)] * math.log2(gpus)


@dataclass(frozen=True)
class StepFit:
    """Figures fitted to finished jobs (``client.calibration``), replacing the table's."""

    unit_step_s: float  # seconds per step per work unit, on this many GPUs (sync included)
    startup_s: float  # everything that is not steps: boot, load, cache, export
    jobs: int
    rel_error: float  # expected relative error of an estimate made with it
    basis: str  # which jobs: "flux on gpu-h100-8x at 1024 px"


@dataclass(frozen=True)
class Estimate:
    hardware: str
    seconds: float
    usd: float
    price_per_hour: float
    steps: int = 0
    gpus: int = 1
    step_s: float = 0.0
    startup_s: float = 0.0
    images_per_step: int = 1
    source: str = "table"  # or "calibrated from N jobs"
    expected_error: float = TABLE_ERROR
    notes: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        minutes = self.seconds / 60
        return (
            f"~{minutes:.0f} min on {SKUS[self.hardware].name} at ${self.price_per_hour:.2f}/h ≈ "
            f"${self.usd:.2f} ({self.steps} steps × {self.step_s:.2f} s, {self.images_per_step} "
            f"images/step; {self.source}, ±{self.expected_error:.0%})"
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(seconds=round(self.seconds), usd=round(self.usd, 4), notes=list(self.notes))
        out.update(step_s=round(self.step_s, 4), startup_s=round(self.startup_s, 1))
        return out


CARD_GIB = {"t4": 16, "a40": 48, "l40s": 48, "a100": 80, "h100": 80}  # memory of one card


def memory_notes(spec, hw: Sku) -> list[str]:
    """What the memory policy's plan for this model on this card asks of the spec (docs/memory.md)."""
    if hw.card not in CARD_GIB:
        return []
    frames = max(spec.video.frames) if spec.video.frames else None
    plan = str(
        card_plan(spec.model, CARD_GIB[hw.card], max(spec.resolutions), spec.batch_size, frames)["plan"]
    )
    if plan.startswith("does not fit"):
        return [f"{spec.model} on {hw.name}: {plan}; choose a larger card"]
    if plan.startswith("fp8_base") and spec.speed.fp8_base != "on":
        return [f"{spec.model} on {hw.name} fits only with speed.fp8_base: on (the frozen base in fp8)"]
    return []


def caption_seconds(spec, n_images: int) -> float:
    """The time autocaption adds to a job (0 when off): loading the captioner, then each image."""
    if spec.autocaption.mode == "off":
        return 0.0
    return CAPTIONER_LOAD_S + n_images * CAPTION_S_PER_IMAGE


def scaled_steps(spec, gpus: int) -> int:
    """The "same images, fewer steps" step count on ``gpus`` GPUs: steps / N, rounded up."""
    return max(1, math.ceil(spec.steps / max(1, gpus)))


def estimate(
    spec, sku: str, n_images: int = 20, fit: StepFit | None = None, steps: int | None = None
) -> Estimate:
    """Time and cost of a job for ``spec`` (a train.spec.TrainingSpec) on ``sku``; ``fit`` (from
    ``client.calibration``) replaces the table; ``steps`` overrides the spec's step count."""
    hw = check_sku(sku)
    gpus = max(1, hw.gpus)
    steps = spec.steps if steps is None else steps
    notes: list[str] = []
    if fit is not None:
        step = fit.unit_step_s * work_units(spec)
        startup = fit.startup_s
        source, error = f"calibrated from {fit.jobs} job{'s' * (fit.jobs != 1)}", fit.rel_error
        notes.append(f"fitted to {fit.basis}")
    else:
        one, note = single_gpu_step_s(spec, hw.card)
        notes += [note] if note else []
        step = one * work_units(spec) * sync_factor(spec.mode, hw.card, gpus)
        startup = STARTUP_S + n_images * len(spec.resolutions) * PER_IMAGE_CACHE_S
        source, error = "table", TABLE_ERROR
        notes.append(
            f"start-up ~{startup / 60:.0f} min is a guess (boot, base weights, caching, export); finished "
            f"jobs calibrate it (their config.json timings)"
        )
    captions = caption_seconds(spec, n_images)
    if captions:
        startup += captions
        notes.append(
            f"autocaption ~{captions / 60:.1f} min counted ({spec.autocaption.mode}: every image counted; a guess)"
        )
    notes += memory_notes(spec, hw)
    seconds = startup + step * steps
    return Estimate(
        sku,
        seconds,
        seconds * hw.usd_per_s,
        hw.usd_per_hour,
        steps=steps,
        gpus=gpus,
        step_s=step,
        startup_s=startup,
        images_per_step=spec.batch_size * spec.gradient_accumulation_steps * gpus,
        source=source,
        expected_error=error,
        notes=tuple(notes),
    )
