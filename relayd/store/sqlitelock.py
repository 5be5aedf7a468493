"""Taking SQLite's write lock when other processes write the same file.

Why not SQLite's own busy handler (``busy_timeout``): it sleeps 1, 2, 5, 10, 15, 20, 25 ... ms between
tries, so a writer that finds the lock taken for a millisecond sleeps on long after it was freed. With
several relayd processes writing one file (the policy store, and a queue shard shared by its submission and
its delivery process), those sleeps were the tail of the ``250`` latency.

Here the wait has two phases:

* **First, up to** ``spin`` **(2 ms), blocking tries 0.1 ms apart.** The writer runs on the event loop's
  thread (relayd.store.sqlitewriter), and under load one turn of the loop is several milliseconds of the
  other sessions' work: an accepting process that gave up the loop after each failed try found the
  policy store's lock held in about a fifth of its commits, for 0.45 ms at the median, and still waited
  3 ms at p90 and 16 ms at p99 for it. Blocking for the lock's usual hold time took that to 0.7 ms and
  4-9 ms (figures: docs/performance.md). The loop stands still meanwhile, as it does for the batch's fsync;
  ``time.sleep`` leaves the CPU to the holder.
* **Then asynchronous steps that grow to at most 1 ms,** so the process's other sessions go on: a lock
  held longer is held by a process that is not running (a delivery process at its lower CPU priority), by
  a long write (a CLI import), or by this process's own aiosqlite writer, whose transaction needs the loop
  to go on; blocking for those would stall every session for nothing.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time

_FIRST_STEP = 0.0001
_MAX_STEP = 0.001
#: how long to try without giving up the loop, and how far apart
SPIN = 0.002
_SPIN_STEP = 0.0001


async def write_lock(db: sqlite3.Connection, timeout: float, *, spin: float = SPIN) -> None:
    """``BEGIN IMMEDIATE`` on ``db`` (a connection with ``busy_timeout = 0``), retried for up to ``timeout``
    seconds while another connection holds the write lock (for ``spin`` of them without giving up the
    loop); then raises the busy error."""
    start = time.monotonic()
    deadline = start + timeout
    step = _FIRST_STEP
    while True:
        try:
            db.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc) or time.monotonic() >= deadline:
                raise
        if time.monotonic() - start < spin:
            time.sleep(_SPIN_STEP)
            continue
        await asyncio.sleep(step)
        step = min(step * 2, _MAX_STEP)


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)
