"""Estimates fitted to the user's own finished jobs instead of the step-time table.

Every succeeded training in the job store has what a fit needs: the spec (family, steps,
resolutions, batch), the hardware and ``predict_time`` (what Replicate billed). When its outputs
were delivered, its ``config.json`` adds the trainer's own phase timings (``timings_s.train``:
the seconds spent in steps; ``steps_done``), which separate the per-step time from start-up
exactly. Jobs are grouped by (family, card, GPUs, largest resolution); per group:

- start-up: the median of ``predict_time - timings_s.train`` over jobs with timings; else the
  intercept of a least-squares line through (work, predict_time) when the group's step counts
  differ enough to tell it apart; else the table's start-up;
- seconds per step and work unit (``pricing.work_units``): the median of
  ``(predict_time - start-up) / (steps x work units)``, robust to the odd slow job;
- the expected error: the root-mean-square relative error of the fit on its own jobs, never
  below 5 % (15 % from a single job, whose spread is unknown).

A query with no job of its exact group falls back to the same family, card and GPUs at another
resolution (work units scale by pixels), then to another GPU count (through
``pricing.sync_factor``), each adding to the expected error; with none, the table is used and
the estimate says so.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train.spec import SpecError, TrainingSpec, parse_spec

from . import pricing
from .store import JobStore

__all__ = ["Sample", "Calibration", "sample_from_job", "calibrated_estimate"]

MIN_ERROR = 0.05
SINGLE_JOB_ERROR = 0.15
OTHER_RESOLUTION_ERROR = 0.10  # added when the fit comes from another resolution
OTHER_GPUS_ERROR = 0.15  # added when it comes from another GPU count
HISTORY_LIMIT = 1000


@dataclass(frozen=True)
class Sample:
    """One finished job, as the fit sees it."""

    family: str
    mode: str
    card: str
    gpus: int
    resolution: int
    work: float  # pricing.work_units of its spec
    steps: int
    predict_time: float
    train_s: float | None = None  # timings_s.train from its config.json, when delivered

    @property
    def key(self) -> tuple[str, str, int, int]:
        return (self.family, self.card, self.gpus, self.resolution)


def _config(local_dir: str | None) -> Mapping[str, Any]:
    if not local_dir:
        return {}
    path = Path(local_dir) / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def sample_from_job(rec: Mapping[str, Any]) -> Sample | None:
    """A succeeded job with a known SKU, a valid spec and a billed time; None otherwise. SKUs
    recorded under a misspelt name (``gpu-l40s-2x``) count as the SKU they meant."""
    predict_time = rec.get("predict_time")
    if rec.get("status") != "succeeded" or not predict_time or predict_time <= 0:
        return None
    sku = rec.get("hardware") or ""
    sku = sku if sku in pricing.SKUS else (pricing.suggest(sku) or "")
    if sku not in pricing.SKUS or not rec.get("spec_json"):
        return None
    try:
        spec: TrainingSpec = parse_spec(rec["spec_json"])
    except SpecError:
        return None
    hw = pricing.SKUS[sku]
    config = _config(rec.get("local_dir"))
    timings = config.get("timings_s")
    train_s = timings.get("train") if isinstance(timings, dict) else None
    train_s = train_s if isinstance(train_s, (int, float)) else None
    steps = config.get("steps_done") or rec.get("total") or spec.steps
    if not isinstance(steps, int) or steps <= 0:
        return None
    return Sample(
        spec.family,
        spec.mode,
        hw.card,
        max(1, hw.gpus),
        max(spec.resolutions),
        pricing.work_units(spec),
        steps,
        float(predict_time),
        float(train_s) if train_s and 0 < train_s < predict_time else None,
    )


def _startup(samples: list[Sample]) -> float:
    timed = [s.predict_time - s.train_s for s in samples if s.train_s is not None]
    if timed:
        return statistics.median(timed)
    xs = [s.work * s.steps for s in samples]
    ts = [s.predict_time for s in samples]
    if len(samples) >= 2 and max(xs) >= 1.5 * min(xs):
        slope, intercept = statistics.linear_regression(xs, ts)
        if slope > 0 and 0 <= intercept < min(ts):
            return intercept
    return float(pricing.STARTUP_S)


def _fit(samples: list[Sample], basis: str) -> pricing.StepFit:
    startup = _startup(samples)
    units = [
        (s.train_s if s.train_s is not None else max(s.predict_time - startup, 1e-9)) / (s.steps * s.work)
        for s in samples
    ]
    unit = statistics.median(units)
    residuals = [(startup + unit * s.work * s.steps - s.predict_time) / s.predict_time for s in samples]
    rms = math.sqrt(statistics.fmean(r * r for r in residuals))
    error = SINGLE_JOB_ERROR if len(samples) == 1 else max(MIN_ERROR, rms)
    return pricing.StepFit(unit, startup, len(samples), error, basis)


class Calibration:
    """Fits over a set of finished jobs; ``fit_for`` answers one estimate's question."""

    def __init__(self, samples: Iterable[Sample]):
        self.samples = list(samples)

    @classmethod
    def from_store(cls, store: JobStore, limit: int = HISTORY_LIMIT) -> Calibration:
        rows = store.list(limit=limit, status="succeeded")
        return cls(s for s in map(sample_from_job, rows) if s is not None)

    def fit_for(self, spec: TrainingSpec, sku: str) -> pricing.StepFit | None:
        hw = pricing.check_sku(sku)
        gpus, res = max(1, hw.gpus), max(spec.resolutions)
        same = [s for s in self.samples if s.family == spec.family and s.card == hw.card]
        exact = [s for s in same if s.gpus == gpus and s.resolution == res]
        if exact:
            return _fit(exact, f"{spec.family} on {sku} at {res} px")
        other_res = [s for s in same if s.gpus == gpus]
        if other_res:
            fit = _fit(other_res, f"{spec.family} on {sku} at other resolutions")
            return _widen(fit, OTHER_RESOLUTION_ERROR)
        if not same:
            return None
        # another GPU count: bring each job to this one through the sync term of its own mode
        moved = [_moved(s, gpus) for s in same]
        fit = _fit(moved, f"{spec.family} on {hw.card} with other GPU counts")
        return _widen(
            fit, OTHER_GPUS_ERROR + (0 if any(s.resolution == res for s in same) else OTHER_RESOLUTION_ERROR)
        )


def _widen(fit: pricing.StepFit, extra: float) -> pricing.StepFit:
    return pricing.StepFit(fit.unit_step_s, fit.startup_s, fit.jobs, fit.rel_error + extra, fit.basis)


def _moved(s: Sample, gpus: int) -> Sample:
    ratio = pricing.sync_factor(s.mode, s.card, gpus) / pricing.sync_factor(s.mode, s.card, s.gpus)
    startup_guess = s.predict_time - s.train_s if s.train_s is not None else None
    train_s = s.train_s * ratio if s.train_s is not None else None
    predict = (
        (startup_guess + train_s)
        if startup_guess is not None and train_s is not None
        else s.predict_time * ratio
    )
    return Sample(s.family, s.mode, s.card, gpus, s.resolution, s.work, s.steps, predict, train_s)


def calibrated_estimate(
    spec: TrainingSpec,
    sku: str,
    n_images: int = 20,
    calibration: Calibration | None = None,
    steps: int | None = None,
) -> pricing.Estimate:
    """``pricing.estimate`` with the fit of the user's own jobs where there is one."""
    fit = calibration.fit_for(spec, sku) if calibration is not None else None
    return pricing.estimate(spec, sku, n_images, fit=fit, steps=steps)
