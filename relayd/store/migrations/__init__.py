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

import importlib
import pkgutil
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["LATEST_VERSION", "MIGRATIONS", "SCHEMA_TABLE_SQLITE", "Migration", "load_numbered", "pending"]


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema version: statements per backend, run in order in a single transaction."""

    version: int
    name: str
    sqlite: tuple[str, ...]
    postgresql: tuple[str, ...] | None = None  # None: this version has no PostgreSQL statements


#: The bookkeeping table; created outside the numbered migrations so that version 1 is recorded in it.
SCHEMA_TABLE_SQLITE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)"
)


def load_numbered(path: Iterable[str], package: str) -> tuple[Any, ...]:
    """The ``MIGRATION`` of every ``vNNNN_*.py`` module of ``package`` (at ``path``), in version order.

    Shared by the policy store and the queue, which number their migrations the same way (two engineers
    adding a migration each never edit the same line; the numbering check catches a clash)."""
    names = sorted(m.name for m in pkgutil.iter_modules(path) if re.fullmatch(r"v\d{4}_\w+", m.name))
    found = tuple(importlib.import_module(f"{package}.{name}").MIGRATION for name in names)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):  # pragma: no cover - guards future edits
        raise RuntimeError(f"{package}: migrations must be numbered 1..n without gaps, got {versions}")
    return found


MIGRATIONS: tuple[Migration, ...] = load_numbered(__path__, __name__)
LATEST_VERSION: int = MIGRATIONS[-1].version


def pending(current: int) -> tuple[Migration, ...]:
    """Migrations newer than ``current``, oldest first."""
    return tuple(m for m in MIGRATIONS if m.version > current)
