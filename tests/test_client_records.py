"""The pure merge rules of client/records.py: whatever order a provider's events arrive in (webhooks
race polls, retries repeat, late events come after the end), the job ends up the same."""

from __future__ import annotations

import itertools
import json
from typing import Any, cast

import pytest

from client.records import FIELDS, Job, StoredJob, iso_utc, merge, orphan_rank, rank
from train.progress import format_progress

NOW = 1714560000.0  # 2024-05-01T10:40:00Z
PRICE = 0.002


def stored(**fields: Any) -> StoredJob:
    """A job as the store keeps it, just bound."""
    job: dict[str, Any] = {name: None for name in FIELDS}
    job.update(
        id="rid",
        provider="replicate",
        kind="training",
        status="starting",
        request_key="req",
        created_at="2024-05-01T10:00:00.000000Z",
        updated_at="2024-05-01T10:00:00.000000Z",
        price_per_s=PRICE,
        webhook=True,
        delivered=False,
        logs_len=0,
    )
    job.update(fields)
    return cast(StoredJob, job)


def progress_logs(*steps: int) -> str:
    return "booting\n" + "".join(
        format_progress("train", s, 100, loss=1.0 / s, eta_s=100.0 - s) + "\n" for s in steps
    )


def event(status: str, logs: str = "", **extra) -> dict:
    obj = {
        "id": "rid",
        "status": status,
        "logs": logs,
        "output": None,
        "error": None,
        "started_at": None,
        "completed_at": None,
        "metrics": {},
    }
    obj.update(extra)
    return obj


STARTED, COMPLETED = "2024-05-01T10:01:00Z", "2024-05-01T10:03:00Z"
PROCESSING_1 = event("processing", progress_logs(10), started_at=STARTED)
PROCESSING_2 = event("processing", progress_logs(10, 20), started_at=STARTED)
SUCCEEDED = event(
    "succeeded",
    progress_logs(10, 20, 100),
    started_at=STARTED,
    completed_at=COMPLETED,
    output={"weights": "https://x/w.tar"},
    metrics={"predict_time": 118.5},
)
FAILED = event(
    "failed", progress_logs(10), started_at=STARTED, completed_at=COMPLETED, error="CUDA out of memory"
)
CANCELED = event("canceled")


def replay(events, job: StoredJob | None = None, source="webhook") -> tuple[dict[str, Any], list[dict]]:
    """Fold the events into the job the way the store does; also each event's changes."""
    job = job or stored()
    all_changes = []
    for i, ev in enumerate(events):
        changes = merge(job, ev, source, NOW + i)
        all_changes.append(changes)
        job = cast(StoredJob, {**job, **changes})
    return dict(job), all_changes


# (events in arrival order, what the job must show at the end)
ORDERS = {
    "in order": (
        [PROCESSING_1, PROCESSING_2, SUCCEEDED],
        {
            "status": "succeeded",
            "step": 100,
            "predict_time": 118.5,
            "cost_usd": 0.237,
            "completed_at": "2024-05-01T10:03:00.000000Z",
        },
    ),
    "late processing after succeeded": (
        [SUCCEEDED, PROCESSING_2, PROCESSING_1],
        {"status": "succeeded", "step": 100, "cost_usd": 0.237},
    ),
    "duplicate terminal": (
        [PROCESSING_1, SUCCEEDED, SUCCEEDED],
        {"status": "succeeded", "predict_time": 118.5, "cost_usd": 0.237},
    ),
    "failed then succeeded: the first terminal status is final": (
        [PROCESSING_1, FAILED, SUCCEEDED],
        {
            "status": "failed",
            "error": "CUDA out of memory",
            "output_json": None,
            "predict_time": 120.0,
            "cost_usd": 0.24,
        },
    ),
    "logs shorter after longer are ignored": (
        [PROCESSING_2, PROCESSING_1],
        {"status": "processing", "step": 20, "loss": 0.05, "eta_s": 80.0},
    ),
    "logs shorter then longer": (
        [PROCESSING_1, PROCESSING_2],
        {"status": "processing", "step": 20, "loss": 0.05, "total": 100},
    ),
    "poll without metrics: predict_time from the timestamps": (
        [event("succeeded", started_at=STARTED, completed_at=COMPLETED)],
        {"status": "succeeded", "predict_time": 120.0, "cost_usd": 0.24},
    ),
    "canceled before it started costs nothing": (
        [CANCELED],
        {"status": "canceled", "predict_time": 0.0, "cost_usd": 0.0, "completed_at": iso_utc(NOW)},
    ),
    "aborted is canceled": ([event("aborted")], {"status": "canceled", "cost_usd": 0.0}),
    "starting after processing does not go back": (
        [PROCESSING_1, event("starting")],
        {"status": "processing", "step": 10},
    ),
}


@pytest.mark.parametrize("name", list(ORDERS))
def test_event_orders(name):
    events, expected = ORDERS[name]
    job, _ = replay(events)
    for field, value in expected.items():
        assert job[field] == (pytest.approx(value) if isinstance(value, float) else value), field


def test_every_arrival_order_ends_in_the_same_job():
    events = [event("starting"), PROCESSING_1, PROCESSING_2, SUCCEEDED]
    ignore = ("updated_at", "last_event_at")
    results = []
    for order in itertools.permutations(events):
        job, _ = replay(order)
        results.append({k: v for k, v in job.items() if k not in ignore})
    assert all(r == results[0] for r in results)
    assert results[0]["status"] == "succeeded" and results[0]["step"] == 100
    assert json.loads(results[0]["output_json"]) == {"weights": "https://x/w.tar"}


def test_nothing_new_is_no_change_and_terminal_only_fills_empties():
    job, changes = replay([PROCESSING_2, PROCESSING_2, PROCESSING_1, SUCCEEDED, PROCESSING_2, FAILED])
    assert [bool(c) for c in changes] == [True, False, False, True, False, False]
    # a retried terminal event may add what the first one lacked, but not overwrite
    first = event("succeeded", started_at=STARTED, completed_at=COMPLETED)
    job, changes = replay([first, SUCCEEDED])
    assert job["predict_time"] == 120.0 and job["cost_usd"] == pytest.approx(0.24)  # settled by the first
    assert json.loads(job["output_json"]) == {"weights": "https://x/w.tar"}  # filled by the retry
    assert set(changes[1]) >= {"output_json"} and "predict_time" not in changes[1]


def test_cost_needs_a_price_and_bookkeeping_follows_the_source():
    job, _ = replay([SUCCEEDED], job=stored(price_per_s=None))
    assert job["predict_time"] == 118.5 and job["cost_usd"] is None  # the estimate keeps counting
    changes = merge(stored(), PROCESSING_1, "create", NOW)
    assert changes["updated_at"] == iso_utc(NOW) and "last_event_at" not in changes  # our own call
    changes = merge(stored(), PROCESSING_1, "poll", NOW)
    assert changes["last_event_at"] == iso_utc(NOW)
    with pytest.raises(ValueError, match="source"):
        merge(stored(), PROCESSING_1, "carrier-pigeon", NOW)


def test_merge_does_not_touch_its_inputs_and_orphans_rank_by_progress():
    job = stored()
    before = dict(job)
    merge(job, SUCCEEDED, "webhook", NOW)
    assert job == before
    assert orphan_rank(SUCCEEDED) > orphan_rank(PROCESSING_2) > orphan_rank(PROCESSING_1)
    assert orphan_rank({"status": "bogus"}) == (0, 0)
    assert rank("starting") < rank("processing") < rank("failed") == rank("succeeded")
    assert set(Job.__annotations__) == set(FIELDS)
