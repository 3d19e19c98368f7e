"""The job store's schema, as numbered migrations on ``PRAGMA user_version``.

A store file records the number of the last migration applied to it in SQLite's
``user_version``. Opening a store (``JobStore(path)``) runs every migration with a higher number,
in order, inside one ``BEGIN IMMEDIATE`` transaction, and sets ``user_version`` after each: either
the file reaches the newest schema or, when one fails, it stays exactly as it was. The write lock
is taken before the version is read, so two processes opening one old store at once migrate it
once. A store whose version is newer than this code knows is refused (``StoreVersionError``):
an older client must not write rows a newer one cannot read.

Version 1 is the schema every store had before migrations existed (that code wrote
``user_version = 1``); ``tests/data/store-v1.sqlite`` is such a store, made by that code.

Adding a migration (say, a column)::

    def _v2_add_notes(con: sqlite3.Connection) -> None:
        con.execute("ALTER TABLE jobs ADD COLUMN notes TEXT")

    MIGRATIONS = (..., Migration(2, "jobs.notes", _v2_add_notes))

Then add the field to ``client.records.Job`` (the store reads the columns in ``FIELDS`` by
name, so a column the code does not know yet is never read) and a test that opens the v1 fixture.
Rules: never edit or renumber a migration that has shipped (users' files already ran it); a new
``NOT NULL`` column needs a ``DEFAULT`` so existing rows stay valid; keep a migration to DDL and
set-based SQL (no Python loops over rows, no network), because it runs while the store is locked.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

__all__ = ["Migration", "MIGRATIONS", "StoreVersionError", "migrate", "schema_version"]


@dataclass(frozen=True)
class Migration:
    """Schema step ``version``: ``apply`` runs inside the opening transaction, so it must not
    commit (no ``COMMIT``, no ``executescript``, which commits first)."""

    version: int
    description: str
    apply: Callable[[sqlite3.Connection], None]


class StoreVersionError(UserError):
    """The store file was written by a newer client than this one (the user upgrades, or points
    ADVANCED_TRAINER_HOME elsewhere: CLI exit 2, not a traceback)."""

    def __init__(self, path: Path | str, found: int, known: int):
        self.path, self.found, self.known = Path(path), found, known
        super().__init__(
            f"job store {path} has schema version {found}, but this advanced-trainer only "
            f"knows versions up to {known}: upgrade advanced-trainer, or point it at "
            f"another store"
        )


# The jobs table as the code before migrations created it (column order included, since
# ``SELECT *`` users and the fixture see it).
_V1_JOB_COLUMNS = (
    ("id", "TEXT PRIMARY KEY"),
    ("provider", "TEXT NOT NULL"),
    ("kind", "TEXT NOT NULL"),
    ("model", "TEXT"),
    ("version", "TEXT"),
    ("destination", "TEXT"),
    ("hardware", "TEXT"),
    ("status", "TEXT NOT NULL"),
    ("created_at", "TEXT NOT NULL"),
    ("updated_at", "TEXT NOT NULL"),
    ("started_at", "TEXT"),
    ("completed_at", "TEXT"),
    ("spec_json", "TEXT"),
    ("input_json", "TEXT"),
    ("estimate_usd", "REAL"),
    ("price_per_s", "REAL"),
    ("predict_time", "REAL"),
    ("cost_usd", "REAL"),
    ("output_json", "TEXT"),
    ("error", "TEXT"),
    ("logs_tail", "TEXT"),
    ("step", "INTEGER"),
    ("total", "INTEGER"),
    ("loss", "REAL"),
    ("eta_s", "REAL"),
    ("phase", "TEXT"),
    ("webhook", "INTEGER NOT NULL DEFAULT 0"),
    ("last_event_at", "TEXT"),
    ("local_dir", "TEXT"),
    ("delivered", "INTEGER NOT NULL DEFAULT 0"),
    ("request_key", "TEXT NOT NULL UNIQUE"),
    ("logs_len", "INTEGER NOT NULL DEFAULT 0"),
)


def _v1_initial_schema(con: sqlite3.Connection) -> None:
    # IF NOT EXISTS: a file from before user_version was written at all already has these tables
    cols = ",\n  ".join(f"{name} {decl}" for name, decl in _V1_JOB_COLUMNS)
    con.execute(f"CREATE TABLE IF NOT EXISTS jobs (\n  {cols}\n)")
    con.execute("CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status)")
    con.execute("CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created_at)")
    con.execute("CREATE TABLE IF NOT EXISTS webhook_ids (id TEXT PRIMARY KEY, received_at REAL NOT NULL)")
    con.execute("CREATE INDEX IF NOT EXISTS webhook_ids_received ON webhook_ids(received_at)")
    # events for ids not (yet) in jobs, e.g. a webhook that beats bind(): the furthest one per id
    con.execute(
        "CREATE TABLE IF NOT EXISTS orphan_events (id TEXT PRIMARY KEY, received_at REAL NOT NULL,"
        " rank INTEGER NOT NULL, logs_len INTEGER NOT NULL, obj_json TEXT NOT NULL)"
    )


def _v2_job_links(con: sqlite3.Connection) -> None:
    # a resumed or continued job names the job it carries on (client/resume.py)
    con.execute("ALTER TABLE jobs ADD COLUMN parent_id TEXT")
    con.execute("ALTER TABLE jobs ADD COLUMN relation TEXT")
    con.execute("CREATE INDEX IF NOT EXISTS jobs_parent ON jobs(parent_id)")


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "jobs, webhook ids and orphan events", _v1_initial_schema),
    Migration(2, "jobs.parent_id and jobs.relation: resumed and continued jobs", _v2_job_links),
)


def schema_version(con: sqlite3.Connection) -> int:
    return int(con.execute("PRAGMA user_version").fetchone()[0])


def migrate(con: sqlite3.Connection, path: Path | str, migrations: Sequence[Migration] = MIGRATIONS) -> int:
    """Bring the store on ``con`` (an autocommit connection to ``path``) to the newest version in
    ``migrations``, in one transaction; returns that version. Raises ``StoreVersionError`` for a
    store newer than ``migrations``; a failing migration rolls everything back and re-raises."""
    numbers = [m.version for m in migrations]
    assert numbers == list(range(1, len(numbers) + 1)), f"migrations must be numbered 1..n: {numbers}"
    known = len(migrations)
    con.execute("BEGIN IMMEDIATE")
    try:
        found = schema_version(con)
        if found > known:
            raise StoreVersionError(path, found, known)
        for step in migrations[found:]:
            step.apply(con)
            # PRAGMA takes no parameters; the version is an int from our own table
            con.execute(f"PRAGMA user_version = {int(step.version)}")
    except BaseException:
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")
    return known
