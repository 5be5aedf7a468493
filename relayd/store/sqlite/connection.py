"""The SQLite store's connections: opening the file, migrating it, and the ways in and out of it that every
table's module uses (readers, the writer's transactions, the per-message group-committing writer).

Why this shape:

* **One writer connection, a few reader connections.** In WAL mode readers never wait for the writer, so a
  1 M-row CSV import or an event burst does not stall ``check`` on the RCPT path. Each aiosqlite connection
  is one worker thread; SQLite releases the GIL while it searches b-trees, so two readers do run in parallel.
* **Writes are serialised by an asyncio lock and run as ``BEGIN IMMEDIATE`` transactions.** The lock keeps
  coroutines of this process from interleaving statements on the shared writer connection; ``IMMEDIATE``
  takes SQLite's write lock up front, so a read-then-write is atomic against other processes too
  (``relayd suppress import`` next to the daemon). Another process holding the lock is waited for up to
  ``busy_timeout`` seconds, then :class:`StoreError` is raised.
* **Durability per kind of write.** Suppression and account-state commits run with ``synchronous=FULL``
  (the WAL is fsynced at commit: an unsubscribe acknowledged is an unsubscribe kept, even across power loss);
  so does the per-message writer below, because it writes the sent ledger, which must be as durable as the
  queue (a queued message whose ledger row a power loss took would carry tokens that verify for nothing);
  the send counts and events of its batches ride on the same fsync. Other writes (``record_sends``,
  pruning, webhook cursors) use ``synchronous=NORMAL`` (consistent after a crash, may lose the last
  commits). A FULL commit also flushes every NORMAL commit before it.
* **The writes of every message are group-committed, on the event loop's thread.** The sent ledger (with the
  send counts of a capped list's message) and events run on a second writer connection
  (:mod:`relayd.store.sqlitewriter`): every write waiting goes into one transaction (``BEGIN IMMEDIATE`` ..
  ``COMMIT``), run in one go, and each caller returns only once its rows are committed. SQLite's write lock is
  shared with the other worker processes; a transaction made of several aiosqlite calls holds it across
  event-loop turns, and under load the other workers then slept in SQLite's busy handler, most of an accepted
  message's time waiting for the sent-ledger insert (figures: docs/performance.md). Why not a writer thread
  either: relayd.store.sqlitewriter says. Rarer writes (suppression, account state, pruning) stay on the
  aiosqlite writer.
* Queries by a batch of addresses pad their ``IN (...)`` list to a power of two (:func:`padded_chunks`) so a
  handful of statement texts cover every batch size and stay in sqlite3's statement cache (no re-prepare
  per message).

Failure: every ``sqlite3.Error`` is re-raised as :class:`StoreError` (``raise ... from``), with the path.
The database must be a file (the readers open it separately), not ``:memory:``.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import aiosqlite

from relayd.store.sqlitewriter import SqliteWriter

from ..migrations import LATEST_VERSION, SCHEMA_TABLE_SQLITE, pending
from ..models import SchemaTooNewError, StoreError, utcnow
from ..rows import micros

__all__ = ["Row", "SqliteConnection", "marks", "padded_chunks", "qmark"]

log = logging.getLogger(__package__)  # one logger per backend: relayd.store.sqlite

_MAX_IN: Final = 512  # largest IN (...) list per statement; SQLite allows 32766 parameters

#: What aiosqlite hands back: sqlite3.Row in its annotations, plain tuples at run time (no row_factory).
Row = sqlite3.Row | tuple[Any, ...]


def padded_chunks(items: Sequence[str]) -> Iterator[list[str]]:
    """Chunks of at most ``_MAX_IN`` items, each padded (repeating its first item) to a power of two."""
    for start in range(0, len(items), _MAX_IN):
        chunk = list(items[start : start + _MAX_IN])
        size = 1
        while size < len(chunk):
            size *= 2
        chunk.extend([chunk[0]] * (size - len(chunk)))
        yield chunk


def marks(n: int) -> str:
    return ", ".join("?" * n)


def qmark(_n: int) -> str:
    """sqlite3's placeholder for any parameter (for the statements shared with PostgreSQL)."""
    return "?"


#: WAL pages past which a writer that leaves checkpoints to other processes checkpoints anyway
_WAL_BACKSTOP = 25_000


def _insert_many(sql: str, rows: list[Row], db: sqlite3.Connection) -> None:
    db.executemany(sql, rows)


def _connect_hot(path: Path, busy_timeout: float, ledger: bool, checkpoints: bool) -> sqlite3.Connection:
    """The per-message writer's connection (see the module docstring); ``synchronous=FULL`` where the
    sent ledger is written (``ledger``): a message the queue holds (fsynced) must find its ledger row
    after a power loss, or its unsubscribe link, VERP address and trace token verify for nothing. The
    ledger rows share each batch's transaction with that batch's send counts and events, so they are
    made durable by the same single fsync per batch.

    A process that writes no ledger (a queue shard's delivery process) writes events here, one per
    delivery attempt: ``synchronous=NORMAL``, no fsync per batch. A power loss may take its last events
    (a record of what happened, not a decision; suppressions go through the durable writer), and the next
    FULL commit of any process writes them out too."""
    db = sqlite3.connect(path, isolation_level=None, timeout=busy_timeout, check_same_thread=False)
    db.execute(f"PRAGMA synchronous = {'FULL' if ledger else 'NORMAL'}")
    # ``checkpoints=False`` (a submission process with delivery processes beside it): its commits leave
    # WAL checkpoints to them, as the queue's do (relayd.queue.store.queuestore says why), up to a backstop
    db.execute(f"PRAGMA wal_autocheckpoint = {1000 if checkpoints else _WAL_BACKSTOP}")
    db.execute("PRAGMA temp_store = MEMORY")
    db.execute("PRAGMA busy_timeout = 0")  # write_lock() waits for the lock, in short steps
    return db


class SqliteConnection:
    """The connections of one SQLite file; each table's module adds its methods to this, and
    :class:`relayd.store.sqlite.SqliteStore` is all of them together.

    ``readers`` is the number of read connections (threads) serving ``check`` and the other queries.
    ``busy_timeout`` is how long a write waits for another process's write lock before failing.
    ``ledger=False``: this process writes no sent ledger, and its per-message writer does not fsync
    (:func:`_connect_hot`); ``checkpoints=False``: that writer leaves WAL checkpoints to other processes.
    """

    def __init__(
        self,
        path: Path,
        *,
        readers: int = 2,
        busy_timeout: float = 5.0,
        cache_kib: int = 8192,
        ledger: bool = True,
        checkpoints: bool = True,
    ) -> None:
        self.path = Path(path)
        self._ledger = ledger
        self._checkpoints = checkpoints
        self._n_readers = max(1, readers)
        self._cache_kib = cache_kib
        self._busy_timeout = busy_timeout
        self._writer: aiosqlite.Connection | None = None
        self._readers: list[aiosqlite.Connection] = []
        self._reader_cycle: Iterator[aiosqlite.Connection] = iter(())
        self._write_lock = asyncio.Lock()
        self._synchronous = ""
        self._inline: sqlite3.Connection | None = None
        self._hot_db: sqlite3.Connection | None = None
        self._hot: SqliteWriter | None = None

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"

    async def open(self) -> None:
        """Create the file if needed, switch to WAL, migrate, open the readers. Idempotent."""
        if self._writer is not None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = await self._connect()
            mode = await self._writer.execute_fetchall("PRAGMA journal_mode = WAL")
            if next(iter(mode))[0] != "wal":  # pragma: no cover - e.g. a filesystem without shm
                log.warning("%s: could not enable WAL mode, readers will block on writes", self.path)
            await self._set_synchronous(durable=False)
            await self.migrate()
            for _ in range(self._n_readers):
                reader = await self._connect()
                await reader.execute("PRAGMA query_only = 1")
                self._readers.append(reader)
            self._reader_cycle = itertools.cycle(self._readers)
            self._hot_db = await asyncio.to_thread(
                _connect_hot, self.path, self._busy_timeout, self._ledger, self._checkpoints
            )
            self._hot = SqliteWriter(
                "store-writer",
                self._hot_db,
                error=self._write_error,
                lock_timeout=self._busy_timeout,
            )
            self._hot.start()
            # Hot-path reads (``check`` on every RCPT and dequeue) run on the event loop thread itself: an
            # indexed lookup takes tens of microseconds, while a hop to an aiosqlite thread and back costs
            # more than that in thread wake-ups and GIL hand-offs (measured with py-spy under load). WAL
            # readers never wait for the writer; the short busy timeout covers a checkpoint's WAL reset,
            # and on any error the read is retried on an aiosqlite reader thread.
            self._inline = sqlite3.connect(
                f"file:{self.path}?mode=ro",
                uri=True,
                timeout=0.05,
                check_same_thread=False,
                isolation_level=None,
            )
        except (sqlite3.Error, OSError) as exc:
            await self.close()
            raise StoreError(f"{self.path}: cannot open store: {exc}") from exc
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Commit buffered events, then close every connection. Safe to call twice."""
        if self._inline is not None:
            self._inline.close()
            self._inline = None
        if self._hot is not None:  # commits what is already given to it
            hot, self._hot = self._hot, None
            await hot.stop()
        if self._hot_db is not None:
            hot_db, self._hot_db = self._hot_db, None
            hot_db.close()
        for conn in [*self._readers, *([self._writer] if self._writer else [])]:
            try:
                await conn.close()
            except sqlite3.Error:  # pragma: no cover - nothing left to do with it
                log.warning("%s: error closing connection", self.path, exc_info=True)
        self._readers = []
        self._reader_cycle = iter(())
        self._writer = None
        self._synchronous = ""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def migrate(self) -> int:
        """Apply pending migrations, each in its own IMMEDIATE transaction; return the schema version.

        Safe against a concurrent migrate in another process: the version is re-read under the write lock.
        Raises :class:`SchemaTooNewError` if the file was migrated by a newer relayd.
        """
        writer = self._require_writer()
        async with self._write_lock:
            try:
                await writer.execute(SCHEMA_TABLE_SQLITE)
                while True:
                    await writer.execute("BEGIN IMMEDIATE")
                    try:
                        rows = await writer.execute_fetchall("SELECT max(version) FROM schema_migrations")
                        current = next(iter(rows))[0] or 0
                        if current > LATEST_VERSION:
                            raise SchemaTooNewError(
                                f"{self.path}: schema version {current} is newer than this relayd "
                                f"({LATEST_VERSION}); upgrade relayd"
                            )
                        todo = pending(current)
                        if not todo:
                            await writer.execute("ROLLBACK")
                            return current
                        step = todo[0]
                        for statement in step.sqlite:
                            await writer.execute(statement)
                        await writer.execute(
                            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                            (step.version, step.name, micros(utcnow())),
                        )
                        await writer.execute("COMMIT")
                        log.info(
                            "%s: migrated store schema to version %d (%s)", self.path, step.version, step.name
                        )
                    except BaseException:
                        if writer.in_transaction:
                            await writer.execute("ROLLBACK")
                        raise
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: migration failed: {exc}") from exc

    async def _connect(self) -> aiosqlite.Connection:
        conn = aiosqlite.connect(self.path, isolation_level=None, timeout=self._busy_timeout)
        try:
            await conn
        except BaseException:
            # aiosqlite (0.22) stops its worker thread on a failed connect but does not wait for it; the
            # thread then reports to the event loop, which may be closed by then ("Event loop is closed"
            # in that thread). Wait for the thread here. `_thread` is private, hence the getattr.
            thread = getattr(conn, "_thread", None)
            if isinstance(thread, threading.Thread) and thread.is_alive():
                await asyncio.to_thread(thread.join, 5.0)
            raise
        await conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
        await conn.execute("PRAGMA temp_store = MEMORY")
        # 8 MiB of page cache per connection by default (SQLite's is 2 MiB): the interior pages of the
        # 10 M-entry suppression index (~5 MB) stay resident, the leaves come from the OS page cache. Not
        # more: every process has several connections, each cache fills with the leaves that lookups of
        # random addresses touch, and it counts in RSS (64 MiB each pushed two workers past 400 MB with a
        # big store; 16 MiB, with a submission and a delivery process per shard, came to 391 MB).
        await conn.execute(f"PRAGMA cache_size = -{self._cache_kib}")
        return conn

    def _write_error(self, exc: Exception) -> StoreError:
        error = StoreError(f"{self.path}: write failed: {exc}")
        error.__cause__ = exc
        return error

    def _require_hot(self) -> SqliteWriter:
        if self._hot is None:
            raise StoreError(f"{self.path}: store is not open")
        return self._hot

    def _require_writer(self) -> aiosqlite.Connection:
        if self._writer is None:
            raise StoreError(f"{self.path}: store is not open")
        return self._writer

    async def _fetch_hot(self, sql: str, params: Sequence[Any]) -> list[Row]:
        """A short read on the loop thread (see ``open``); falls back to a reader thread on any error."""
        if self._inline is not None:
            try:
                return self._inline.execute(sql, params).fetchall()
            except sqlite3.Error:
                pass
        return await self._fetch(sql, params)

    def _reader(self) -> aiosqlite.Connection:
        if not self._readers:
            raise StoreError(f"{self.path}: store is not open")
        return next(self._reader_cycle)

    async def _set_synchronous(self, *, durable: bool) -> None:
        wanted = "FULL" if durable else "NORMAL"
        if self._synchronous != wanted:
            await self._require_writer().execute(f"PRAGMA synchronous = {wanted}")
            self._synchronous = wanted

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Run a read query on the next reader connection; map sqlite3 errors to StoreError."""
        try:
            return list(await self._reader().execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: query failed: {exc}") from exc

    @asynccontextmanager
    async def _transaction(self, *, durable: bool) -> AsyncIterator[aiosqlite.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction on the writer, committed on success, rolled back otherwise."""
        writer = self._require_writer()
        async with self._write_lock:
            try:
                await self._set_synchronous(durable=durable)
                await writer.execute("BEGIN IMMEDIATE")
                try:
                    yield writer
                except BaseException:
                    await writer.execute("ROLLBACK")
                    raise
                await writer.execute("COMMIT")
            except sqlite3.Error as exc:
                if writer.in_transaction:
                    await writer.execute("ROLLBACK")
                raise StoreError(f"{self.path}: write failed: {exc}") from exc

    async def _insert_hot(self, sql: str, rows: list[Row]) -> None:
        """One INSERT of many rows on the per-message writer, in one transaction with every other write
        waiting (group commit: relayd.store.sqlitewriter)."""
        await self._submit_hot(sql, rows)

    def _submit_hot(self, sql: str, rows: list[Row]) -> asyncio.Future[None]:
        """:meth:`_insert_hot` begun now (queued before this returns); its future."""
        return self._require_hot().submit(functools.partial(_insert_many, sql, rows))
