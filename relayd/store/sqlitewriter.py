"""Group commit for a SQLite file: one writer connection, every write waiting committed in one transaction.

Used by the queue (each message's rows, each attempt's outcome) and by the policy store's per-message
writes (the sent ledger with a message's send counts, events). Callers ``await run(job)``; a job is a
function of the connection that runs inside the shared transaction, in a ``SAVEPOINT`` of its own, so a job
that fails is rolled back alone and only its caller hears of it (a job may also refuse to write on what it
read: :class:`JobRefused`). A failure of the transaction itself (the write lock not had in time, the
``COMMIT`` and its fsync) goes to every job of the batch: nobody is told "done" before their rows are
committed.

Why on the event loop's thread, not a writer thread or an executor: on a busy machine every hand-over between
threads waits for a CPU and for the GIL, twice per write (to the writer and back), and a message needed three
writes then (caps, ledger, queue; two now: the ledger with the send counts, then the queue). Run here, the
server-side ``250`` path took about half as long as with a writer thread (figures: docs/performance.md). The
price: the loop stands still for each batch's fsync. Here that is well under a millisecond; on a disk whose
fsync takes 10 ms every session of the process pauses that long, once per batch (all the messages that arrived
meanwhile), not once per message. (A writer thread had also let a delivery process's garbage collections, at
its low CPU priority, hold the GIL for up to 350 ms while that thread held the write lock the accepting
processes waited for: that is why the delivery processes already wrote on their loop's thread.)

A job may name a write it must follow (``after``: the sent ledger's rows, which a queued message must never
be without, relayd.edge.smtp.accept). Given both at once, the message pays one turn of the loop for two
commits, not two: the ledger's writer commits first in the next turn, and this writer, woken in the same
turn, finds it done and commits behind it. A job whose prerequisite is not done yet waits for it without the
write lock, and one whose prerequisite failed fails with its error, its own write never made.

What must not block the loop is waiting for SQLite's write lock while another process holds it (the
shard's other process, the other shards, the CLI): :func:`relayd.store.sqlitelock.write_lock` waits for it in
short asynchronous steps, and jobs given meanwhile join the batch.

The PostgreSQL store group-commits with :class:`relayd.store.groupcommit.GroupCommit` instead: its driver
takes a batch as one awaited statement, with no file lock to wait for (that module says why not one class).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from relayd.store.sqlitelock import write_lock

log = logging.getLogger(__name__)

T = TypeVar("T")


class JobRefused(Exception):
    """Raised by a job that decides, on what it read inside the transaction, not to write: its savepoint is
    rolled back and its caller gets this exception as it is (not wrapped, not logged as a failure), like
    any job's error; the batch commits without it."""


@dataclass(slots=True)
class _Job(Generic[T]):
    fn: Callable[[sqlite3.Connection], T]
    done: asyncio.Future[T]
    #: a write that must be committed before this one (None: none)
    after: asyncio.Future[Any] | None = None


class SqliteWriter:
    """The writer of one SQLite connection (``isolation_level=None``, ``busy_timeout = 0``: the write lock
    is waited for by :func:`relayd.store.sqlitelock.write_lock`).

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
    ) -> None:
        self.name = name
        self._db = db
        self._error = error
        self._lock_timeout = lock_timeout
        self._batch_limit = batch_limit
        self._pending: asyncio.Queue[_Job[Any] | None] = asyncio.Queue()
        #: jobs set aside until their prerequisite is done (then they join the queue again), by id
        self._parked: dict[int, _Job[Any]] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start taking jobs; call on the event loop that will await them."""
        self._task = asyncio.create_task(self._run(), name=self.name)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def run(
        self, fn: Callable[[sqlite3.Connection], T], *, after: asyncio.Future[Any] | None = None
    ) -> T:
        """``fn(db)`` inside the next transaction; its return value once committed. Raises what ``error``
        makes of its failure or of the transaction's, or the error of ``after``."""
        return await self.submit(fn, after=after)

    def submit(
        self, fn: Callable[[sqlite3.Connection], T], *, after: asyncio.Future[Any] | None = None
    ) -> asyncio.Future[T]:
        """:meth:`run` begun now: the job is queued before this returns, so a write given right after it
        to another writer, ``after`` this one's future, pays no extra turn of the loop. ``fn`` runs only
        once ``after`` (if given) has committed."""
        if not self.running:
            raise self._error(sqlite3.ProgrammingError(f"{self.name} is not running"))
        job: _Job[T] = _Job(fn, asyncio.get_running_loop().create_future(), after)
        self._pending.put_nowait(job)
        return job.done

    async def stop(self) -> None:
        """Commit every job already given, then stop (the connection stays open: the owner closes it)."""
        if self._task is not None:
            self._pending.put_nowait(None)
            await self._task
            self._task = None

    # --- the writer ------------------------------------------------------------------------------------

    async def _run(self) -> None:
        stopping = False
        while not (stopping and not self._parked and self._pending.empty()):
            first = await self._pending.get()
            if first is None:
                stopping = True  # once the jobs already given, parked ones too, are committed
                continue
            if self._park(first):
                continue
            try:
                await write_lock(self._db, self._lock_timeout)
            except asyncio.CancelledError:  # the loop is shutting down: nobody will wait for these
                first.done.cancel()
                for parked in self._parked.values():
                    parked.done.cancel()
                while not self._pending.empty():
                    job = self._pending.get_nowait()
                    if job is not None:
                        job.done.cancel()
                raise
            except Exception as exc:
                batch, stop = self._take(first)
                _settle(batch, [(False, self._failed(exc, len(batch)))] * len(batch))
            else:
                # from here to COMMIT without an await: nothing else can run in this transaction
                batch, stop = self._take(first)
                _settle(batch, self._commit(batch))
            stopping = stopping or stop

    def _take(self, first: _Job[Any]) -> tuple[list[_Job[Any]], bool]:
        """``first`` and every job already waiting behind it (up to the batch limit; those whose
        prerequisite is not done yet are parked); and whether a stop was found."""
        batch = [first]
        while len(batch) < self._batch_limit:
            try:
                job = self._pending.get_nowait()
            except asyncio.QueueEmpty:
                break
            if job is None:
                return batch, True
            if not self._park(job):
                batch.append(job)
        return batch, False

    def _park(self, job: _Job[Any]) -> bool:
        """Set ``job`` aside if the write it must follow is not done yet: it joins the queue again when
        that is, and the jobs behind it go on meanwhile (a delivery's outcome does not wait for another
        message's ledger)."""
        after = job.after
        if after is None or after.done():
            return False
        self._parked[id(job)] = job

        def unpark(_: asyncio.Future[Any]) -> None:
            if self._parked.pop(id(job), None) is not None:
                self._pending.put_nowait(job)

        after.add_done_callback(unpark)
        return True

    def _commit(self, batch: list[_Job[Any]]) -> list[tuple[bool, Any]]:
        """Run ``batch`` in the transaction ``write_lock`` began: per job (True, its value) or (False, its
        error)."""
        db = self._db
        outcomes: list[tuple[bool, Any]] = []
        try:
            for job in batch:
                if job.after is not None and (failed := self._prerequisite(job.after)) is not None:
                    outcomes.append((False, failed))  # its prerequisite was not written: nor is it
                    continue
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

    def _prerequisite(self, after: asyncio.Future[Any]) -> BaseException | None:
        """What the write a job had to follow failed with (its own error, as its caller gets it), or None
        if it committed."""
        if after.cancelled():
            return self._error(sqlite3.OperationalError("the write this one follows was cancelled"))
        return after.exception()

    def _failed(self, exc: Exception, jobs: int) -> Exception:
        if isinstance(exc, JobRefused):
            return exc
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
