"""The client's job store: jobs, the cost ledger and webhook dedupe, in one SQLite file.

Safe for several threads and processes at once: every call opens its own connection (so no
connection crosses a thread or a fork), the database runs in WAL mode, and every
read-modify-write is one ``BEGIN IMMEDIATE`` transaction (the write lock is taken before the
read, so two writers serialise instead of both acting on the same snapshot). The file is
created with mode 0600 (SQLite gives its ``-wal``/``-shm`` files the same mode).

Job records are plain dicts with the keys in ``FIELDS``. Timestamps are UTC ISO-8601 strings
in one fixed format (``2024-05-01T12:00:00.000000Z``), so they sort as text. ``spec_json``,
``input_json`` and ``output_json`` are JSON text; ``input_json``/``spec_json`` are scrubbed of
anything secret-looking before they are written (``scrub_secrets``).

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
import math
import os
import re
import sqlite3
import stat
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from train.progress import last_progress, parse_progress_line

__all__ = [
    "FIELDS", "STATUSES", "TERMINAL", "UNFINISHED", "LOGS_TAIL_CHARS", "WEBHOOK_ID_RETENTION_S",
    "JobStore", "SpendDecision", "SpendLimitExceeded", "scrub_secrets", "iso_utc",
]

FIELDS = (
    "id", "provider", "kind", "model", "version", "destination", "hardware", "status",
    "created_at", "updated_at", "started_at", "completed_at", "spec_json", "input_json",
    "estimate_usd", "price_per_s", "predict_time", "cost_usd", "output_json", "error",
    "logs_tail", "step", "total", "loss", "eta_s", "phase", "webhook", "last_event_at",
    "local_dir", "delivered", "request_key",
)
STATUSES = ("submitting", "starting", "processing", "succeeded", "failed", "canceled")
TERMINAL = ("succeeded", "failed", "canceled")
UNFINISHED = ("submitting", "starting", "processing")
PROVIDERS = ("replicate", "cog")
KINDS = ("prediction", "training")
SOURCES = ("webhook", "poll", "create")
_RANK = {"submitting": 0, "starting": 1, "processing": 2, "succeeded": 3, "failed": 3, "canceled": 3}

LOGS_TAIL_CHARS = 8192
WEBHOOK_ID_RETENTION_S = 3 * 24 * 3600  # Replicate's retries end about a minute after completion
BUSY_TIMEOUT_S = 30.0
_SCHEMA_VERSION = 1

_COLUMNS = {
    "id": "TEXT PRIMARY KEY", "provider": "TEXT NOT NULL", "kind": "TEXT NOT NULL",
    "model": "TEXT", "version": "TEXT", "destination": "TEXT", "hardware": "TEXT",
    "status": "TEXT NOT NULL", "created_at": "TEXT NOT NULL", "updated_at": "TEXT NOT NULL",
    "started_at": "TEXT", "completed_at": "TEXT", "spec_json": "TEXT", "input_json": "TEXT",
    "estimate_usd": "REAL", "price_per_s": "REAL", "predict_time": "REAL", "cost_usd": "REAL",
    "output_json": "TEXT", "error": "TEXT", "logs_tail": "TEXT", "step": "INTEGER",
    "total": "INTEGER", "loss": "REAL", "eta_s": "REAL", "phase": "TEXT",
    "webhook": "INTEGER NOT NULL DEFAULT 0", "last_event_at": "TEXT", "local_dir": "TEXT",
    "delivered": "INTEGER NOT NULL DEFAULT 0", "request_key": "TEXT NOT NULL UNIQUE",
}
_BOOL = ("webhook", "delivered")
_FLOAT = ("estimate_usd", "price_per_s", "predict_time", "cost_usd", "loss", "eta_s")
_INT = ("step", "total")
_TIME = ("created_at", "updated_at", "started_at", "completed_at", "last_event_at")
_JSON = ("spec_json", "input_json", "output_json")


# --------------------------------------------------------------------------- helpers

_TS_RE = re.compile(r"^(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2}(?::\d{2})?)(?:\.(\d+))?(Z|[+-]\d{2}:?\d{2})?$")


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
        m = _TS_RE.match(value.strip())
        if not m:
            return None
        date, clock, frac, tz = m.groups()
        if clock.count(":") == 1:
            clock += ":00"
        frac = ((frac or "") + "000000")[:6]
        if tz in (None, "Z"):
            tz = "+00:00"
        elif ":" not in tz:
            tz = tz[:3] + ":" + tz[3:]
        try:
            dt = datetime.fromisoformat(f"{date}T{clock}.{frac}{tz}")
        except ValueError:
            return None
    else:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _epoch(iso: str | None) -> float | None:
    if not iso:
        return None
    return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


# Secret scrubbing ---------------------------------------------------------

_SECRET_WORDS = {"token", "secret", "password", "passwd", "passphrase", "pwd", "key", "apikey",
                 "credential", "credentials", "authorization", "auth", "cookie", "privatekey",
                 "accesskey", "secretkey", "accesstoken", "authtoken", "apitoken", "signature"}
_WORD_RE = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
_SECRET_VALUE_RE = re.compile(
    r"(?<![A-Za-z0-9])(?:r8_[A-Za-z0-9]{20,}|hf_[A-Za-z0-9]{20,}|whsec_[A-Za-z0-9+/=]{16,}"
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|xox[abpr]-[A-Za-z0-9-]{10,}"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----)")
_REDACTED = "[redacted]"


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
            query = urlencode([(k, _REDACTED if _secret_name(k) else v) for k, v in pairs])
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
            items.append(v2 if keep else _REDACTED)
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
        if _SECRET_VALUE_RE.search(value):
            return False, None
        if "://" in value and "@" in value or "?" in value and "://" in value:
            return True, _scrub_url(value)
        return True, value
    return True, value


def scrub_secrets(value: Any) -> Any:
    """A copy of a JSON value without secrets: keys named like token/secret/password/key/auth
    (``hf_token``, ``s3_secret_access_key``, ``apiKey``...) are dropped, as are values that look
    like credentials (``r8_…``, ``hf_…``, AWS key ids, ``whsec_…``, private keys); in lists they
    become ``"[redacted]"``. URL user-info and secret-named query parameters are removed."""
    keep, out = _scrub(value)
    return out if keep else _REDACTED


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
        return (f"spent ${self.spent_usd:.2f}{since} + estimate ${self.estimate_usd:.2f} "
                f"= ${self.spent_usd + self.estimate_usd:.2f} {verb} limit ${self.limit_usd:.2f}")


class SpendLimitExceeded(Exception):
    def __init__(self, decision: SpendDecision):
        self.decision = decision
        self.spent_usd = decision.spent_usd
        self.estimate_usd = decision.estimate_usd
        self.limit_usd = decision.limit_usd
        self.period_start = decision.period_start
        super().__init__("spend limit exceeded: " + decision.message)


# --------------------------------------------------------------------------- the store

def _map_status(value: Any) -> str | None:
    if value == "aborted":  # newer API; ended before it started
        return "canceled"
    return value if value in _RANK and value != "submitting" else None


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _tail(logs: str) -> str:
    if len(logs) <= LOGS_TAIL_CHARS:
        return logs
    tail = logs[-LOGS_TAIL_CHARS:]
    nl = tail.find("\n", 0, 1024)
    return tail[nl + 1:] if nl >= 0 else tail


class JobStore:
    """Jobs, cost ledger and webhook dedupe in one SQLite file (see the module docstring)."""

    def __init__(self, path: Path | str):
        self.path = Path(path).expanduser()
        if not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            st = os.fstat(fd)
            if stat.S_IMODE(st.st_mode) != 0o600 and st.st_uid == os.getuid():
                os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        for suffix in ("-wal", "-shm"):
            side = Path(str(self.path) + suffix)
            if side.exists() and stat.S_IMODE(side.stat().st_mode) & 0o077:
                with contextlib.suppress(OSError):
                    os.chmod(side, 0o600)
        con = self._connect()
        try:
            mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"could not switch {self.path} to WAL (got {mode})")
            con.execute("BEGIN IMMEDIATE")
            cols = ",\n  ".join(f"{name} {decl}" for name, decl in _COLUMNS.items())
            con.execute(f"CREATE TABLE IF NOT EXISTS jobs (\n  {cols},\n  logs_len INTEGER NOT NULL DEFAULT 0\n)")
            con.execute("CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status)")
            con.execute("CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created_at)")
            con.execute("CREATE TABLE IF NOT EXISTS webhook_ids (id TEXT PRIMARY KEY, received_at REAL NOT NULL)")
            con.execute("CREATE INDEX IF NOT EXISTS webhook_ids_received ON webhook_ids(received_at)")
            # events for ids not (yet) in jobs, e.g. a webhook that beats bind(): the best one per id
            con.execute("CREATE TABLE IF NOT EXISTS orphan_events (id TEXT PRIMARY KEY, received_at REAL NOT NULL,"
                        " rank INTEGER NOT NULL, logs_len INTEGER NOT NULL, obj_json TEXT NOT NULL)")
            if con.execute("PRAGMA user_version").fetchone()[0] == 0:
                con.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            con.execute("COMMIT")
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
    def _record(row: sqlite3.Row | None) -> dict[str, Any] | None:
        if row is None:
            return None
        rec = {name: row[name] for name in FIELDS}
        for name in _BOOL:
            rec[name] = bool(rec[name])
        return rec

    @staticmethod
    def _now() -> str:
        return iso_utc(time.time())

    @staticmethod
    def _clean(fields: Mapping[str, Any]) -> dict[str, Any]:
        """Validate and convert field values for writing."""
        out: dict[str, Any] = {}
        for name, value in fields.items():
            if name not in _COLUMNS:
                raise ValueError(f"unknown job field: {name!r}")
            if name == "status" and value not in STATUSES:
                raise ValueError(f"bad status {value!r}")
            if name == "provider" and value not in PROVIDERS:
                raise ValueError(f"bad provider {value!r} (one of {PROVIDERS})")
            if name == "kind" and value not in KINDS:
                raise ValueError(f"bad kind {value!r} (one of {KINDS})")
            if name in _BOOL:
                value = 1 if value else 0
            elif name in _FLOAT and value is not None:
                if _num(value) is None:
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
                if isinstance(value, str):
                    try:
                        parsed = json.loads(value)
                    except ValueError:
                        raise ValueError(f"{name} must be JSON text") from None
                else:
                    parsed = value
                if name in ("input_json", "spec_json"):
                    parsed = scrub_secrets(parsed)
                value = json.dumps(parsed, sort_keys=False, default=str)
            elif name == "logs_tail" and value is not None:
                value = _tail(str(value))
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
            (start, end, end)).fetchone()
        return float(row[0])

    # -- reservations
    def reserve(self, request_key: str, record: Mapping[str, Any], *, limit_usd: float | None = None,
                period_start: Any = None, action: str = "block") -> tuple[dict[str, Any], SpendDecision]:
        """Check the spend limit and insert the job as "submitting" (id = ``request_key``), in one
        transaction. Raises ``SpendLimitExceeded`` when ``action == "block"`` and spend in the
        period plus this job's ``estimate_usd`` would exceed ``limit_usd``. Reserving a key
        again returns the existing job (``decision.existing``) and counts nothing new."""
        if not isinstance(request_key, str) or not request_key or len(request_key) > 200:
            raise ValueError("request_key must be a non-empty string of at most 200 characters")
        if action not in ("warn", "block"):
            raise ValueError(f"action must be warn or block, got {action!r}")
        if limit_usd is not None and (_num(limit_usd) is None or limit_usd < 0):
            raise ValueError(f"limit_usd must be a finite number >= 0, got {limit_usd!r}")
        start = iso_utc(period_start)
        if period_start is not None and start is None:
            raise ValueError(f"period_start is not a timestamp: {period_start!r}")
        fields = {k: v for k, v in record.items() if k not in ("id", "request_key", "status", "created_at", "updated_at")}
        fields.setdefault("provider", "replicate")
        fields.setdefault("kind", "training")
        now = self._now()
        fields.update(id=request_key, request_key=request_key, status="submitting", created_at=now, updated_at=now)
        clean = self._clean(fields)
        estimate = clean.get("estimate_usd") or 0.0
        with self._tx() as con:
            row = con.execute("SELECT * FROM jobs WHERE request_key = ?", (request_key,)).fetchone()
            spent = self._spend(con, start, None)
            if row is not None:
                rec = self._record(row)
                return rec, SpendDecision("ok", spent, rec["estimate_usd"] or 0.0, limit_usd, start, action, True)
            if con.execute("SELECT 1 FROM jobs WHERE id = ?", (request_key,)).fetchone():
                raise ValueError(f"request_key {request_key!r} collides with a job id")
            decision = SpendDecision("ok", spent, estimate, None if limit_usd is None else float(limit_usd), start, action)
            if decision.over:
                if action == "block":
                    raise SpendLimitExceeded(decision)
                decision = SpendDecision("warn", spent, estimate, decision.limit_usd, start, action)
            names = list(clean)
            con.execute(f"INSERT INTO jobs ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                        [clean[n] for n in names])
            rec = self._record(con.execute("SELECT * FROM jobs WHERE id = ?", (request_key,)).fetchone())
        return rec, decision

    def bind(self, request_key: str, remote_id: str, remote_object: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The reservation becomes the provider's job ``remote_id``; ``remote_object`` (the create
        response) and any webhook that arrived before this call are merged in."""
        if not isinstance(remote_id, str) or not remote_id:
            raise ValueError("remote_id must be a non-empty string")
        with self._tx() as con:
            row = con.execute("SELECT * FROM jobs WHERE request_key = ?", (request_key,)).fetchone()
            if row is None:
                raise KeyError(f"no reservation {request_key!r}")
            if row["id"] not in (request_key, remote_id):
                raise ValueError(f"reservation {request_key!r} is already bound to {row['id']!r}")
            if row["id"] != remote_id:
                if row["status"] != "submitting":
                    raise ValueError(f"reservation {request_key!r} was released ({row['status']})")
                if con.execute("SELECT 1 FROM jobs WHERE id = ?", (remote_id,)).fetchone():
                    raise ValueError(f"job {remote_id!r} already exists")
                con.execute("UPDATE jobs SET id = ?, updated_at = ? WHERE request_key = ?",
                            (remote_id, self._now(), request_key))
            if remote_object is not None:
                self._apply(con, remote_id, remote_object, "create")
            orphan = con.execute("SELECT obj_json FROM orphan_events WHERE id = ?", (remote_id,)).fetchone()
            if orphan is not None:
                self._apply(con, remote_id, json.loads(orphan[0]), "webhook")
                con.execute("DELETE FROM orphan_events WHERE id = ?", (remote_id,))
            return self._record(con.execute("SELECT * FROM jobs WHERE id = ?", (remote_id,)).fetchone())

    def release(self, request_key: str, error: str) -> dict[str, Any]:
        """The submission failed: mark a still-"submitting" reservation failed at zero cost so it
        stops counting. A job that was already bound is returned unchanged."""
        now = self._now()
        with self._tx() as con:
            row = con.execute("SELECT * FROM jobs WHERE request_key = ?", (request_key,)).fetchone()
            if row is None:
                raise KeyError(f"no reservation {request_key!r}")
            if row["status"] == "submitting":
                con.execute("UPDATE jobs SET status = 'failed', error = ?, completed_at = ?, updated_at = ?,"
                            " cost_usd = 0, predict_time = 0 WHERE request_key = ?",
                            (str(error), now, now, request_key))
                row = con.execute("SELECT * FROM jobs WHERE request_key = ?", (request_key,)).fetchone()
            return self._record(row)

    # -- remote updates
    def apply_remote(self, id: str, obj: Mapping[str, Any], source: str) -> tuple[dict[str, Any] | None, bool]:
        """Merge a Replicate prediction/training object (from a webhook or a poll).

        Order- and duplicate-proof: the status only moves forward (starting < processing <
        terminal) and the first terminal status is final (a later object with the same terminal
        status may only fill fields still empty); logs are cumulative, so only longer logs
        replace the stored ones, and the newest PROGRESS line in them sets step/total/phase/
        eta_s (and loss when the line has one); output and error are kept when present. On a
        terminal status ``predict_time`` comes from ``metrics.predict_time`` and ``cost_usd =
        predict_time * price_per_s``. Returns ``(record, changed)``; for an id not in the store
        the event is kept for ``bind`` and ``(None, False)`` is returned.
        """
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if not isinstance(obj, Mapping):
            raise TypeError("obj must be a mapping (the decoded JSON object)")
        with self._tx() as con:
            return self._apply(con, id, obj, source)

    def _apply(self, con: sqlite3.Connection, id: str, obj: Mapping[str, Any], source: str
               ) -> tuple[dict[str, Any] | None, bool]:
        now_epoch = time.time()
        now = iso_utc(now_epoch)
        row = con.execute("SELECT * FROM jobs WHERE id = ?", (id,)).fetchone()
        if row is None:
            self._keep_orphan(con, id, obj, now_epoch)
            return None, False
        cur = dict(row)
        new_status = _map_status(obj.get("status"))
        cur_status = cur["status"]
        logs = obj.get("logs") if isinstance(obj.get("logs"), str) else None
        changes: dict[str, Any] = {}

        def fill(name: str, value: Any) -> None:  # only where empty
            if value is not None and cur.get(name) is None:
                changes[name] = value

        def put(name: str, value: Any) -> None:  # when present and different
            if value is not None and cur.get(name) != value:
                changes[name] = value

        if cur_status in TERMINAL:
            if new_status != cur_status:
                return self._touch(con, cur, source, now), False
            fill_only = True
        else:
            fill_only = False
            if new_status is not None and _RANK[new_status] > _RANK[cur_status]:
                changes["status"] = new_status

        if logs is not None and len(logs) > cur["logs_len"]:
            changes["logs_len"] = len(logs)
            changes["logs_tail"] = _tail(logs)
            prog = last_progress(logs)
            if prog is not None:
                for name in ("step", "total", "phase"):
                    changes[name] = prog.get(name)
                changes["eta_s"] = _num(prog.get("eta_s"))
            # the loss of the newest line that has one (validate/done lines carry none)
            for line in reversed(logs.splitlines()):
                rec = parse_progress_line(line)
                if rec is not None and _num(rec.get("loss")) is not None:
                    changes["loss"] = _num(rec.get("loss"))
                    break

        output = obj.get("output")
        output_text = json.dumps(output, default=str) if output is not None else None
        error = obj.get("error")
        error_text = (error if isinstance(error, str) else json.dumps(error, default=str)) if error else None
        (fill if fill_only else put)("output_json", output_text)
        (fill if fill_only else put)("error", error_text)
        fill("started_at", iso_utc(obj.get("started_at")))
        fill("completed_at", iso_utc(obj.get("completed_at")))
        fill("model", obj.get("model") if isinstance(obj.get("model"), str) else None)
        fill("version", obj.get("version") if isinstance(obj.get("version"), str) else None)
        metrics = obj.get("metrics") if isinstance(obj.get("metrics"), Mapping) else {}
        predict_time = _num(metrics.get("predict_time"))

        status = changes.get("status", cur_status)
        if status in TERMINAL:
            merged = {**cur, **changes}
            if predict_time is None and merged["predict_time"] is None:
                start, end = _epoch(merged["started_at"]), _epoch(merged["completed_at"])
                if start is None:
                    predict_time = 0.0  # never started: nothing billed
                elif end is not None:
                    predict_time = max(0.0, end - start)
            if predict_time is not None:
                (fill if fill_only else put)("predict_time", predict_time)
            merged = {**cur, **changes}
            if merged["completed_at"] is None:
                changes["completed_at"] = now
            pt, price = merged["predict_time"], merged["price_per_s"]
            if pt is not None and (price is not None or pt == 0):
                cost = round(pt * (price or 0.0), 6)
                if cur["cost_usd"] is None or (not fill_only and cur["cost_usd"] != cost):
                    changes["cost_usd"] = cost
        elif predict_time is not None:
            put("predict_time", predict_time)

        if not changes:
            return self._touch(con, cur, source, now), False
        changes["updated_at"] = now
        if source in ("webhook", "poll"):
            changes["last_event_at"] = now
        names = list(changes)
        con.execute(f"UPDATE jobs SET {', '.join(f'{n} = ?' for n in names)} WHERE id = ?",
                    [changes[n] for n in names] + [id])
        return self._record(con.execute("SELECT * FROM jobs WHERE id = ?", (id,)).fetchone()), True

    def _touch(self, con: sqlite3.Connection, cur: dict[str, Any], source: str, now: str) -> dict[str, Any]:
        """An event that changed nothing still records when it came (pollers back off on it)."""
        if source in ("webhook", "poll"):
            con.execute("UPDATE jobs SET last_event_at = ? WHERE id = ?", (now, cur["id"]))
            cur = {**cur, "last_event_at": now}
        return self._record(cur)

    @staticmethod
    def _keep_orphan(con: sqlite3.Connection, id: str, obj: Mapping[str, Any], now: float) -> None:
        status = _map_status(obj.get("status"))
        rank = _RANK.get(status, 0) if status else 0
        logs = obj.get("logs") if isinstance(obj.get("logs"), str) else ""
        old = con.execute("SELECT rank, logs_len FROM orphan_events WHERE id = ?", (id,)).fetchone()
        if old is not None and (old[0], old[1]) >= (rank, len(logs)):
            return
        con.execute("INSERT OR REPLACE INTO orphan_events (id, received_at, rank, logs_len, obj_json) VALUES (?, ?, ?, ?, ?)",
                    (id, now, rank, len(logs), json.dumps(dict(obj), default=str)))

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
            cur = con.execute("INSERT OR IGNORE INTO webhook_ids (id, received_at) VALUES (?, ?)", (webhook_id, now))
            return cur.rowcount == 0

    def forget_webhook(self, webhook_id: str) -> None:
        """Un-record an id whose processing failed, so the provider's retry is accepted."""
        with self._tx() as con:
            con.execute("DELETE FROM webhook_ids WHERE id = ?", (webhook_id,))

    # -- queries and edits
    def get(self, id: str) -> dict[str, Any] | None:
        with self._tx(write=False) as con:
            return self._record(con.execute("SELECT * FROM jobs WHERE id = ?", (id,)).fetchone())

    def get_by_request_key(self, request_key: str) -> dict[str, Any] | None:
        with self._tx(write=False) as con:
            return self._record(con.execute("SELECT * FROM jobs WHERE request_key = ?", (request_key,)).fetchone())

    def list(self, limit: int = 50, status: str | Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Newest first; ``status`` is one status or several."""
        sql, args = "SELECT * FROM jobs", []
        if status is not None:
            wanted = [status] if isinstance(status, str) else list(status)
            sql += f" WHERE status IN ({', '.join('?' * len(wanted))})"
            args += wanted
        sql += " ORDER BY created_at DESC, rowid DESC LIMIT ?"
        args.append(int(limit))
        with self._tx(write=False) as con:
            return [self._record(r) for r in con.execute(sql, args).fetchall()]

    def update(self, id: str, /, **fields: Any) -> dict[str, Any]:
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
            names = list(clean)
            con.execute(f"UPDATE jobs SET {', '.join(f'{n} = ?' for n in names)} WHERE id = ?",
                        [clean[n] for n in names] + [id])
            return self._record(con.execute("SELECT * FROM jobs WHERE id = ?", (id,)).fetchone())

    def stale_reservations(self, older_than_s: float) -> list[dict[str, Any]]:
        """Reservations still "submitting" after ``older_than_s`` seconds, oldest first: their
        submitting process stopped between reserving and binding (a submit takes seconds)."""
        cutoff = iso_utc(time.time() - older_than_s)
        with self._tx(write=False) as con:
            rows = con.execute("SELECT * FROM jobs WHERE status = 'submitting' AND created_at <= ?"
                               " ORDER BY created_at ASC", (cutoff,)).fetchall()
            return [self._record(r) for r in rows]

    def unfinished(self) -> list[dict[str, Any]]:
        """Jobs a poller should follow: bound and not terminal ("starting"/"processing"), oldest
        first. Reservations still "submitting" have no provider id to poll."""
        with self._tx(write=False) as con:
            rows = con.execute("SELECT * FROM jobs WHERE status IN ('starting', 'processing')"
                               " ORDER BY created_at ASC").fetchall()
            return [self._record(r) for r in rows]

    def spend_between(self, start: Any = None, end: Any = None) -> float:
        """USD in [start, end): finished jobs by completion time (cost, or estimate when the cost
        is unknown), plus the estimates of unfinished jobs created before ``end``."""
        s, e = iso_utc(start), iso_utc(end)
        if (start is not None and s is None) or (end is not None and e is None):
            raise ValueError("start and end must be timestamps")
        with self._tx(write=False) as con:
            return self._spend(con, s, e)
