"""Users' job stores survive upgrades: a store written by the code before migrations
(tests/data/store-v1.sqlite, made by tests/data/make_store_fixture.py) opens, lists and updates;
a new migration adds a column to a populated store; a failing one changes nothing; a store from a
newer client is refused."""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from client.migrations import MIGRATIONS, Migration, StoreVersionError
from client.store import JobStore
from train.progress import format_progress

FIXTURE = Path(__file__).parent / "data" / "store-v1.sqlite"
V1_IDS = {"proc-id", "ok-id", "fail-id", "cancel-id", "req-submitting"}


@pytest.fixture
def v1_path(tmp_path) -> Path:
    path = tmp_path / "jobs.db"
    shutil.copyfile(FIXTURE, path)  # never let a test write to the committed file
    return path


def _sql(path: Path, query: str) -> list[tuple]:
    con = sqlite3.connect(path)
    try:
        return con.execute(query).fetchall()
    finally:
        con.close()


def _version(path: Path) -> int:
    return _sql(path, "PRAGMA user_version")[0][0]


def _columns(path: Path, table: str = "jobs") -> list[str]:
    return [row[1] for row in _sql(path, f"PRAGMA table_info({table})")]


def _job(store: JobStore, id: str) -> dict[str, Any]:
    rec = store.get(id)
    assert rec is not None, id
    return rec


def _schema(path: Path) -> list[tuple]:
    return _sql(path, "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name")


def _add_notes(con: sqlite3.Connection) -> None:
    con.execute("ALTER TABLE jobs ADD COLUMN notes TEXT NOT NULL DEFAULT 'none'")


LATEST = len(MIGRATIONS)
NEXT = LATEST + 1  # a migration the code does not have yet (test only)
V2 = (*MIGRATIONS, Migration(NEXT, "jobs.notes (test only)", _add_notes))


# --------------------------------------------------------------------------- the v1 fixture


def test_v1_store_opens_with_every_job_intact(v1_path):
    store = JobStore(v1_path)
    assert _version(v1_path) == LATEST and store.schema_version == LATEST
    jobs = {j["id"]: j for j in store.list(limit=100)}
    assert all(j["parent_id"] is None and j["relation"] is None for j in jobs.values())  # migration 2
    assert set(jobs) == V1_IDS
    proc, ok, fail, cancel, pending = (
        jobs[i] for i in ("proc-id", "ok-id", "fail-id", "cancel-id", "req-submitting")
    )
    assert (proc["status"], proc["step"], proc["total"], proc["loss"], proc["phase"]) == (
        "processing",
        40,
        100,
        0.125,
        "train",
    )
    assert proc["started_at"] == "2024-05-01T10:01:00.000000Z" and "booting" in proc["logs_tail"]
    assert (ok["status"], ok["predict_time"], ok["cost_usd"]) == ("succeeded", 118.5, 0.237)
    assert json.loads(ok["output_json"]) == {"weights": "https://x/w.tar"}
    assert ok["delivered"] is True and ok["local_dir"] == "/tmp/out/ok-id" and ok["webhook"] is True
    assert (fail["status"], fail["error"], fail["cost_usd"]) == ("failed", "CUDA out of memory", 0.12)
    assert (cancel["status"], cancel["cost_usd"]) == ("canceled", 0.0)
    assert (pending["status"], pending["estimate_usd"]) == ("submitting", 1.5)
    assert json.loads(ok["input_json"]) == {"steps": 100}  # the old code had scrubbed the token
    assert ok["created_at"] == "2024-05-01T10:00:04.000000Z" and ok["request_key"] == "req-ok"
    # spend: the finished jobs' costs plus the unfinished jobs' estimates
    assert store.spend_between() == pytest.approx(0.237 + 0.12 + 0.0 + 1.0 + 1.5)
    assert store.spend_between("2024-05-01T00:00:00Z", "2024-05-02T00:00:00Z") == pytest.approx(
        0.237 + 0.12 + 1.0 + 1.5
    )
    assert [j["id"] for j in store.unfinished()] == ["proc-id"]
    assert _sql(v1_path, "SELECT id FROM webhook_ids") == [("msg_seen",)]


def test_v1_store_accepts_updates_events_and_its_waiting_orphan(v1_path):
    store = JobStore(v1_path)
    logs = _job(store, "proc-id")["logs_tail"] + format_progress("train", 60, 100, loss=0.0625) + "\n"
    newer = {"id": "proc-id", "status": "processing", "logs": logs}
    rec, changed = store.apply_remote("proc-id", newer, "webhook")
    assert changed and rec is not None and rec["step"] == 60 and rec["loss"] == 0.0625
    # shorter logs than the v1 code had stored are still recognised as old news
    old = {"id": "proc-id", "status": "processing", "logs": "booting\n"}
    rec, changed = store.apply_remote("proc-id", old, "poll")
    assert not changed and rec is not None and rec["step"] == 60
    done = {
        "id": "proc-id",
        "status": "succeeded",
        "metrics": {"predict_time": 10.0},
        "output": {"weights": "https://x/2.tar"},
    }
    rec, _ = store.apply_remote("proc-id", done, "webhook")
    assert rec is not None and rec["status"] == "succeeded" and rec["cost_usd"] == pytest.approx(0.02)
    assert store.update("fail-id", delivered=True)["delivered"] is True
    # the webhook that reached the v1 store before its bind is merged when the bind comes
    bound = store.bind("req-submitting", "orphan-id", {"id": "orphan-id", "status": "starting"})
    assert bound["status"] == "processing" and bound["step"] == 5
    assert _sql(v1_path, "SELECT count(*) FROM orphan_events") == [(0,)]
    assert store.seen_webhook("msg_new") is False and store.seen_webhook("msg_new") is True
    assert len(store.list(limit=100)) == len(V1_IDS)


def test_migration_1_is_the_schema_the_v1_code_wrote(v1_path, tmp_path):
    fresh = tmp_path / "fresh.db"
    JobStore(fresh, migrations=MIGRATIONS[:1])
    assert _schema(fresh) == _schema(v1_path)
    assert _version(fresh) == 1


# --------------------------------------------------------------------------- new migrations


def test_a_migration_adds_a_column_to_a_populated_store(v1_path):
    before = _sql(v1_path, "SELECT * FROM jobs ORDER BY id")
    store = JobStore(v1_path, migrations=V2)
    assert _version(v1_path) == NEXT and store.schema_version == NEXT
    assert _columns(v1_path)[-1] == "notes"
    after = _sql(v1_path, "SELECT * FROM jobs ORDER BY id")
    assert [row[: len(before[0])] for row in after] == before  # every old value kept
    assert {row[-1] for row in after} == {"none"}  # the default filled the existing rows
    # the code reads its own columns by name: an unknown column neither breaks nor leaks into records
    assert {j["id"] for j in store.list(limit=100)} == V1_IDS
    assert "notes" not in _job(store, "ok-id")
    store.reserve("req-new", {"kind": "prediction", "estimate_usd": 0.5})
    assert _sql(v1_path, "SELECT notes FROM jobs WHERE id = 'req-new'") == [("none",)]
    JobStore(v1_path, migrations=V2)  # reopening runs nothing twice
    assert _version(v1_path) == NEXT


def test_a_failing_migration_changes_nothing(v1_path):
    def broken(con: sqlite3.Connection) -> None:
        con.execute("UPDATE jobs SET status = 'failed'")
        raise RuntimeError("the next migration broke")

    schema, rows = _schema(v1_path), _sql(v1_path, "SELECT * FROM jobs ORDER BY id")
    with pytest.raises(RuntimeError, match="the next migration broke"):
        JobStore(v1_path, migrations=(*V2, Migration(NEXT + 1, "broken", broken)))
    # the migrations before had succeeded inside the same transaction: they are rolled back as well
    assert _version(v1_path) == 1 and _schema(v1_path) == schema
    assert _sql(v1_path, "SELECT * FROM jobs ORDER BY id") == rows
    assert {j["id"] for j in JobStore(v1_path).list(limit=100)} == V1_IDS


def test_stores_opened_at_once_migrate_once(v1_path):
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def open_store() -> None:
        barrier.wait()
        try:
            JobStore(v1_path, migrations=V2)  # a second ALTER TABLE ... ADD COLUMN notes would fail
        except BaseException as exc:  # noqa: B036 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and _version(v1_path) == NEXT and _columns(v1_path).count("notes") == 1


def test_a_store_from_a_newer_client_is_refused(v1_path):
    JobStore(v1_path, migrations=V2)
    with pytest.raises(StoreVersionError) as info:
        JobStore(v1_path)
    message = str(info.value)
    assert str(v1_path) in message and f"version {NEXT}" in message and f"up to {LATEST}" in message
    assert "upgrade advanced-trainer" in message
    assert (info.value.found, info.value.known) == (NEXT, LATEST)
    assert _version(v1_path) == NEXT and "notes" in _columns(v1_path)  # left as it was


def test_numbering_is_checked(tmp_path):
    with pytest.raises(AssertionError, match="numbered"):
        JobStore(tmp_path / "gap.db", migrations=(MIGRATIONS[0], Migration(NEXT + 1, "gap", _add_notes)))
