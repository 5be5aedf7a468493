"""Group commit for a SQLite file: one writer connection, every write waiting committed in one transaction.

Used by the queue (each message's rows, each attempt's outcome) and by the policy store's per-message
writes (send-cap reservations, the sent ledger, events). Callers ``await run(job)``; a job is a function of
the connection that runs inside the shared transaction, in a ``SAVEPOINT`` of its own, so a job that fails
is rolled back alone and only its caller hears of it. A failure of the transaction itself (the write lock
not had in time, the ``COMMIT`` and its fsync) goes to every job of the batch: nobody is told "done" before
their rows are committed.

Why a thread of its own and not an executor or aiosqlite: on its own thread the writer picks up a new job
at once (no event-loop turn to schedule it), and hands a whole batch's outcomes back in one
``call_soon_threadsafe`` that wakes every caller. Through an executor and an asyncio writer task the way
back alone was several loop turns; with 20 busy sessions per process, each turn is other sessions' work,
and the queue's commit took 2.5 ms (p50) to 11 ms (p99) to reach its caller after the fsync (timed per
step in the accepting process under bench/e2e.py's load).

``inline=True`` runs the batches on the event loop's thread instead: for a low-priority process (a shard's
delivery process), whose garbage collections would otherwise hold the GIL, 50-350 ms, while its writer
thread holds the write lock that the accepting processes wait for.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from relayd.sqlitelock import write_lock

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(slots=True)
class _Job(Generic[T]):
    fn: Callable[[sqlite3.Connection], T]
    done: asyncio.Future[T]


class CommitThread:
    """The writer of one SQLite connection (``isolation_level=None``, ``busy_timeout = 0``: the write lock
    is waited for by :func:`relayd.sqlitelock.write_lock`).

    ``error`` turns what a job or a commit raised into the exception its callers get (StorageError,
    StoreError, with the file's name)."""

    def __init__(
        self,
        name: str,
        db: sqlite3.Connection,
        *,
        error: Callable[[Exception], Exception],
        lock_timeout: float = 5.0,
        batch_limit: int = 512,
        inline: bool = False,
    ) -> None:
        self.name = name
        self._db = db
        self._error = error
        self._lock_timeout = lock_timeout
        self._batch_limit = batch_limit
        self._inline = inline
        self._loop: asyncio.AbstractEventLoop | None = None
        self._intake: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()  # thread mode
        self._pending: asyncio.Queue[_Job[Any] | None] = asyncio.Queue()  # inline mode
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start taking jobs; call on the event loop that will await them."""
        self._loop = asyncio.get_running_loop()
        if self._inline:
            self._task = asyncio.create_task(self._run_inline(), name=self.name)
        else:
            self._thread = threading.Thread(target=self._run_thread, name=self.name, daemon=True)
            self._thread.start()

    @property
    def running(self) -> bool:
        if self._thread is not None:
            return self._thread.is_alive()
        return self._task is not None and not self._task.done()

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(db)`` inside the next transaction; its return value once committed. Raises what ``error``
        makes of its failure or of the transaction's."""
        job: _Job[T] = _Job(fn, asyncio.get_running_loop().create_future())
        if not self.running:
            raise self._error(sqlite3.ProgrammingError(f"{self.name} is not running"))
        if self._thread is not None:
            self._intake.put(job)
        else:
            self._pending.put_nowait(job)
        return await job.done

    async def stop(self) -> None:
        """Commit every job already given, then stop (the connection stays open: the owner closes it)."""
        if self._task is not None:
            await self._pending.put(None)
            await self._task
            self._task = None
        if self._thread is not None:
            self._intake.put(None)
            await asyncio.to_thread(self._thread.join)
            self._thread = None
            await asyncio.sleep(0)  # the last batch's outcomes were handed over with call_soon_threadsafe

    # --- the writer ------------------------------------------------------------------------------------

    def _run_thread(self) -> None:
        loop = self._loop
        assert loop is not None
        while True:
            batch, stop = self._take(self._intake.get(), self._intake.get_nowait, queue.Empty)
            if batch:
                outcomes = self._commit(batch)
                try:
                    loop.call_soon_threadsafe(_settle, batch, outcomes)
                except RuntimeError:  # the loop is closed: nobody is waiting any more
                    return
            if stop:
                return

    async def _run_inline(self) -> None:
        while True:
            batch, stop = self._take(await self._pending.get(), self._pending.get_nowait, asyncio.QueueEmpty)
            if batch:
                _settle(batch, self._commit(batch))
            if stop:
                return

    def _take(
        self, first: _Job[Any] | None, more: Callable[[], _Job[Any] | None], empty: type[Exception]
    ) -> tuple[list[_Job[Any]], bool]:
        """``first`` and every job already waiting behind it (up to the batch limit); and whether a stop
        was found."""
        if first is None:
            return [], True
        batch = [first]
        while len(batch) < self._batch_limit:
            try:
                job = more()
            except empty:
                break
            if job is None:
                return batch, True
            batch.append(job)
        return batch, False

    def _commit(self, batch: list[_Job[Any]]) -> list[tuple[bool, Any]]:
        """Run ``batch`` in one transaction: per job (True, its value) or (False, its error)."""
        db = self._db
        outcomes: list[tuple[bool, Any]] = []
        try:
            write_lock(db, self._lock_timeout)
            for job in batch:
                db.execute("SAVEPOINT job")
                try:
                    value = job.fn(db)
                except Exception as exc:
                    if not db.in_transaction:  # SQLite gave the whole transaction up: the batch fails
                        raise
                    db.execute("ROLLBACK TO job")
                    db.execute("RELEASE job")
                    outcomes.append((False, self._failed(exc, 1)))
                else:
                    db.execute("RELEASE job")
                    outcomes.append((True, value))
            db.execute("COMMIT")
        except Exception as exc:
            try:
                if db.in_transaction:
                    db.execute("ROLLBACK")
            except sqlite3.Error:
                log.debug("%s: rollback failed", self.name, exc_info=True)
            error = self._failed(exc, len(batch))
            return [(False, error)] * len(batch)
        return outcomes

    def _failed(self, exc: Exception, jobs: int) -> Exception:
        if isinstance(exc, (sqlite3.Error, OSError)):
            log.error("%s: write of %d job(s) failed: %s", self.name, jobs, exc)
        else:  # a bug of ours: its caller hears of it, the writer goes on
            log.exception("%s: write of %d job(s) failed", self.name, jobs, exc_info=exc)
        return self._error(exc)


def _settle(batch: list[_Job[Any]], outcomes: list[tuple[bool, Any]]) -> None:
    for job, (ok, value) in zip(batch, outcomes, strict=True):
        if job.done.done():  # its caller was cancelled; the write is done (or not) all the same
            continue
        if ok:
            job.done.set_result(value)
        else:
            job.done.set_exception(value)
