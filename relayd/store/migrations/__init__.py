"""Versioned schema of the policy store, one module per version, DDL per backend.

Why Python modules rather than ``.sql`` files: they are packaged with no package-data configuration, and a
migration can carry the statements of every backend side by side, which keeps the backends' schemas from
drifting apart. Queries in the backends are portable SQL (``ON CONFLICT ... DO UPDATE``, row values,
partial indexes: SQLite >= 3.24 and PostgreSQL >= 9.5); only DDL differs (``WITHOUT ROWID``, ``BIGSERIAL``).

Rules for adding a migration: never edit a released one; add ``vNNNN_what.py`` with a ``MIGRATION`` (it is
found by its name). Each migration runs in one transaction together with its row in
``schema_migrations``, so a failure leaves the database at the previous version.
"""

from __future__ import annotations

import re
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
    """Every ``vNNNN_*.py`` module of this package, in version order (two engineers adding a migration
    each never edit the same line; the numbering check below catches a clash)."""
    import importlib
    import pkgutil

    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if re.fullmatch(r"v\d{4}_\w+", m.name))
    found = tuple(importlib.import_module(f"{__name__}.{name}").MIGRATION for name in names)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):  # pragma: no cover - guards future edits
        raise RuntimeError(f"migrations must be numbered 1..n without gaps, got {versions}")
    return found


MIGRATIONS: tuple[Migration, ...] = _load()
LATEST_VERSION: int = MIGRATIONS[-1].version


def pending(current: int) -> tuple[Migration, ...]:
    """Migrations newer than ``current``, oldest first."""
    return tuple(m for m in MIGRATIONS if m.version > current)
