"""The client's job store: jobs, the cost ledger and webhook dedupe, in one SQLite file.

This module is the repository: the connection, the transactions and the SQL. What a job is and
how an event changes it are pure rules in ``client.records`` (``Job``, ``merge``); the schema and
its numbered migrations are in ``client.migrations`` (run when a store is opened).

Safe for several threads and processes at once: every call opens its own connection (so no
connection crosses a thread or a fork), the database runs in WAL mode, and every
read-modify-write is one ``BEGIN IMMEDIATE`` transaction (the write lock is taken before the
read, so two writers serialise instead of both acting on the same snapshot). The file is
created with mode 0600 (SQLite gives its ``-wal``/``-shm`` files the same mode).

Job records are plain dicts with the keys in ``FIELDS`` (their shape is ``records.Job``; the
methods say ``dict[str, Any]`` so callers that take a plain ``dict`` keep type-checking), read by
column name, so a column added by a newer migration never changes what older code reads.
``input_json``/``spec_json`` are scrubbed of anything secret-looking before they are written
(``scrub_secrets``).

Submitting a job::

    rec, decision = store.reserve(key, {...,"estimate_usd": 2.0}, **limit.reserve_kwargs())
    try:
        obj = replicate_client.trainings.create(...)     # the network call
    except Exception as e:
        store.release(key, str(e)); raise
    store.bind(key, obj.id, obj.dict())

Then webhooks and pollers call ``apply_remote(id, obj, source)`` in any order, any number of
times.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import stat
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from train.redaction import REDACTED, TOKEN_RE

from .migrations import MIGRATIONS, Migration, migrate
from .records import (
    FIELDS,
    KINDS,
    PROVIDERS,
    RELATIONS,
    SOURCES,
    STATUSES,
    TERMINAL,
    Job,
    StoredJob,
    finite,
    iso_utc,
    merge,
    orphan_rank,
    tail,
    touch,
)

__all__ = [
    "WEBHOOK_ID_RETENTION_S",
    "JobStore",
    "SpendDecision",
    "SpendLimitExceeded",
    "scrub_secrets",
]

WEBHOOK_ID_RETENTION_S = 3 * 24 * 3600  # Replicate's retries end about a minute after completion
BUSY_TIMEOUT_S = 30.0

_BOOL = ("webhook", "delivered")
_FLOAT = ("estimate_usd", "price_per_s", "predict_time", "cost_usd", "loss", "eta_s")
_INT = ("step", "total")
_TIME = ("created_at", "updated_at", "started_at", "completed_at", "last_event_at")
_JSON = ("spec_json", "input_json", "output_json")
# Named columns, never ``SELECT *``: what a row means to this code is FIELDS, whatever else
# later migrations add to the table.
_SELECT_JOB = f"SELECT {', '.join((*FIELDS, 'logs_len'))} FROM jobs"


# --------------------------------------------------------------------------- secret scrubbing

_SECRET_WORDS = {
    "token",
    "secret",
    "password",
    "passwd",
    "passphrase",
    "pwd",
    "key",
    "apikey",
    "credential",
    "credentials",
    "authorization",
    "auth",
    "cookie",
    "privatekey",
    "accesskey",
    "secretkey",
    "accesstoken",
    "authtoken",
    "apitoken",
    "signature",
}
_WORD_RE = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")


def _secret_name(name: Any) -> bool:
    if not isinstance(name, str):
        return False
    words = [w.lower() for w in _WORD_RE.findall(name)]
    compact = re.sub(r"[^a-z0-9]", "", name.lower())
    return any(w in _SECRET_WORDS for w in words) or compact in _SECRET_WORDS


def _scrub_url(text: str) -> str:
    """Drop ``user:pass@`` and blank secret-named query parameters of a URL."""
    try:
        parts = urlsplit(text)
    except ValueError:
        return text
    if not parts.scheme or not parts.netloc:
        return text
    netloc = parts.netloc.rsplit("@", 1)[-1] if "@" in parts.netloc else parts.netloc
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_secret_name(k) for k, _ in pairs):
            query = urlencode([(k, REDACTED if _secret_name(k) else v) for k, v in pairs])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _scrub(value: Any) -> tuple[bool, Any]:
    """(keep, scrubbed value)."""
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if _secret_name(k):
                continue
            keep, v2 = _scrub(v)
            if keep:
                out[k] = v2
        return True, out
    if isinstance(value, (list, tuple)):
        items = []
        for v in value:
            keep, v2 = _scrub(v)
            items.append(v2 if keep else REDACTED)
        return True, items
    if isinstance(value, str):
        s = value.strip()
        if s[:1] in "{[" and len(s) < 1_000_000:  # JSON nested in a string (the "spec" input)
            try:
                inner = json.loads(s)
            except ValueError:
                inner = None
            if isinstance(inner, (dict, list)):
                _, cleaned = _scrub(inner)
                if cleaned != inner:
                    return True, json.dumps(cleaned)
                return True, value
        if TOKEN_RE.search(value):
            return False, None
        if "://" in value and "@" in value or "?" in value and "://" in value:
            return True, _scrub_url(value)
        return True, value
    return True, value


def scrub_secrets(value: Any) -> Any:
    """A copy of a JSON value without secrets: keys named like token/secret/password/key/auth
    (``hf_token``, ``s3_secret_access_key``, ``apiKey``...) are dropped, as are values that look
    like credentials (``r8_…``, ``hf_…``, AWS key ids, ``whsec_…``, private keys); in lists they
    become ``REDACTED`` (the marker of ``train.redaction``). URL user-info and secret-named query
    parameters are removed."""
    keep, out = _scrub(value)
    return out if keep else REDACTED


# --------------------------------------------------------------------------- public types


@dataclass(frozen=True)
class SpendDecision:
    """The spend check made by ``reserve``. ``status`` is "ok" or "warn" (a blocked
    reservation raises ``SpendLimitExceeded`` carrying the same figures)."""

    status: str
    spent_usd: float
    estimate_usd: float
    limit_usd: float | None
    period_start: str | None
    action: str = "block"
    existing: bool = False  # the request key was already reserved; nothing new was counted

    @property
    def over(self) -> bool:
        return self.limit_usd is not None and self.spent_usd + self.estimate_usd > self.limit_usd + 1e-9

    @property
    def remaining_usd(self) -> float | None:
        return None if self.limit_usd is None else self.limit_usd - self.spent_usd

    @property
    def message(self) -> str:
        since = f" since {self.period_start}" if self.period_start else ""
        if self.limit_usd is None:
            return f"spent ${self.spent_usd:.2f}{since}; estimate ${self.estimate_usd:.2f}; no limit"
        verb = "exceeds" if self.over else "within"
        return (
            f"spent ${self.spent_usd:.2f}{since} + estimate ${self.estimate_usd:.2f} "
            f"= ${self.spent_usd + self.estimate_usd:.2f} {verb} limit ${self.limit_usd:.2f}"
        )


class SpendLimitExceeded(Exception):
    def __init__(self, decision: SpendDecision):
        self.decision = decision
        self.spent_usd = decision.spent_usd
        self.estimate_usd = decision.estimate_usd
        self.limit_usd = decision.limit_usd
        self.period_start = decision.period_start
        super().__init__("spend limit exceeded: " + decision.message)


# --------------------------------------------------------------------------- the store


def _private_file(path: Path) -> None:
    """Create ``path`` 0600 (its folder 0700), tighten a loose existing one and its WAL files:
    the store holds job inputs and the spend ledger."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        st = os.fstat(fd)
        if stat.S_IMODE(st.st_mode) != 0o600 and st.st_uid == os.getuid():
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):
        side = Path(str(path) + suffix)
        if side.exists() and stat.S_IMODE(side.stat().st_mode) & 0o077:
            with contextlib.suppress(OSError):
                os.chmod(side, 0o600)


class JobStore:
    """Jobs, cost ledger and webhook dedupe in one SQLite file (see the module docstring).

    Opening migrates the file to the newest schema (``client.migrations``; ``migrations`` is for
    tests) and refuses one written by a newer client (``StoreVersionError``)."""

    def __init__(self, path: Path | str, *, migrations: Sequence[Migration] = MIGRATIONS):
        self.path = Path(path).expanduser()
        _private_file(self.path)
        con = self._connect()
        try:
            mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"could not switch {self.path} to WAL (got {mode})")
            self.schema_version = migrate(con, self.path, migrations)
        finally:
            con.close()

    # -- plumbing
    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_S, isolation_level=None)
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA synchronous=NORMAL")
        con.execute("PRAGMA foreign_keys=ON")
        return con

    @contextlib.contextmanager
    def _tx(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield con
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
        finally:
            con.close()

    @staticmethod
    def _row(con: sqlite3.Connection, column: str, value: Any) -> sqlite3.Row | None:
        assert column in ("id", "request_key")  # the two keys; never user text in the SQL
        return con.execute(f"{_SELECT_JOB} WHERE {column} = ?", (value,)).fetchone()

    @staticmethod
    def _set(con: sqlite3.Connection, id: str, changes: Mapping[str, Any]) -> None:
        names = list(changes)  # validated column names (FIELDS and logs_len), never user keys
        con.execute(
            f"UPDATE jobs SET {', '.join(f'{n} = ?' for n in names)} WHERE id = ?",
            [changes[n] for n in names] + [id],
        )

    @staticmethod
    def _record(row: sqlite3.Row | Mapping[str, Any]) -> Job:
        rec = {name: row[name] for name in FIELDS}
        for name in _BOOL:
            rec[name] = bool(rec[name])
        return cast(Job, rec)

    def _maybe_record(self, row: sqlite3.Row | None) -> Job | None:
        return None if row is None else self._record(row)

    def _fetch(self, con: sqlite3.Connection, column: str, value: Any) -> Job:
        row = self._row(con, column, value)
        assert row is not None, f"job {column}={value!r} vanished inside its own transaction"
        return self._record(row)

    @staticmethod
    def _now() -> str:
        return cast(str, iso_utc(time.time()))

    @staticmethod
    def _check_vocabulary(name: str, value: Any) -> None:
        if name == "status" and value not in STATUSES:
            raise ValueError(f"bad status {value!r}")
        if name == "provider" and value not in PROVIDERS:
            raise ValueError(f"bad provider {value!r} (one of {PROVIDERS})")
        if name == "kind" and value not in KINDS:
            raise ValueError(f"bad kind {value!r} (one of {KINDS})")
        if name == "relation" and value is not None and value not in RELATIONS:
            raise ValueError(f"bad relation {value!r} (one of {RELATIONS})")

    @staticmethod
    def _json_text(name: str, value: Any) -> str:
        if isinstance(value, str):
            try:
                parsed = json.loads(value)
            except ValueError:
                raise ValueError(f"{name} must be JSON text") from None
        else:
            parsed = value
        if name in ("input_json", "spec_json"):
            parsed = scrub_secrets(parsed)
        return json.dumps(parsed, sort_keys=False, default=str)

    @classmethod
    def _clean(cls, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Validate and convert field values for writing."""
        out: dict[str, Any] = {}
        for name, value in fields.items():
            if name not in FIELDS:
                raise ValueError(f"unknown job field: {name!r}")
            cls._check_vocabulary(name, value)
            if name in _BOOL:
                value = 1 if value else 0
            elif name in _FLOAT and value is not None:
                if finite(value) is None:
                    raise ValueError(f"{name} must be a finite number, got {value!r}")
                value = float(value)
            elif name in _INT and value is not None:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"{name} must be an integer, got {value!r}")
            elif name in _TIME and value is not None:
                iso = iso_utc(value)
                if iso is None:
                    raise ValueError(f"{name}: not a timestamp: {value!r}")
                value = iso
            elif name in _JSON and value is not None:
                value = cls._json_text(name, value)
            elif name == "logs_tail" and value is not None:
                value = tail(str(value))
            out[name] = value
        return out

    @staticmethod
    def _spend(con: sqlite3.Connection, start: str | None, end: str | None) -> float:
        """Finished jobs count their cost (their estimate when the cost is unknown) in the
        period of their completion; unfinished jobs count their estimate when created before
        ``end``."""
        terminal = ",".join(f"'{s}'" for s in TERMINAL)
        start = start or "0000"
        end = end or "9999"
        row = con.execute(
            f"""SELECT COALESCE(SUM(CASE WHEN status IN ({terminal})
                                         THEN COALESCE(cost_usd, estimate_usd, 0)
                                         ELSE COALESCE(estimate_usd, 0) END), 0)
                FROM jobs
                WHERE (status IN ({terminal})
                       AND COALESCE(completed_at, updated_at) >= ? AND COALESCE(completed_at, updated_at) < ?)
                   OR (status NOT IN ({terminal}) AND created_at < ?)""",
            (start, end, end),
        ).fetchone()
        return float(row[0])

    # -- reservations
    def reserve(
        self,
        request_key: str,
        record: Mapping[str, Any],
        *,
        limit_usd: float | None = None,
        period_start: Any = None,
        action: str = "block",
    ) -> tuple[Job, SpendDecision]:
        """Check the spend limit and insert the job as "submitting" (id = ``request_key``), in one
        transaction. Raises ``SpendLimitExceeded`` when ``action == "block"`` and spend in the
        period plus this job's ``estimate_usd`` would exceed ``limit_usd``. Reserving a key
        again returns the existing job (``decision.existing``) and counts nothing new."""
        if not isinstance(request_key, str) or not request_key or len(request_key) > 200:
            raise ValueError("request_key must be a non-empty string of at most 200 characters")
        if action not in ("warn", "block"):
            raise ValueError(f"action must be warn or block, got {action!r}")
        if limit_usd is not None and (finite(limit_usd) is None or limit_usd < 0):
            raise ValueError(f"limit_usd must be a finite number >= 0, got {limit_usd!r}")
        start = iso_utc(period_start)
        if period_start is not None and start is None:
            raise ValueError(f"period_start is not a timestamp: {period_start!r}")
        ours = ("id", "request_key", "status", "created_at", "updated_at")  # set here, not by the caller
        fields = {k: v for k, v in record.items() if k not in ours}
        fields.setdefault("provider", "replicate")
        fields.setdefault("kind", "training")
        now = self._now()
        fields.update(
            id=request_key, request_key=request_key, status="submitting", created_at=now, updated_at=now
        )
        clean = self._clean(fields)
        estimate = clean.get("estimate_usd") or 0.0
        with self._tx() as con:
            row = self._row(con, "request_key", request_key)
            spent = self._spend(con, start, None)
            if row is not None:
                rec = self._record(row)
                return rec, SpendDecision(
                    "ok", spent, rec["estimate_usd"] or 0.0, limit_usd, start, action, existing=True
                )
            if con.execute("SELECT 1 FROM jobs WHERE id = ?", (request_key,)).fetchone():
                raise ValueError(f"request_key {request_key!r} collides with a job id")
            limit = None if limit_usd is None else float(limit_usd)
            decision = SpendDecision("ok", spent, estimate, limit, start, action)
            if decision.over:
                if action == "block":
                    raise SpendLimitExceeded(decision)
                decision = SpendDecision("warn", spent, estimate, decision.limit_usd, start, action)
            names = list(clean)
            con.execute(
                f"INSERT INTO jobs ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                [clean[n] for n in names],
            )
            rec = self._fetch(con, "id", request_key)
        return rec, decision

    def bind(self, request_key: str, remote_id: str, remote_object: Mapping[str, Any] | None = None) -> Job:
        """The reservation becomes the provider's job ``remote_id``; ``remote_object`` (the create
        response) and any webhook that arrived before this call are merged in."""
        if not isinstance(remote_id, str) or not remote_id:
            raise ValueError("remote_id must be a non-empty string")
        with self._tx() as con:
            row = self._row(con, "request_key", request_key)
            if row is None:
                raise KeyError(f"no reservation {request_key!r}")
            if row["id"] not in (request_key, remote_id):
                raise ValueError(f"reservation {request_key!r} is already bound to {row['id']!r}")
            if row["id"] != remote_id:
                if row["status"] != "submitting":
                    raise ValueError(f"reservation {request_key!r} was released ({row['status']})")
                if con.execute("SELECT 1 FROM jobs WHERE id = ?", (remote_id,)).fetchone():
                    raise ValueError(f"job {remote_id!r} already exists")
                con.execute(
                    "UPDATE jobs SET id = ?, updated_at = ? WHERE request_key = ?",
                    (remote_id, self._now(), request_key),
                )
            if remote_object is not None:
                self._apply(con, remote_id, remote_object, "create")
            orphan = con.execute("SELECT obj_json FROM orphan_events WHERE id = ?", (remote_id,)).fetchone()
            if orphan is not None:
                self._apply(con, remote_id, json.loads(orphan[0]), "webhook")
                con.execute("DELETE FROM orphan_events WHERE id = ?", (remote_id,))
            return self._fetch(con, "id", remote_id)

    def release(self, request_key: str, error: str) -> Job:
        """The submission failed: mark a still-"submitting" reservation failed at zero cost so it
        stops counting. A job that was already bound is returned unchanged."""
        now = self._now()
        with self._tx() as con:
            row = self._row(con, "request_key", request_key)
            if row is None:
                raise KeyError(f"no reservation {request_key!r}")
            if row["status"] == "submitting":
                con.execute(
                    "UPDATE jobs SET status = 'failed', error = ?, completed_at = ?, updated_at = ?,"
                    " cost_usd = 0, predict_time = 0 WHERE request_key = ?",
                    (str(error), now, now, request_key),
                )
                return self._fetch(con, "request_key", request_key)
            return self._record(row)

    # -- remote updates
    def apply_remote(self, id: str, obj: Mapping[str, Any], source: str) -> tuple[Job | None, bool]:
        """Merge a Replicate prediction/training object (from a webhook or a poll).

        Order- and duplicate-proof (the rules are ``client.records.merge``): the status only
        moves forward and the first terminal status is final; logs are cumulative; on a terminal
        status ``cost_usd = predict_time * price_per_s``. Returns ``(record, changed)``; for an
        id not in the store the event is kept for ``bind`` and ``(None, False)`` is returned.
        """
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if not isinstance(obj, Mapping):
            raise TypeError("obj must be a mapping (the decoded JSON object)")
        with self._tx() as con:
            return self._apply(con, id, obj, source)

    def _apply(
        self, con: sqlite3.Connection, id: str, obj: Mapping[str, Any], source: str
    ) -> tuple[Job | None, bool]:
        now = time.time()
        row = self._row(con, "id", id)
        if row is None:
            self._keep_orphan(con, id, obj, now)
            return None, False
        job = cast(StoredJob, dict(row))
        changes = merge(job, obj, source, now)
        if not changes:
            # an event that changed nothing still records when it came (pollers back off on it)
            stamp = touch(source, now)
            if stamp:
                self._set(con, id, stamp)
            return self._record({**job, **stamp}), False
        self._set(con, id, changes)
        return self._fetch(con, "id", id), True

    @staticmethod
    def _keep_orphan(con: sqlite3.Connection, id: str, obj: Mapping[str, Any], now: float) -> None:
        rank, logs_len = orphan_rank(obj)
        old = con.execute("SELECT rank, logs_len FROM orphan_events WHERE id = ?", (id,)).fetchone()
        if old is not None and (old[0], old[1]) >= (rank, logs_len):
            return
        con.execute(
            "INSERT OR REPLACE INTO orphan_events (id, received_at, rank, logs_len, obj_json)"
            " VALUES (?, ?, ?, ?, ?)",
            (id, now, rank, logs_len, json.dumps(dict(obj), default=str)),
        )

    # -- webhook dedupe
    def seen_webhook(self, webhook_id: str) -> bool:
        """Record a (verified) webhook id; True when it had been recorded already (a replay or a
        retry). Ids and orphan events older than ``WEBHOOK_ID_RETENTION_S`` are pruned."""
        if not isinstance(webhook_id, str) or not webhook_id:
            raise ValueError("webhook_id must be a non-empty string")
        now = time.time()
        with self._tx() as con:
            con.execute("DELETE FROM webhook_ids WHERE received_at < ?", (now - WEBHOOK_ID_RETENTION_S,))
            con.execute("DELETE FROM orphan_events WHERE received_at < ?", (now - WEBHOOK_ID_RETENTION_S,))
            cur = con.execute(
                "INSERT OR IGNORE INTO webhook_ids (id, received_at) VALUES (?, ?)", (webhook_id, now)
            )
            return cur.rowcount == 0

    def forget_webhook(self, webhook_id: str) -> None:
        """Un-record an id whose processing failed, so the provider's retry is accepted."""
        with self._tx() as con:
            con.execute("DELETE FROM webhook_ids WHERE id = ?", (webhook_id,))

    # -- queries and edits
    def get(self, id: str) -> Job | None:
        with self._tx(write=False) as con:
            return self._maybe_record(self._row(con, "id", id))

    def get_by_request_key(self, request_key: str) -> Job | None:
        with self._tx(write=False) as con:
            return self._maybe_record(self._row(con, "request_key", request_key))

    def list(self, limit: int = 50, status: str | Iterable[str] | None = None) -> list[Job]:
        """Newest first; ``status`` is one status or several."""
        sql, args = _SELECT_JOB, []
        if status is not None:
            wanted = [status] if isinstance(status, str) else list(status)
            sql += f" WHERE status IN ({', '.join('?' * len(wanted))})"
            args += wanted
        sql += " ORDER BY created_at DESC, rowid DESC LIMIT ?"
        args.append(int(limit))
        with self._tx(write=False) as con:
            return [self._record(r) for r in con.execute(sql, args).fetchall()]

    def update(self, id: str, /, **fields: Any) -> Job:
        """Set fields directly (local bookkeeping: ``local_dir``, ``delivered``, ``webhook``...).
        ``id`` and ``request_key`` cannot change here; ``input_json``/``spec_json`` are scrubbed."""
        if "id" in fields or "request_key" in fields:
            raise ValueError("id and request_key cannot be updated")
        clean = self._clean(fields)
        clean.setdefault("updated_at", self._now())
        with self._tx() as con:
            if con.execute("SELECT 1 FROM jobs WHERE id = ?", (id,)).fetchone() is None:
                raise KeyError(f"no job {id!r}")
            if "logs_tail" in clean:
                clean["logs_len"] = len(clean["logs_tail"] or "")
            self._set(con, id, clean)
            return self._fetch(con, "id", id)

    def stale_reservations(self, older_than_s: float) -> list[Job]:
        """Reservations still "submitting" after ``older_than_s`` seconds, oldest first: their
        submitting process stopped between reserving and binding (a submit takes seconds)."""
        cutoff = iso_utc(time.time() - older_than_s)
        with self._tx(write=False) as con:
            rows = con.execute(
                f"{_SELECT_JOB} WHERE status = 'submitting' AND created_at <= ? ORDER BY created_at ASC",
                (cutoff,),
            ).fetchall()
            return [self._record(r) for r in rows]

    def unfinished(self) -> list[Job]:
        """Jobs a poller should follow: bound and not terminal ("starting"/"processing"), oldest
        first. Reservations still "submitting" have no provider id to poll."""
        with self._tx(write=False) as con:
            rows = con.execute(
                f"{_SELECT_JOB} WHERE status IN ('starting', 'processing') ORDER BY created_at ASC"
            ).fetchall()
            return [self._record(r) for r in rows]

    def spend_between(self, start: Any = None, end: Any = None) -> float:
        """USD in [start, end): finished jobs by completion time (cost, or estimate when the cost
        is unknown), plus the estimates of unfinished jobs created before ``end``."""
        s, e = iso_utc(start), iso_utc(end)
        if (start is not None and s is None) or (end is not None and e is None):
            raise ValueError("start and end must be timestamps")
        with self._tx(write=False) as con:
            return self._spend(con, s, e)
