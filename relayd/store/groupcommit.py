"""Group commit for PostgreSQL's high-rate inserts (events, the sent ledger). SQLite's writes do the same
on the event loop's thread (:mod:`relayd.store.sqlitewriter`).

Rows added while a batch is being written go together into the next write, and each caller returns once
its rows are committed, or gets that batch's error: many sessions share one transaction, and nobody is told
"done" before it is.

Why two group commits: the drivers want different things. sqlite3 runs each job as a plain function on one
connection, inside a transaction the writer opens after waiting for SQLite's file lock, and each job gets a
``SAVEPOINT`` so one failing job is rolled back alone (:class:`relayd.store.sqlitewriter.SqliteWriter`; the
queue uses it too). asyncpg writes a batch with one awaited statement of arrays: here the items of many
callers are concatenated into one ``write`` call, there is no file lock to wait for and no per-item
savepoint, and a failed batch fails every caller in it. One class serving both would need both modes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class GroupCommit(Generic[T]):
    """Buffers items for ``write`` (one call per batch, e.g. one transaction)."""

    def __init__(self, write: Callable[[list[T]], Awaitable[object]]) -> None:
        self._write = write
        self._buffer: list[tuple[list[T], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def add(self, items: list[T]) -> None:
        """Return once ``items`` are written (raises the batch's error)."""
        await asyncio.shield(self.submit(items))

    def submit(self, items: list[T]) -> asyncio.Future[None]:
        """:meth:`add` begun now (buffered before this returns): the future of its write."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._buffer.append((items, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return done

    async def _flush(self) -> None:
        while self._buffer:
            await asyncio.sleep(0)  # let concurrent callers join this batch
            batch, self._buffer = self._buffer, []
            try:
                await self._write([item for items, _ in batch for item in items])
            except BaseException as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
            else:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)

    async def drain(self, owner: object) -> None:
        """Wait for the batch being written; its error already went to its callers."""
        if self._flusher is not None:
            try:
                await self._flusher
            except Exception:
                log.debug("%s: group commit failed during close", owner, exc_info=True)
            self._flusher = None


def nothing_to_write() -> asyncio.Future[None]:
    """The future of a write with no rows: done already, so callers await every write alike."""
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    done.set_result(None)
    return done
