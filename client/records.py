"""What a job is, and how a provider's event changes it: pure rules, no SQLite, no I/O.

A job record (``Job``) is a dict with the keys in ``FIELDS``: every caller may keep treating it
as a plain dict. Timestamps are UTC ISO-8601 text in one fixed format
(``2024-05-01T12:00:00.000000Z``), so they sort as text; ``spec_json``, ``input_json`` and
``output_json`` are JSON text.

``merge(job, event, source, now)`` says what a Replicate/Cog prediction or training object
(from a webhook, a poll or the create response) changes in a stored job. Events arrive in any
order and any number of times, so the rules make the result independent of both:

- the status only moves forward (submitting < starting < processing < terminal) and the first
  terminal status is final; a later event with the same terminal status only fills fields that
  are still empty, and one with another status changes nothing;
- logs are cumulative: only longer logs replace the stored tail, and the newest progress line
  in them sets step/total/phase/eta_s (loss from the newest line that has one);
- output and error are taken when present;
- on a terminal status ``predict_time`` comes from ``metrics.predict_time`` (else from the
  timestamps; a job that never started costs nothing) and ``cost_usd = predict_time *
  price_per_s``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, TypedDict

from train.progress import last_progress, parse_progress_line

__all__ = [
    "FIELDS",
    "STATUSES",
    "TERMINAL",
    "UNFINISHED",
    "PROVIDERS",
    "KINDS",
    "SOURCES",
    "RELATIONS",
    "RANK",
    "LOGS_TAIL_CHARS",
    "Job",
    "StoredJob",
    "rank",
    "merge",
    "touch",
    "orphan_rank",
    "iso_utc",
    "epoch",
    "finite",
    "map_status",
    "tail",
]

STATUSES = ("submitting", "starting", "processing", "succeeded", "failed", "canceled")
TERMINAL = ("succeeded", "failed", "canceled")
UNFINISHED = ("submitting", "starting", "processing")
PROVIDERS = ("replicate", "cog")
KINDS = ("prediction", "training")
SOURCES = ("webhook", "poll", "create")
RELATIONS = ("resume", "continue")  # how a job carries on its parent_id
RANK = {"submitting": 0, "starting": 1, "processing": 2, "succeeded": 3, "failed": 3, "canceled": 3}
# the sources that are news from the provider (a create response is our own call's answer)
EVENT_SOURCES = ("webhook", "poll")
LOGS_TAIL_CHARS = 8192


class Job(TypedDict):
    """One job as the store returns it: every key is always present (None where unknown).
    Money in USD, times in seconds."""

    id: str  # the provider's id once bound; the request key before
    provider: str  # one of PROVIDERS
    kind: str  # one of KINDS
    model: str | None
    version: str | None
    destination: str | None
    hardware: str | None
    status: str  # one of STATUSES
    created_at: str
    updated_at: str
    started_at: str | None
    completed_at: str | None
    spec_json: str | None
    input_json: str | None
    estimate_usd: float | None
    price_per_s: float | None
    predict_time: float | None
    cost_usd: float | None
    output_json: str | None
    error: str | None
    logs_tail: str | None  # the last LOGS_TAIL_CHARS of the logs, cut at a line start
    step: int | None
    total: int | None
    loss: float | None
    eta_s: float | None
    phase: str | None
    webhook: bool  # the provider was asked to send webhooks for it
    last_event_at: str | None  # the last webhook or poll, changed or not (pollers back off on it)
    local_dir: str | None
    delivered: bool
    request_key: str
    parent_id: str | None  # the job this one resumes or continues (migration 2)
    relation: str | None  # one of RELATIONS


FIELDS: tuple[str, ...] = tuple(Job.__annotations__)


class StoredJob(Job, total=False):
    """A job as it is kept: also how long the logs were when last merged (logs are cumulative)."""

    logs_len: int


def rank(status: str) -> int:
    """Order of statuses: a job only moves to a higher rank; all terminal statuses share one."""
    return RANK[status]


# --------------------------------------------------------------------------- values

_TS_RE = re.compile(r"^(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2}(?::\d{2})?)(?:\.(\d+))?(Z|[+-]\d{2}:?\d{2})?$")
_ISO_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def _parse_iso(value: str) -> datetime | None:
    m = _TS_RE.match(value.strip())
    if not m:
        return None
    date, clock, frac, tz = m.groups()
    if clock.count(":") == 1:
        clock += ":00"
    frac = ((frac or "") + "000000")[:6]  # Python parses microseconds; providers send nanoseconds
    if tz in (None, "Z"):
        tz = "+00:00"
    elif ":" not in tz:
        tz = tz[:3] + ":" + tz[3:]
    try:
        return datetime.fromisoformat(f"{date}T{clock}.{frac}{tz}")
    except ValueError:
        return None


def iso_utc(value: Any) -> str | None:
    """A datetime, epoch seconds or ISO-8601 string as ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (UTC);
    None for None or anything unparseable. Naive values are taken as UTC."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            return None
        dt = datetime.fromtimestamp(value, timezone.utc)
    elif isinstance(value, datetime):
        dt = value
    elif isinstance(value, str):
        dt = _parse_iso(value)
        if dt is None:
            return None
    else:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).strftime(_ISO_FORMAT)


def epoch(iso: str | None) -> float | None:
    """Epoch seconds of a timestamp in the store's format (None for None)."""
    if not iso:
        return None
    return datetime.strptime(iso, _ISO_FORMAT).replace(tzinfo=timezone.utc).timestamp()


def finite(value: Any) -> float | None:
    """A finite int/float as float; None for anything else (bools, NaN, text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def map_status(value: Any) -> str | None:
    """A provider status in our vocabulary; None for one we do not take from a provider."""
    if value == "aborted":  # newer API; ended before it started
        return "canceled"
    return value if value in RANK and value != "submitting" else None


def tail(logs: str) -> str:
    """The last LOGS_TAIL_CHARS of ``logs``, starting at a line when one starts near the cut."""
    if len(logs) <= LOGS_TAIL_CHARS:
        return logs
    end = logs[-LOGS_TAIL_CHARS:]
    nl = end.find("\n", 0, 1024)
    return end[nl + 1 :] if nl >= 0 else end


# --------------------------------------------------------------------------- merge rules


def touch(source: str, now: float) -> dict[str, Any]:
    """What any event records even when it changes nothing: when the provider last spoke."""
    return {"last_event_at": iso_utc(now)} if source in EVENT_SOURCES else {}


def _offer(out: dict[str, Any], job: Mapping[str, Any], name: str, value: Any, fill_only: bool) -> None:
    """Take ``value`` when present: into an empty field, or (unless ``fill_only``) over a different one."""
    if value is None:
        return
    if job.get(name) is None or (not fill_only and job.get(name) != value):
        out[name] = value


def _log_changes(job: StoredJob, logs: Any) -> dict[str, Any]:
    """Longer logs (they are cumulative) replace the tail; their progress lines set the progress."""
    if not isinstance(logs, str) or len(logs) <= job.get("logs_len", 0):
        return {}
    out: dict[str, Any] = {"logs_len": len(logs), "logs_tail": tail(logs)}
    prog = last_progress(logs)
    if prog is not None:
        for name in ("step", "total", "phase"):
            out[name] = prog.get(name)
        out["eta_s"] = finite(prog.get("eta_s"))
    # the loss of the newest line that has one (validate/done lines carry none)
    for line in reversed(logs.splitlines()):
        rec = parse_progress_line(line)
        if rec is not None and finite(rec.get("loss")) is not None:
            out["loss"] = finite(rec.get("loss"))
            break
    return out


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _field_changes(job: StoredJob, event: Mapping[str, Any], fill_only: bool) -> dict[str, Any]:
    """Output, error, timestamps and model/version carried by the event."""
    out: dict[str, Any] = {}
    output = event.get("output")
    error = event.get("error")
    output_text = json.dumps(output, default=str) if output is not None else None
    _offer(out, job, "output_json", output_text, fill_only)
    _offer(
        out,
        job,
        "error",
        (error if isinstance(error, str) else json.dumps(error, default=str)) if error else None,
        fill_only,
    )
    # when it ran and what ran are facts of the job: the first value seen stays
    _offer(out, job, "started_at", iso_utc(event.get("started_at")), True)
    _offer(out, job, "completed_at", iso_utc(event.get("completed_at")), True)
    _offer(out, job, "model", _text(event.get("model")), True)
    _offer(out, job, "version", _text(event.get("version")), True)
    return out


def _billed_seconds(job: Mapping[str, Any]) -> float | None:
    """predict_time from the timestamps when the provider gave no metrics."""
    start, end = epoch(job.get("started_at")), epoch(job.get("completed_at"))
    if start is None:
        return 0.0  # never started: nothing billed
    return max(0.0, end - start) if end is not None else None


def _billing_changes(
    job: StoredJob, changes: Mapping[str, Any], event: Mapping[str, Any], fill_only: bool, now: float
) -> dict[str, Any]:
    """predict_time, completed_at and cost_usd once the job (with ``changes``) is terminal."""
    metrics = event.get("metrics")
    predict_time = finite(metrics.get("predict_time")) if isinstance(metrics, Mapping) else None
    out: dict[str, Any] = {}
    if changes.get("status", job.get("status")) not in TERMINAL:
        _offer(out, job, "predict_time", predict_time, False)
        return out
    merged = {**job, **changes}
    if predict_time is None and merged.get("predict_time") is None:
        predict_time = _billed_seconds(merged)
    _offer(out, job, "predict_time", predict_time, fill_only)
    merged.update(out)
    if merged.get("completed_at") is None:
        out["completed_at"] = iso_utc(now)
    seconds, price = merged.get("predict_time"), merged.get("price_per_s")
    if seconds is not None and (price is not None or seconds == 0):
        cost = round(seconds * (price or 0.0), 6)
        # a cost is only corrected by a non-final event; the first terminal one settles it
        if job.get("cost_usd") is None or (not fill_only and job.get("cost_usd") != cost):
            out["cost_usd"] = cost
    return out


def merge(job: StoredJob, event: Mapping[str, Any], source: str, now: float) -> dict[str, Any]:
    """The changes ``event`` (a provider object from ``source``, at epoch ``now``) makes to
    ``job``, by the rules in the module docstring; ``{}`` when it tells nothing new. A non-empty
    result includes ``updated_at`` (and ``last_event_at`` for a webhook or poll)."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    current, new = job["status"], map_status(event.get("status"))
    fill_only = current in TERMINAL
    if fill_only and new != current:
        return {}  # the first terminal status is final
    changes: dict[str, Any] = {}
    if not fill_only and new is not None and rank(new) > rank(current):
        changes["status"] = new
    changes.update(_log_changes(job, event.get("logs")))
    changes.update(_field_changes(job, event, fill_only))
    changes.update(_billing_changes(job, changes, event, fill_only, now))
    if changes:
        changes["updated_at"] = iso_utc(now)
        changes.update(touch(source, now))
    return changes


def orphan_rank(event: Mapping[str, Any]) -> tuple[int, int]:
    """How far along an event for a job not in the store is (status rank, logs length): of
    several such events the furthest is the one kept for ``bind``."""
    status = map_status(event.get("status"))
    logs = event.get("logs")
    return (RANK[status] if status else 0), (len(logs) if isinstance(logs, str) else 0)
