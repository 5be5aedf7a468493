"""Taking SQLite's write lock when other processes write the same file.

Why not SQLite's own busy handler (``busy_timeout``): it sleeps 1, 2, 5, 10, 15, 20, 25 ... ms between
tries, so a writer that finds the lock taken for a millisecond sleeps on long after it was freed. With
several relayd processes writing one file (the policy store, and a queue shard shared by its submission and
its delivery process), those sleeps were the tail of the ``250`` latency. Here the wait is short steps that
grow to at most 1 ms: a writer gets the lock within about a millisecond of its release. And the steps are
``asyncio.sleep``: the writer runs on the event loop's thread (relayd.store.sqlitewriter), whose other
sessions
go on while it waits.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time

_FIRST_STEP = 0.0001
_MAX_STEP = 0.001


async def write_lock(db: sqlite3.Connection, timeout: float) -> None:
    """``BEGIN IMMEDIATE`` on ``db`` (a connection with ``busy_timeout = 0``), retried in short steps for
    up to ``timeout`` seconds while another connection holds the write lock; then raises the busy error."""
    deadline = time.monotonic() + timeout
    step = _FIRST_STEP
    while True:
        try:
            db.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc) or time.monotonic() >= deadline:
                raise
        await asyncio.sleep(step)
        step = min(step * 2, _MAX_STEP)


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)
