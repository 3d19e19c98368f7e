"""The client's SQLite job store: reservations and spend limits (also under threads and
processes), merging webhook/poll objects in any order, cost, secret scrubbing, dedupe."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import stat
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from client.records import iso_utc
from client.spend import SpendLimit
from client.store import JobStore, SpendLimitExceeded, scrub_secrets
from train.progress import format_progress
from train.redaction import REDACTED

RID = "wj4is6lbdqqkdepnwpr6v2kuva"


@pytest.fixture
def store(tmp_path) -> JobStore:
    return JobStore(tmp_path / "state" / "jobs.db")


def job(**fields):
    base = {
        "provider": "replicate",
        "kind": "training",
        "model": "acme/trainer",
        "version": "v" * 64,
        "destination": "acme/out",
        "hardware": "gpu-h100",
        "estimate_usd": 1.0,
        "price_per_s": 0.001525,
        "webhook": True,
    }
    base.update(fields)
    return base


def remote(status="starting", logs="", **extra):
    obj = {
        "id": RID,
        "model": "acme/trainer",
        "version": "v" * 64,
        "status": status,
        "logs": logs,
        "input": {},
        "output": None,
        "error": None,
        "created_at": "2024-05-01T10:00:00.123456Z",
        "started_at": None,
        "completed_at": None,
        "metrics": {},
        "urls": {},
    }
    obj.update(extra)
    return obj


def bound(store: JobStore, key="req-1", **fields):
    store.reserve(key, job(**fields))
    return store.bind(key, RID, remote("starting"))


# --------------------------------------------------------------------------- file


def test_file_is_private_and_wal(store, tmp_path):
    path = tmp_path / "state" / "jobs.db"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    store.reserve("req-1", job())
    for side in (path, Path(str(path) + "-wal"), Path(str(path) + "-shm")):
        if side.exists():
            assert stat.S_IMODE(side.stat().st_mode) & 0o077 == 0, side
    import sqlite3

    con = sqlite3.connect(path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()
    # an existing file with loose permissions is tightened
    loose = tmp_path / "loose.db"
    loose.touch()
    os.chmod(loose, 0o644)
    JobStore(loose)
    assert stat.S_IMODE(loose.stat().st_mode) == 0o600


# --------------------------------------------------------------------------- reservations


def test_reserve_bind_release(store):
    rec, decision = store.reserve("req-1", job(input_json={"steps": 10}))
    assert rec["id"] == "req-1" and rec["status"] == "submitting" and rec["request_key"] == "req-1"
    assert rec["webhook"] is True and rec["delivered"] is False
    assert decision.status == "ok" and decision.limit_usd is None
    assert json.loads(rec["input_json"]) == {"steps": 10}

    # the same key again: idempotent, nothing new counted
    again, d2 = store.reserve("req-1", job(estimate_usd=50.0))
    assert again["id"] == "req-1" and d2.existing and again["estimate_usd"] == 1.0
    assert store.spend_between() == pytest.approx(1.0)

    b = store.bind("req-1", RID, remote("starting"))
    assert b["id"] == RID and b["status"] == "starting" and b["request_key"] == "req-1"
    assert store.get("req-1") is None and store.get(RID)["status"] == "starting"
    assert store.get_by_request_key("req-1")["id"] == RID
    assert store.bind("req-1", RID)["id"] == RID  # bind twice is fine
    with pytest.raises(ValueError):
        store.bind("req-1", "other-id")
    assert [r["id"] for r in store.unfinished()] == [RID]
    # releasing a bound job changes nothing
    assert store.release("req-1", "late error")["status"] == "starting"

    store.reserve("req-2", job(estimate_usd=3.0))
    assert store.spend_between() == pytest.approx(4.0)
    rel = store.release("req-2", "HTTP 422: invalid input")
    assert rel["status"] == "failed" and rel["error"] == "HTTP 422: invalid input" and rel["cost_usd"] == 0
    assert store.spend_between() == pytest.approx(1.0)  # a released reservation stops counting
    assert [r["id"] for r in store.unfinished()] == [RID]
    with pytest.raises(ValueError):
        store.bind("req-2", "late-id")
    with pytest.raises(KeyError):
        store.release("nope", "x")
    with pytest.raises(ValueError):
        store.reserve("req-3", job(provider="aws"))
    with pytest.raises(ValueError):
        store.reserve("req-3", job(bogus=1))


def test_spend_block_and_warn(store):
    now = datetime.now(timezone.utc)
    period = now - timedelta(hours=1)
    store.reserve("a", job(estimate_usd=2.0), limit_usd=5.0, period_start=period)
    store.reserve("b", job(estimate_usd=2.0), limit_usd=5.0, period_start=period)
    with pytest.raises(SpendLimitExceeded) as info:
        store.reserve("c", job(estimate_usd=2.0), limit_usd=5.0, period_start=period)
    err = info.value
    assert (err.spent_usd, err.estimate_usd, err.limit_usd) == (4.0, 2.0, 5.0)
    msg = str(err)
    assert err.period_start is not None
    assert "$4.00" in msg and "$2.00" in msg and "$5.00" in msg and err.period_start[:10] in msg
    assert store.get("c") is None  # nothing inserted

    rec, decision = store.reserve(
        "c", job(estimate_usd=2.0), limit_usd=5.0, period_start=period, action="warn"
    )
    assert decision.status == "warn" and decision.over and rec["status"] == "submitting"
    assert decision.spent_usd == 4.0 and decision.remaining_usd == 1.0

    _, ok = store.reserve("d", job(estimate_usd=0.0), limit_usd=100.0, period_start=period)
    assert ok.status == "ok" and not ok.over
    with pytest.raises(ValueError):
        store.reserve("e", job(), limit_usd=5.0, action="maybe")


def test_spend_counts_cost_of_finished_jobs_in_their_period(store):
    # a job finished long ago does not count in this period; its cost counts in its own
    store.reserve("old", job(estimate_usd=9.0))
    store.bind("old", "old-id", {**remote("succeeded"), "id": "old-id", "metrics": {"predict_time": 1000.0}})
    store.update("old-id", completed_at="2020-01-15T00:00:00Z")
    assert store.get("old-id")["cost_usd"] == pytest.approx(1.525)
    assert store.spend_between("2020-01-01T00:00:00Z", "2020-02-01T00:00:00Z") == pytest.approx(1.525)
    limit = SpendLimit(3.0, "monthly", "block")
    store.reserve("new", job(estimate_usd=2.5), **limit.reserve_kwargs())
    with pytest.raises(SpendLimitExceeded):
        store.reserve("new2", job(estimate_usd=1.0), **limit.reserve_kwargs())
    # the estimate is replaced by the real cost once the job finishes
    store.bind("new", RID, remote("processing"))
    store.apply_remote(
        RID,
        remote(
            "succeeded",
            metrics={"predict_time": 200.0},
            started_at="2024-05-01T10:00:01Z",
            completed_at="2024-05-01T10:03:21Z",
        ),
        "webhook",
    )
    store.update(RID, completed_at=datetime.now(timezone.utc))
    assert store.spend_between(limit.period_start()) == pytest.approx(200 * 0.001525)
    _, decision = store.reserve("new2", job(estimate_usd=1.0), **limit.reserve_kwargs())
    assert decision.status == "ok"


def _thread_race(store: JobStore, n_threads: int, tries: int, limit: float) -> int:
    barrier = threading.Barrier(n_threads)
    ok = []

    def worker(t: int) -> None:
        barrier.wait()
        for i in range(tries):
            try:
                store.reserve(f"t{t}-{i}", job(estimate_usd=1.0), limit_usd=limit)
                ok.append(1)
            except SpendLimitExceeded:
                pass

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return len(ok)


def test_concurrent_reservations_threads_cannot_overrun(store):
    assert _thread_race(store, 8, 5, 13.0) == 13
    assert store.spend_between() == pytest.approx(13.0)
    assert len(store.list(limit=100)) == 13


def _process_worker(path: str, worker: int, tries: int, limit: float, start, results) -> None:
    s = JobStore(Path(path))
    start.wait(timeout=60)  # all children past their imports and open, then they race
    n = 0
    for i in range(tries):
        try:
            s.reserve(f"p{worker}-{i}", job(estimate_usd=1.0), limit_usd=limit)
            n += 1
        except SpendLimitExceeded:
            pass
    results.put(n)


def test_concurrent_reservations_processes_cannot_overrun(tmp_path):
    path = tmp_path / "jobs.db"
    JobStore(path)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    start = ctx.Barrier(4)
    procs = [
        ctx.Process(target=_process_worker, args=(str(path), w, 6, 11.0, start, results)) for w in range(4)
    ]
    for p in procs:
        p.start()
    counts = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sum(counts) == 11
    assert JobStore(path).spend_between() == pytest.approx(11.0)


# --------------------------------------------------------------------------- remote merges


def test_apply_remote_reordered_duplicated_and_late_events(store):
    bound(store, price_per_s=0.002)
    logs1 = "booting\n" + format_progress("train", 10, 100, loss=0.5, eta_s=90.0) + "\n"
    logs2 = logs1 + "some line\n" + format_progress("train", 20, 100, loss=0.25, eta_s=80.0) + "\n"

    rec, changed = store.apply_remote(
        RID, remote("processing", logs2, started_at="2024-05-01T10:00:05Z"), "webhook"
    )
    assert changed and rec["status"] == "processing"
    assert (rec["step"], rec["total"], rec["loss"], rec["eta_s"], rec["phase"]) == (
        20,
        100,
        0.25,
        80.0,
        "train",
    )
    assert rec["started_at"] == "2024-05-01T10:00:05.000000Z" and rec["last_event_at"]

    # an older event arriving late: status does not go back, shorter logs are ignored
    rec, changed = store.apply_remote(RID, remote("starting", logs1), "poll")
    assert not changed and rec["status"] == "processing" and rec["step"] == 20
    # the same event twice: no change
    assert (
        store.apply_remote(RID, remote("processing", logs2, started_at="2024-05-01T10:00:05Z"), "webhook")[1]
        is False
    )

    # a phase line without a loss keeps the last loss
    logs3 = logs2 + format_progress("export", 0, 1) + "\n"
    rec, changed = store.apply_remote(RID, remote("processing", logs3), "poll")
    assert changed and rec["phase"] == "export" and rec["loss"] == 0.25 and rec["eta_s"] is None

    done_logs = logs3 + format_progress("done", 100, 100) + "\n"
    final = remote(
        "succeeded",
        done_logs,
        output={"version": "acme/out:" + "a" * 64, "weights": "https://x/w.tar"},
        started_at="2024-05-01T10:00:05Z",
        completed_at="2024-05-01T10:02:05Z",
        metrics={"predict_time": 118.5, "total_time": 125.0},
    )
    rec, changed = store.apply_remote(RID, final, "webhook")
    assert changed and rec["status"] == "succeeded" and rec["phase"] == "done"
    assert rec["predict_time"] == 118.5 and rec["cost_usd"] == pytest.approx(0.237)
    assert json.loads(rec["output_json"])["weights"] == "https://x/w.tar"
    assert rec["completed_at"] == "2024-05-01T10:02:05.000000Z"
    assert store.unfinished() == []

    # a processing webhook after succeeded changes nothing, even with longer logs
    rec, changed = store.apply_remote(RID, remote("processing", done_logs + "x" * 50), "webhook")
    assert not changed and rec["status"] == "succeeded" and rec["cost_usd"] == pytest.approx(0.237)
    # a conflicting terminal status: the first terminal wins
    rec, changed = store.apply_remote(RID, remote("failed", error="boom"), "poll")
    assert not changed and rec["status"] == "succeeded" and rec["error"] is None
    # the completed webhook retried: no change
    assert store.apply_remote(RID, final, "webhook")[1] is False


def test_terminal_fills_only_missing_fields_and_never_started_costs_nothing(store):
    bound(store)
    rec, _ = store.apply_remote(
        RID,
        remote(
            "failed",
            error="CUDA out of memory",
            started_at="2024-05-01T10:00:00Z",
            completed_at="2024-05-01T10:01:00Z",
        ),
        "poll",
    )
    # no metrics yet: predict_time from the timestamps
    assert rec["status"] == "failed" and rec["predict_time"] == 60.0
    assert rec["cost_usd"] == pytest.approx(60 * 0.001525) and rec["error"] == "CUDA out of memory"
    rec, changed = store.apply_remote(
        RID, remote("failed", error="other", metrics={"predict_time": 58.0}), "webhook"
    )
    assert not changed and rec["predict_time"] == 60.0 and rec["error"] == "CUDA out of memory"

    store.reserve("req-c", job(estimate_usd=7.0))
    store.bind("req-c", "cancel-id", {**remote("starting"), "id": "cancel-id"})
    rec, _ = store.apply_remote("cancel-id", {**remote("canceled"), "id": "cancel-id"}, "poll")
    assert rec["status"] == "canceled" and rec["predict_time"] == 0.0 and rec["cost_usd"] == 0.0
    assert rec["completed_at"] is not None

    # no price known: the estimate keeps counting (conservative)
    store.reserve("req-n", job(estimate_usd=4.0, price_per_s=None))
    store.bind("req-n", "np-id", {**remote("starting"), "id": "np-id"})
    rec, _ = store.apply_remote(
        "np-id", {**remote("succeeded"), "id": "np-id", "metrics": {"predict_time": 10.0}}, "poll"
    )
    assert rec["cost_usd"] is None
    assert store.spend_between() == pytest.approx(60 * 0.001525 + 0 + 4.0)


def test_webhook_before_bind_is_kept_and_merged(store):
    store.reserve("req-1", job())
    logs = format_progress("train", 5, 50, loss=1.0) + "\n"
    rec, changed = store.apply_remote(RID, remote("processing", logs), "webhook")
    assert rec is None and not changed
    rec = store.bind("req-1", RID, remote("starting"))  # the create response is older
    assert rec["status"] == "processing" and rec["step"] == 5
    assert store.apply_remote("unknown-id", remote("succeeded"), "webhook") == (None, False)
    with pytest.raises(ValueError):
        store.apply_remote(RID, remote("processing"), "carrier-pigeon")


def test_logs_tail_is_bounded(store):
    bound(store)
    logs = "".join(f"line {i:06d}\n" for i in range(5000))
    rec, _ = store.apply_remote(RID, remote("processing", logs), "poll")
    assert len(rec["logs_tail"]) <= 8192 and rec["logs_tail"].endswith("line 004999\n")
    assert rec["logs_tail"].startswith("line ")


# --------------------------------------------------------------------------- secrets


def test_input_secrets_are_stripped(store):
    spec = json.dumps({"steps": 10, "hf_token": "hf_" + "a" * 34})
    inputs = {
        "dataset": "https://user:pw@example.com/d.zip",
        "steps": 100,
        "hf_token": "hf_" + "x" * 34,
        "s3_secret_access_key": "abc",
        "s3_access_key_id": "AKIAABCDEFGHIJKLMNOP",
        "apiKey": "k",
        "nested": {"password": "p", "ok": 1, "Authorization": "Bearer r8_" + "z" * 36},
        "prompts": ["a cat", "r8_" + "q" * 36],
        "trigger_word": "TOK",
        "keyword": "kept",
        "max_tokens": 5,
        "spec": spec,
        "note": "my token is r8_" + "w" * 36,
        "presigned": "https://s3.example.com/b/k?X-Amz-Signature=abc&X-Amz-Credential=def&part=1",
    }
    rec, _ = store.reserve("req-1", job(input_json=inputs, spec_json={"hf_token": "t", "steps": 3}))
    stored = json.loads(rec["input_json"])
    text = rec["input_json"] + rec["spec_json"]
    for secret in (
        "hf_xxxx",
        "abc",
        "AKIA",
        "r8_",
        "pw@",
        "password",
        "hf_aaaa",
        "Signature=abc",
        "Credential=def",
    ):
        assert secret not in text, secret
    assert stored["dataset"] == "https://example.com/d.zip"
    assert stored["nested"] == {"ok": 1} and stored["prompts"] == ["a cat", REDACTED]
    assert stored["trigger_word"] == "TOK" and stored["keyword"] == "kept" and stored["max_tokens"] == 5
    assert json.loads(stored["spec"]) == {"steps": 10}
    assert "note" not in stored and "part=1" in stored["presigned"]
    assert json.loads(rec["spec_json"]) == {"steps": 3}
    rec = store.update("req-1", input_json={"hf_token": "hf_" + "y" * 34, "steps": 2})
    assert json.loads(rec["input_json"]) == {"steps": 2}
    assert scrub_secrets({"token": "x"}) == {}
    with pytest.raises(ValueError):
        store.update("req-1", input_json="{not json")


# --------------------------------------------------------------------------- dedupe and queries


def test_webhook_dedupe_and_pruning(store, monkeypatch):
    assert store.seen_webhook("msg_1") is False
    assert store.seen_webhook("msg_1") is True
    assert store.seen_webhook("msg_2") is False
    store.forget_webhook("msg_2")
    assert store.seen_webhook("msg_2") is False
    # four days later the old ids are pruned
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 4 * 24 * 3600)
    assert store.seen_webhook("msg_3") is False
    assert store.seen_webhook("msg_1") is False


def test_webhook_dedupe_under_threads(store):
    seen = []
    barrier = threading.Barrier(6)

    def worker():
        barrier.wait()
        seen.append(store.seen_webhook("msg_same"))

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seen) == [False] + [True] * 5


def test_get_list_update(store):
    for i in range(3):
        store.reserve(f"r{i}", job(estimate_usd=float(i)))  # same timestamp: insertion order breaks the tie
    assert [r["id"] for r in store.list()] == ["r2", "r1", "r0"]
    assert [r["id"] for r in store.list(limit=1)] == ["r2"]
    store.bind("r1", RID, remote("processing"))
    assert [r["id"] for r in store.list(status="processing")] == [RID]
    assert {r["id"] for r in store.list(status=["processing", "submitting"])} == {"r0", "r2", RID}
    rec = store.update(RID, delivered=True, local_dir="/tmp/out")
    assert rec["delivered"] is True and rec["local_dir"] == "/tmp/out"
    with pytest.raises(ValueError):
        store.update(RID, id="x")
    with pytest.raises(ValueError):
        store.update(RID, status="exploded")
    with pytest.raises(KeyError):
        store.update("missing", delivered=True)
    assert store.get("missing") is None


def test_iso_utc():
    assert iso_utc("2024-05-01T10:00:00Z") == "2024-05-01T10:00:00.000000Z"
    assert iso_utc("2024-05-01T12:00:00.123456789+02:00") == "2024-05-01T10:00:00.123456Z"
    assert iso_utc(datetime(2024, 5, 1, 10)) == "2024-05-01T10:00:00.000000Z"
    assert iso_utc(0) == "1970-01-01T00:00:00.000000Z"
    assert iso_utc("yesterday") is None and iso_utc(None) is None


# --------------------------------------------------------------------------- spend limits


def test_spend_limit_periods_and_settings():
    t = datetime(2024, 5, 15, 13, 45, tzinfo=timezone.utc)  # a Wednesday
    assert SpendLimit(10, "daily").period_start(t) == datetime(2024, 5, 15, tzinfo=timezone.utc)
    assert SpendLimit(10, "weekly").period_start(t) == datetime(2024, 5, 13, tzinfo=timezone.utc)
    assert SpendLimit(10, "monthly").period_start(t) == datetime(2024, 5, 1, tzinfo=timezone.utc)
    assert SpendLimit(10, "monthly").period_end(datetime(2024, 12, 31, 23)) == datetime(
        2025, 1, 1, tzinfo=timezone.utc
    )
    # a non-UTC time is converted first (01:00+02:00 is the previous UTC day)
    tz2 = timezone(timedelta(hours=2))
    assert SpendLimit(1, "daily").period_start(datetime(2024, 5, 15, 1, tzinfo=tz2)).day == 14
    lim = SpendLimit(25.5, "weekly", "warn")
    assert SpendLimit.from_dict(lim.to_dict()) == lim
    assert SpendLimit.from_dict({"amount_usd": "$12.5"}).to_dict() == {
        "amount_usd": 12.5,
        "period": "monthly",
        "action": "block",
    }
    for bad in (
        {"amount_usd": -1},
        {"amount_usd": float("nan")},
        {"amount_usd": True},
        {"amount_usd": 5, "period": "hourly"},
        {"amount_usd": 5, "action": "panic"},
        {"amount_usd": 5, "extra": 1},
        {},
        {"amount_usd": "lots"},
    ):
        with pytest.raises(ValueError):
            SpendLimit.from_dict(bad)
