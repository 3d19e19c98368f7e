"""Progress lines: the one channel Replicate relays from the container to the client.

The trainer prints one line per logged step (and one per phase change) to stdout:

    PROGRESS {"phase": "train", "step": 10, "total": 1000, "loss": 0.1234, "lr": 0.0001, "s_per_step": 0.52, "eta_s": 515.0}

``parse_progress_line`` reads them back (the client turns them into progress bars, ETAs and
cost estimates). Torch-free: both sides import this module.
"""

from __future__ import annotations

import json
import sys
from typing import Any

PREFIX = "PROGRESS "
# The train entry's line when publishing fails after training (train/service.py): the job still
# succeeds, with its weights in output.zip; the client shows the reason (``publish_failure``).
PUBLISH_FAILED = "publish failed: "
PHASES = ("stage", "caption", "load", "cache", "train", "validate", "export", "publish", "done")
FIELDS = ("phase", "step", "total", "loss", "lr", "s_per_step", "eta_s")


def format_progress(
    phase: str,
    step: int,
    total: int,
    loss: float | None = None,
    lr: float | None = None,
    s_per_step: float | None = None,
    eta_s: float | None = None,
) -> str:
    assert phase in PHASES, phase
    rec: dict[str, Any] = {"phase": phase, "step": step, "total": total}
    if loss is not None:
        rec["loss"] = round(float(loss), 6)
    if lr is not None:
        rec["lr"] = float(f"{lr:.6g}")
    if s_per_step is not None:
        rec["s_per_step"] = round(s_per_step, 4)
    if eta_s is not None:
        rec["eta_s"] = round(eta_s, 1)
    return PREFIX + json.dumps(rec)


def parse_progress_line(line: str) -> dict[str, Any] | None:
    """The record of a progress line, or None for any other line (never raises)."""
    line = line.strip()
    idx = line.find(PREFIX)
    if idx < 0:
        return None
    try:
        rec = json.loads(line[idx + len(PREFIX) :])
    except json.JSONDecodeError:
        return None
    if not isinstance(rec, dict) or rec.get("phase") not in PHASES:
        return None
    if not isinstance(rec.get("step"), int) or not isinstance(rec.get("total"), int):
        return None
    return {k: rec[k] for k in FIELDS if k in rec}


def last_progress(text: str) -> dict[str, Any] | None:
    """The newest progress record in a block of log text."""
    for line in reversed(text.splitlines()):
        rec = parse_progress_line(line)
        if rec is not None:
            return rec
    return None


def emit(line: str) -> None:
    """Print through Python's ``sys.stdout`` (Cog captures that, not raw file descriptors).

    One write per line, newline included: ``print`` writes the text and the newline separately,
    so lines from data-parallel processes sharing a pipe could run together.
    """
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def publish_failure(logs: str | None) -> str | None:
    """Why the job's publishing failed after training (its last ``publish failed:`` line), or None."""
    for line in reversed((logs or "").splitlines()):
        if line.startswith(PUBLISH_FAILED):
            return line[len(PUBLISH_FAILED) :].strip()
    return None
