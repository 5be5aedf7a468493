"""Policy state store: suppression, send counters, account state and events behind one interface.

Callers type against the Protocols in :mod:`relayd.store.protocols`, with the values of
:mod:`relayd.store.models` (both re-exported here), and get a backend from
:func:`open_store`, which reads the ``[store]`` config values::

    store = await open_store(cfg.store.backend, cfg.store.path, cfg.store.dsn)
    try:
        hits = await store.check(["a@example.test"], account="acme", list_name="news")
    finally:
        await store.close()

Backends: ``sqlite`` (:class:`relayd.store.sqlite.SqliteStore`, aiosqlite + WAL), one node;
``postgresql`` (:class:`relayd.store.postgresql.PostgresStore`, asyncpg), several nodes sharing one
database, with ``NOTIFY`` change propagation. The same contract suite runs on both.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .models import (
    SCOPE_PRECEDENCE,
    AccountState,
    Event,
    Reason,
    SchemaTooNewError,
    Scope,
    SendsContended,
    SentRecord,
    StoreError,
    SuppressionEntry,
    SuspendReason,
    as_utc,
    utcnow,
)
from .protocols import AccountStateStore, EventStore, SendCounterStore, SentLedger, Store, SuppressionStore
from .sqlite import SqliteStore

if TYPE_CHECKING:
    from .postgresql import CHANNEL_ACCOUNT, CHANNEL_SUPPRESSION, ChangeCallback, PostgresStore

#: imported on first use: asyncpg costs every process ~6 MB of memory, and a node on SQLite never needs it
_FROM_POSTGRESQL = frozenset({"CHANNEL_ACCOUNT", "CHANNEL_SUPPRESSION", "ChangeCallback", "PostgresStore"})


def __getattr__(name: str) -> Any:
    if name in _FROM_POSTGRESQL:
        from . import postgresql

        return getattr(postgresql, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CHANNEL_ACCOUNT",
    "CHANNEL_SUPPRESSION",
    "DEFAULT_SQLITE_PATH",
    "SCOPE_PRECEDENCE",
    "AccountState",
    "AccountStateStore",
    "ChangeCallback",
    "Event",
    "EventStore",
    "PostgresStore",
    "Reason",
    "SchemaTooNewError",
    "Scope",
    "SendCounterStore",
    "SendsContended",
    "SentLedger",
    "SentRecord",
    "SqliteStore",
    "Store",
    "StoreError",
    "SuppressionEntry",
    "SuppressionStore",
    "SuspendReason",
    "as_utc",
    "open_store",
    "utcnow",
]

#: ``[store] path`` when the config does not set it (DESIGN.md).
DEFAULT_SQLITE_PATH = Path("var/relayd.db")


async def open_store(
    backend: str,
    path: Path | None = None,
    dsn: str | None = None,
    *,
    light: bool = False,
    checkpoints: bool = True,
) -> Store:
    """Build the configured backend and open it (which migrates the schema).

    ``light``: for a process that reads the store only now and then (a queue shard's delivery process:
    the check before each attempt, batched) at a low CPU priority: SQLite gets one reader connection and
    4 MiB of page cache per connection instead of two readers with 8 MiB each; it writes no sent ledger,
    so its per-message writer does not fsync each batch of events
    (:func:`relayd.store.sqlite.connection._connect_hot`).
    ``checkpoints=False``: a submission process with delivery processes beside it, whose per-message writer
    leaves SQLite's WAL checkpoints to them (a checkpoint run by a commit delays that batch's ``250``).

    Raises ``ValueError`` for an unknown backend or a ``postgresql`` backend without ``dsn``,
    :class:`StoreError` when the database cannot be reached, opened or migrated.
    """
    if backend == "sqlite":
        where = path if path is not None else DEFAULT_SQLITE_PATH
        store = (
            SqliteStore(where, readers=1, cache_kib=4096, ledger=False)
            if light
            else SqliteStore(where, checkpoints=checkpoints)
        )
        await store.open()
        return store
    if backend == "postgresql":
        if not dsn:
            raise ValueError("store backend 'postgresql' needs a dsn ([store] dsn = \"postgresql://...\")")
        from .postgresql import PostgresStore

        pg = PostgresStore(dsn)
        await pg.open()
        return pg
    raise ValueError(f"unknown store backend {backend!r}; expected 'sqlite' or 'postgresql'")
