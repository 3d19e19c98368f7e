"""Write ``tests/data/store-v1.sqlite``: a job store made by the code before migrations existed.

The store's tests open this file with today's code to prove that a user's existing
``~/.simpletuner`` store survives an upgrade (issue 12). So the file must be written by the *old*
code, not by the code under test: this script takes ``client/store.py`` as it was at
``V1_COMMIT`` (``git show``), imports that copy under another name and drives its public API.
The clock is fixed so every timestamp in the file is known to the tests.

Run from the repository root (needs git and the repository's history)::

    .venv/bin/python tests/data/make_store_fixture.py          # writes tests/data/store-v1.sqlite

What the file holds (``tests/test_client_store.py`` asserts on exactly this):

- ``req-submitting``: a reservation still "submitting" (estimate $1.50), with an orphan event
  for ``orphan-id`` waiting for its bind (a webhook that beat the create response);
- ``proc-id``: "processing" with logs, step 40/100, loss 0.125, phase train;
- ``ok-id``: "succeeded", predict_time 118.5 s at $0.002/s (cost $0.237), an output, delivered
  to ``/tmp/out/ok-id``;
- ``fail-id``: "failed" with error "CUDA out of memory", 60 s from its timestamps ($0.12);
- ``cancel-id``: "canceled" before it started (cost 0);
- the webhook id ``msg_seen``.
"""

from __future__ import annotations

import importlib.util
import sqlite3
import subprocess
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script: the old store (and this file) import train.progress

from train.progress import format_progress  # noqa: E402

OUT = Path(__file__).resolve().parent / "store-v1.sqlite"
# The last commit before numbered migrations: its store writes schema version 1.
V1_COMMIT = "7186ab3"
T0 = 1714557600.0  # 2024-05-01T10:00:00Z
PRICE = 0.002


class _Clock:
    """Stands in for the ``time`` module inside the old store: one second per call from T0."""

    def __init__(self) -> None:
        self.now = T0

    def time(self) -> float:
        self.now += 1.0
        return self.now


def _load_v1_store(tmp: Path) -> types.ModuleType:
    source = subprocess.run(
        ["git", "show", f"{V1_COMMIT}:client/store.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    path = tmp / "store_v1.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("store_v1", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    module.time = _Clock()  # type: ignore[attr-defined]  # fixed timestamps in the file
    return module


def _remote(id: str, status: str, **extra) -> dict:
    obj = {
        "id": id,
        "model": "acme/trainer",
        "version": "v" * 64,
        "status": status,
        "logs": "",
        "input": {},
        "output": None,
        "error": None,
        "created_at": "2024-05-01T10:00:00Z",
        "started_at": None,
        "completed_at": None,
        "metrics": {},
    }
    obj.update(extra)
    return obj


def _progress(step: int, loss: float) -> str:
    return format_progress("train", step, 100, loss=loss, eta_s=60.0)


def _fill(store) -> None:
    job = {
        "provider": "replicate",
        "kind": "training",
        "model": "acme/trainer",
        "version": "v" * 64,
        "destination": "acme/out",
        "hardware": "gpu-h100",
        "estimate_usd": 1.0,
        "price_per_s": PRICE,
        "webhook": True,
        "input_json": {"steps": 100, "hf_token": "hf_" + "x" * 34},
    }
    for key, rid in (
        ("req-proc", "proc-id"),
        ("req-ok", "ok-id"),
        ("req-fail", "fail-id"),
        ("req-cancel", "cancel-id"),
    ):
        store.reserve(key, job)
        store.bind(key, rid, _remote(rid, "starting"))
    store.reserve("req-submitting", {**job, "estimate_usd": 1.5})

    logs = "booting\n" + _progress(20, 0.5) + "\n" + _progress(40, 0.125) + "\n"
    store.apply_remote(
        "proc-id", _remote("proc-id", "processing", logs=logs, started_at="2024-05-01T10:01:00Z"), "webhook"
    )
    store.apply_remote(
        "ok-id",
        _remote(
            "ok-id",
            "succeeded",
            logs=logs,
            output={"weights": "https://x/w.tar"},
            started_at="2024-05-01T10:01:00Z",
            completed_at="2024-05-01T10:03:00Z",
            metrics={"predict_time": 118.5},
        ),
        "webhook",
    )
    store.update("ok-id", local_dir="/tmp/out/ok-id", delivered=True)
    store.apply_remote(
        "fail-id",
        _remote(
            "fail-id",
            "failed",
            error="CUDA out of memory",
            started_at="2024-05-01T10:01:00Z",
            completed_at="2024-05-01T10:02:00Z",
        ),
        "poll",
    )
    store.apply_remote("cancel-id", _remote("cancel-id", "canceled"), "poll")
    early = _remote("orphan-id", "processing", logs=_progress(5, 1.0) + "\n")
    store.apply_remote("orphan-id", early, "webhook")  # before any bind: kept as an orphan
    store.seen_webhook("msg_seen")

    # one self-contained file: fold the WAL back in and drop free pages
    con = sqlite3.connect(str(store.path))
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.execute("VACUUM")
    con.close()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        v1 = _load_v1_store(Path(tmp))
        db = Path(tmp) / "jobs.db"
        _fill(v1.JobStore(db))
        OUT.write_bytes(db.read_bytes())
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
