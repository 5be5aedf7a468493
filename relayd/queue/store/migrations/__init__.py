"""Versioned schema of a queue shard, one module per version, recorded in the shard's ``schema_migrations``.

The same scheme as the policy store (relayd.store.migrations): add ``vNNNN_what.py`` with a ``MIGRATION``
(found by its name), never edit a released one; each version runs in one ``IMMEDIATE`` transaction together
with its row, so a crash leaves the file at the previous version, and a second process opening the same
shard (a shard's submission and delivery processes, the command line) re-reads the version under the write
lock and finds nothing left to do.

Queue files written before versions were recorded have no ``schema_migrations`` yet, and any subset of the
later columns: a version that adds a column adds it only where it is missing (:attr:`Migration.column`), and
every other statement is idempotent (``IF NOT EXISTS``), so such a file is brought to the current schema
exactly as the unversioned migration did, column for column and in the same order (``relayd``'s merge of
orphan shards copies rows with ``SELECT *``).

Failure: a sqlite3 error propagates to the caller (relayd.queue.store.QueueStore.open maps it to
StorageError); the failed version's transaction is rolled back.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

from relayd.store.migrations import SCHEMA_TABLE_SQLITE, load_numbered

__all__ = ["LATEST_VERSION", "MIGRATIONS", "Migration", "migrate", "recorded_version"]


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema version: a column it adds where missing, then statements run in order."""

    version: int
    name: str
    sqlite: tuple[str, ...]
    #: (table, column, declaration) this version adds; present already in a queue file written before
    #: versions were recorded, it is left alone
    column: tuple[str, str, str] | None = None


MIGRATIONS: tuple[Migration, ...] = load_numbered(__path__, __name__)
LATEST_VERSION: int = MIGRATIONS[-1].version

#: ``recipients.account`` is filled wherever it is missing at every open, not once: a queued row without an
#: account (written by another tool) would still be delivered (see QueueStore.due), but outside the fair
#: rotation
_FILL_ACCOUNT = (
    "UPDATE recipients SET account = (SELECT account FROM messages WHERE id = recipients.msg_id) "
    "WHERE account IS NULL AND state IN ('queued', 'held')"
)


def recorded_version(db: sqlite3.Connection) -> int:
    """The newest version recorded in the file (0: none yet)."""
    row = db.execute("SELECT max(version) FROM schema_migrations").fetchone()
    return int(row[0] or 0)


def _apply(db: sqlite3.Connection, step: Migration) -> None:
    if step.column is not None:
        table, name, decl = step.column
        if name not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
    for statement in step.sqlite:
        db.execute(statement)


def migrate(db: sqlite3.Connection) -> None:
    """Bring a queue database to the current schema; idempotent, and cheap when there is nothing to do
    (one read of the recorded version). ``db`` is in autocommit mode (``isolation_level=None``)."""
    db.execute(SCHEMA_TABLE_SQLITE)
    if recorded_version(db) < LATEST_VERSION:
        for step in MIGRATIONS:
            db.execute("BEGIN IMMEDIATE")
            try:
                if recorded_version(db) < step.version:
                    _apply(db, step)
                    db.execute(
                        "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                        (step.version, step.name, int(time.time() * 1_000_000)),
                    )
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
    db.execute(_FILL_ACCOUNT)
