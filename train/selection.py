"""Which step to deliver: the held-out split, the scores of each validation step, and the rule.

At every validation step the loop keeps that step's LoRA (``steps/step-N/``) and scores it:

- ``val_loss``: the training loss on held-out images (``validation.holdout``), each evaluated at
  ``HOLDOUT_DRAWS`` fixed noise/timestep draws from its own seeded generator, so every step is
  measured on exactly the same draws and two steps differ only by their weights;
- ``fidelity`` (with ``validation.scorer``, a CLIP model): cosine similarity of each render's
  image embedding to each training image's; likeness to the subject;
- ``text_alignment`` (same scorer): cosine similarity of each render to its prompt's text
  (the trigger word removed: CLIP does not know it); whether the LoRA still follows prompts.

Every score is kept per sample (held-out draw, render x training image, render), so two steps
compare *paired*: the rule looks at the per-sample differences between a step and the last one
and their standard error. ``choose_step`` picks the step whose advantage over the last step is
largest, and only if it is at least ``Z_MIN`` standard errors (combined over the rule's scores
with Stouffer's sum / sqrt(k)); otherwise it keeps the last step. A difference within noise
never moves the choice, and where nothing can be scored the last step is kept, saying so.
See docs/selection.md.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOLDOUT_DRAWS = 4  # fixed noise/timestep draws per held-out image
Z_MIN = 2.0  # standard errors a step must beat the last one by to be chosen instead
_Z_CAP = 1e6  # a noiseless (deterministic) difference
# score -> +1 when higher is better, -1 when lower is better
METRICS: dict[str, float] = {"val_loss": -1.0, "fidelity": 1.0, "text_alignment": 1.0}
RULE_METRICS: dict[str, tuple[str, ...]] = {
    "val_loss": ("val_loss",),
    "fidelity": ("fidelity",),
    "balanced": tuple(METRICS),
    "last": (),
}
LABELS = {"val_loss": "held-out loss", "fidelity": "fidelity", "text_alignment": "text alignment"}


class SelectionError(ValueError):
    """A selection setting this dataset or machine cannot honour; the message names the field."""


def split_holdout(names: list[str], holdout: float, seed: int) -> tuple[list[str], list[str]]:
    """(training names, held-out names): a count or a fraction of the images, drawn from ``seed``.

    The draw depends only on the sorted names and the seed, so a resumed run holds out the same ones.
    """
    if not holdout:
        return list(names), []
    n = int(holdout) if holdout >= 1 else max(1, round(holdout * len(names)))
    if n >= len(names):
        raise SelectionError(
            f"validation.holdout: {holdout:g} would hold out {n} of the {len(names)} images and leave "
            "none to train on; hold out fewer"
        )
    held = set(random.Random(seed).sample(sorted(names), n))
    return [x for x in names if x not in held], [x for x in names if x in held]


@dataclass
class StepScores:
    """One validation step's scores, per sample (paired across steps) and the files kept."""

    step: int
    samples: dict[str, list[float]] = field(default_factory=dict)  # metric -> per-sample values
    renders: list[str] = field(default_factory=list)  # validation images, relative to the output
    lora: list[str] = field(default_factory=list)  # the kept LoRA files, relative to the output

    def mean(self, metric: str) -> float | None:
        values = self.samples.get(metric)
        return sum(values) / len(values) if values else None

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            **{m: self.mean(m) for m in METRICS},
            "samples": self.samples,
            "renders": self.renders,
            "lora": self.lora,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StepScores:
        samples = {k: [float(x) for x in v] for k, v in (d.get("samples") or {}).items()}
        return cls(int(d["step"]), samples, list(d.get("renders", [])), list(d.get("lora", [])))


@dataclass(frozen=True)
class Choice:
    step: int
    rule: str
    reason: str
    z: float | None = None  # the chosen step's advantage over the last one, in standard errors
    fallback: bool = False  # the rule could not decide (nothing to score): the last step is kept

    def to_json(self) -> dict[str, Any]:
        return {
            "chosen_step": self.step,
            "rule": self.rule,
            "reason": self.reason,
            "z": self.z,
            "z_min": Z_MIN,
            "fallback": self.fallback,
        }


def paired_z(step: list[float], last: list[float], sign: float) -> float | None:
    """How many standard errors ``step`` beats ``last`` by (``sign``: +1 higher is better), from the
    per-sample differences; None when there are too few samples to tell noise from signal."""
    n = len(step)
    if n < 2 or len(last) != n:
        return None
    d = [sign * (a - b) for a, b in zip(step, last, strict=True)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1)
    if var == 0:
        return 0.0 if mean == 0 else math.copysign(_Z_CAP, mean)
    return mean / math.sqrt(var / n)


def advantage(step: StepScores, last: StepScores, metrics: tuple[str, ...]) -> tuple[float, list[str]] | None:
    """Stouffer's combination (sum / sqrt(k)) of the paired z of every metric both steps have."""
    zs: list[float] = []
    used: list[str] = []
    for m in metrics:
        z = paired_z(step.samples.get(m, []), last.samples.get(m, []), METRICS[m])
        if z is not None:
            zs.append(z)
            used.append(m)
    return (sum(zs) / math.sqrt(len(zs)), used) if zs else None


def choose_step(records: list[StepScores], rule: str) -> Choice:
    """The step to deliver among the scored ``records`` (the last one is the run's final step)."""
    assert records, "the final step is always scored"
    records = sorted(records, key=lambda r: r.step)
    last = records[-1]
    if rule == "last":
        return Choice(last.step, rule, f"selection is last: the final step ({last.step}) is delivered")
    if len(records) == 1:
        return Choice(
            last.step,
            rule,
            f"only the final step ({last.step}) was scored (set validation.interval to score earlier "
            "steps); it is delivered",
            fallback=True,
        )
    metrics = RULE_METRICS[rule]
    scored = [(r, a) for r in records[:-1] if (a := advantage(r, last, metrics)) is not None]
    if not scored:
        return Choice(last.step, rule, _nothing_scored(rule, last.step), fallback=True)
    best, (z, used) = max(scored, key=lambda ra: (ra[1][0], -ra[0].step))
    what = ", ".join(_compare(m, best, last) for m in used)
    if z < Z_MIN:
        return Choice(
            last.step,
            rule,
            f"no step beats the final step ({last.step}) beyond noise: the best, step {best.step} "
            f"({what}), is {z:.2f} standard errors ahead, under the {Z_MIN:g} required",
            z,
        )
    return Choice(
        best.step,
        rule,
        f"step {best.step} beats the final step ({last.step}) by {min(z, 999):.1f} standard errors "
        f"({what}; rule {rule})",
        z,
    )


def _compare(metric: str, step: StepScores, last: StepScores) -> str:
    a, b = step.mean(metric), last.mean(metric)
    assert a is not None and b is not None
    return f"{LABELS[metric]} {a:.4f} vs {b:.4f}"


def _nothing_scored(rule: str, last: int) -> str:
    need = {
        "val_loss": "set validation.holdout for a held-out loss",
        "fidelity": "set validation.scorer (a CLIP model) for fidelity",
        "balanced": "set validation.holdout and/or validation.scorer",
    }[rule]
    return f"nothing could be scored for rule {rule} ({need}); the final step ({last}) is delivered"


def strip_trigger(prompt: str, trigger: str) -> str:
    """The prompt without the trigger word, for CLIP (it has never seen the token)."""
    if not trigger:
        return prompt
    words = [w for w in prompt.replace(",", " , ").split() if w.lower().strip(",") != trigger.lower()]
    return " ".join(words).replace(" , ", ", ").strip(" ,") or prompt


def resolve_scorer(ref: str) -> Path:
    """A local folder for the scorer ``ref``: a path, a folder under ``weights/``, or a Hub id
    (downloaded like base weights, with ``HF_TOKEN`` when gated)."""
    from .weights import WeightsError, resolve_model_folder

    try:
        return resolve_model_folder(ref, "validation.scorer")
    except WeightsError as exc:
        raise SelectionError(str(exc)) from None
