"""Versioned schema of the policy store, one module per version, DDL per backend.

Why Python modules rather than ``.sql`` files: they are packaged with no package-data configuration, and a
migration can carry the statements of every backend side by side, which keeps the backends' schemas from
drifting apart. Queries in the backends are portable SQL (``ON CONFLICT ... DO UPDATE``, row values,
partial indexes: SQLite >= 3.24 and PostgreSQL >= 9.5); only DDL differs (``WITHOUT ROWID``, ``BIGSERIAL``).

Rules for adding a migration: never edit a released one; add ``vNNNN_what.py`` with a ``MIGRATION`` and list
it in :data:`MIGRATIONS`. Each migration runs in one transaction together with its row in
``schema_migrations``, so a failure leaves the database at the previous version.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LATEST_VERSION", "MIGRATIONS", "SCHEMA_TABLE_SQLITE", "Migration", "pending"]


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema version: statements per backend, run in order in a single transaction."""

    version: int
    name: str
    sqlite: tuple[str, ...]
    postgresql: tuple[str, ...] | None = None  # None: not written yet (the PostgreSQL backend is to come)


#: The bookkeeping table; created outside the numbered migrations so that version 1 is recorded in it.
SCHEMA_TABLE_SQLITE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)"
)


def _load() -> tuple[Migration, ...]:
    from . import v0001_initial, v0002_sent_ledger

    found = (v0001_initial.MIGRATION, v0002_sent_ledger.MIGRATION)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):  # pragma: no cover - guards future edits
        raise RuntimeError(f"migrations must be numbered 1..n without gaps, got {versions}")
    return found


MIGRATIONS: tuple[Migration, ...] = _load()
LATEST_VERSION: int = MIGRATIONS[-1].version


def pending(current: int) -> tuple[Migration, ...]:
    """Migrations newer than ``current``, oldest first."""
    return tuple(m for m in MIGRATIONS if m.version > current)
