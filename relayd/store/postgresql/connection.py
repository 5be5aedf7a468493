"""The PostgreSQL store's connections (asyncpg): the pool, migrations, and the ways in and out of the database
that every table's module uses (reads, transactions, autocommit statements, ``NOTIFY``).

Why this shape:

* **One asyncpg pool per process.** Each node (and each worker process) holds its own pool; PostgreSQL,
  not a Python lock, serialises what must be serialised, so the guarantees hold across nodes. The pool is
  created with a no-op ``reset`` (asyncpg's default runs a ``RESET ALL; UNLISTEN *; ...`` round trip on
  every release, which would double the cost of ``check``); nothing here leaves session state behind
  except the migration lock, which :meth:`PostgresStore.migrate` releases itself.
* **Timestamps are BIGINT microseconds and "none" is ``''``, as in SQLite**, so the two schemas (see
  ``relayd.store.migrations``) and their queries stay parallel. Key columns are ``COLLATE "C"``: "ordered
  by key" means byte order on both backends.
* **Batches are one statement.** ``check`` is ``address = ANY($1)``; inserts pass arrays to ``unnest``.
  One round trip per batch, whatever its size, and one prepared statement text per method.
* **reserve_sends across nodes**: the transaction takes ``pg_advisory_xact_lock`` on a hash of
  (schema, account, list, address) for every address, in ascending key order (so two transactions
  locking overlapping sets cannot deadlock), then counts and records in one statement. A second node
  reserving the same address waits for the first to commit and then sees its row (READ COMMITTED takes a
  new snapshot per statement). Hash collisions only make two addresses wait for each other.
* **Event ids follow commit order** (the webhook cursor relies on it, see ``WebhookCursorStore``): a
  sequence alone does not give that (a transaction may draw id 7, another id 8 and commit first), so every
  event-inserting transaction takes one transaction-level advisory lock before drawing ids. PostgreSQL
  makes a commit visible before it releases the transaction's locks, so the next inserter draws higher ids
  only after the previous ones are visible. The lock is taken inside the INSERT statement itself (a CTE
  the insert joins, so it is held before the first id is drawn), which keeps the insert one round trip.
  Events are group-committed as in SQLite, so the lock is taken once per batch, not per event.
* **Durability per kind of write**, like SQLite's ``synchronous`` switch: the pool's sessions run with
  ``synchronous_commit = off`` (send counters, events, webhook cursors: consistent after a crash, may lose
  the last ~0.6 s of commits), and suppression, consent, account-state and sent-ledger transactions switch
  it back on (``SET LOCAL``), so they return only once the WAL is flushed (the ledger must outlive a crash
  as the queue does: queued mail carries tokens that only its ledger rows make verifiable).
* **Round trips**: most non-durable writes are one autocommit statement (one round trip, no
  BEGIN/COMMIT); the per-message write path costs four (the ledger's durable transaction, three, shared by
  every message of a group commit; then ``record_event``).
* **Change propagation**: suppression writes ``NOTIFY relayd_suppression`` and account-state writes
  ``NOTIFY relayd_account`` inside their transaction (delivered only if it commits).
  :meth:`PostgresStore.subscribe` listens on a dedicated connection that reconnects by itself and, after a
  reconnect, calls every callback with an empty payload ("anything may have changed meanwhile").
* **Migrations** run under a session advisory lock keyed by the ``search_path``, so two nodes starting at
  once apply each migration exactly once; the version is re-read under the lock.

Failure: every asyncpg error, ``OSError`` and timeout is re-raised as :class:`StoreError` with the DSN (its
password masked) and the cause chained; the daemon answers 451. The pool replaces broken connections by
itself; when a connection turns out to be dead, the whole pool's idle connections are expired (a server
restart kills all of them), and a read, or a write whose ``BEGIN`` failed, is retried once on a fresh
connection, so a restart costs callers at most one StoreError per in-flight write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self, TypeAlias

import asyncpg

if TYPE_CHECKING:
    pass

from ..groupcommit import GroupCommit
from ..migrations import LATEST_VERSION, pending
from ..models import Event, SchemaTooNewError, StoreError, utcnow
from ..rows import micros
from ..sql import EVENT_COLUMNS
from .driver import (
    DB_ERRORS,
    IDENT,
    LOCK_EVENTS,
    LOCK_MIGRATE,
    Connection,
    Record,
    lock_key,
    lost_connection,
    mask,
    reset,
)

__all__ = ["CHANNEL_ACCOUNT", "CHANNEL_SUPPRESSION", "ChangeCallback", "PostgresConnection"]

log = logging.getLogger(__package__)  # one logger per backend: relayd.store.postgresql

#: ``NOTIFY`` channel of suppression changes; payload: the address when one address changed, else ``''``.
CHANNEL_SUPPRESSION: Final = "relayd_suppression"
#: ``NOTIFY`` channel of suspensions and reinstatements; payload: the account name.
CHANNEL_ACCOUNT: Final = "relayd_account"

#: ``callback(channel, payload)``; may be a coroutine function. An empty payload means "refresh everything"
#: (several addresses changed, or notifications may have been missed while the listener reconnected).
ChangeCallback: TypeAlias = Callable[[str, str], Awaitable[None] | None]


_MIGRATE_TIMEOUT: Final = 3600.0  # another node may be folding millions of rows into a new roll-up

_SCHEMA_TABLE: Final = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)"
)

# `{lock}`: the events lock of this store's schema. The INSERT joins the one-row CTE that takes it, so no
# row (and no id drawn by the identity default) exists before the lock is held; ORDER BY i draws the ids
# in the order the caller gave the events. A keyed event seen again adds to the stored one (migration 6):
# an update, so the statement trigger's NEW TABLE (inserted rows only) leaves the roll-ups alone.
_INSERT_EVENTS: Final = (
    "WITH serialise AS (SELECT pg_advisory_xact_lock({lock}))"
    f" INSERT INTO events ({EVENT_COLUMNS}) SELECT {EVENT_COLUMNS} FROM serialise, unnest($1::int8[],"
    " $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[],"
    f" $10::int8[], $11::int8[]) WITH ORDINALITY AS e({EVENT_COLUMNS}, i) ORDER BY i"
    " ON CONFLICT (dedup_key) WHERE dedup_key IS NOT NULL DO UPDATE SET"
    " count = events.count + excluded.count,"
    " last_seen = greatest(coalesce(events.last_seen, events.at), coalesce(excluded.last_seen, excluded.at))"
)


class PostgresConnection:
    """The pool of one PostgreSQL database (or schema); each table's module adds its methods to this, and
    :class:`relayd.store.postgresql.PostgresStore` is all of them together.

    ``dsn`` is a libpq-style URI (``postgresql://relayd@127.0.0.1/relayd``; passwords belong in a
    ``.pgpass`` file or ``PGPASSWORD``, not in the config). ``schema`` puts the tables in that schema
    (created on open) instead of the DSN's ``search_path``: for sharing a database, and for tests.
    ``min_size``/``max_size`` bound the pool; ``command_timeout`` bounds every statement, lock waits
    included, and ``connect_timeout`` every connection attempt (then :class:`StoreError`).
    """

    if TYPE_CHECKING:  # in the events and sends modules; their group commits start here

        async def record_events(self, events: Iterable[Event]) -> None: ...

        async def _write_sent(self, rows: list[tuple[Any, ...]]) -> None: ...

    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None = None,
        min_size: int = 1,
        max_size: int = 10,
        command_timeout: float = 5.0,
        connect_timeout: float = 5.0,
    ) -> None:
        if schema is not None and not IDENT.fullmatch(schema):
            raise ValueError(f"schema must be a lower-case SQL identifier, got {schema!r}")
        self.dsn = dsn
        self.schema = schema
        self._min_size = max(0, min_size)
        self._max_size = max(1, max_size, self._min_size)
        self._command_timeout = command_timeout
        self._connect_timeout = connect_timeout
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._schema_name = ""  # current_schema() once open: part of every lock key
        self._insert_events = ""
        self._events: GroupCommit[Event] = GroupCommit(self.record_events)
        self._sent: GroupCommit[tuple[Any, ...]] = GroupCommit(self._write_sent)
        self._subscribers: dict[str, list[ChangeCallback]] = {}
        self._listener: asyncpg.Connection[asyncpg.Record] | None = None
        self._listener_task: asyncio.Task[None] | None = None
        self._callback_tasks: set[asyncio.Task[None]] = set()
        self._listen_lock = asyncio.Lock()
        self._closing = False

    def __repr__(self) -> str:
        schema = f", schema={self.schema!r}" if self.schema else ""
        return f"PostgresStore({mask(self.dsn)!r}{schema})"

    def _server_settings(self) -> dict[str, str]:
        settings = {"application_name": "relayd", "synchronous_commit": "off"}
        if self.schema is not None:
            settings["search_path"] = self.schema
        return settings

    async def open(self) -> None:
        """Create the pool and migrate. Idempotent. Raises StoreError if the server is unreachable."""
        if self._pool is not None:
            return
        self._closing = False
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=self._min_size,
                max_size=self._max_size,
                command_timeout=self._command_timeout,
                timeout=self._connect_timeout,
                server_settings=self._server_settings(),
                reset=reset,
            )
            await self.migrate()
            async with self._pool.acquire(timeout=self._connect_timeout) as conn:
                self._schema_name = str(await conn.fetchval("SELECT current_schema()"))
            key = lock_key(self._schema_name)
            self._insert_events = _INSERT_EVENTS.format(lock=f"{LOCK_EVENTS}, {key}")
        except (*DB_ERRORS, ValueError) as exc:  # asyncpg raises ValueError subclasses for a bad DSN
            await self.close()
            raise StoreError(f"{mask(self.dsn)}: cannot open store: {exc}") from exc
        except BaseException:  # StoreError from migrate() (SchemaTooNewError ...), cancellation
            await self.close()
            raise

    async def close(self) -> None:
        """Commit buffered writes, stop listening, close the pool. Safe to call twice."""
        self._closing = True
        await self._sent.drain(self)
        await self._events.drain(self)
        if self._listener_task is not None:
            self._listener_task.cancel()
            with contextlib.suppress(BaseException):
                await self._listener_task
            self._listener_task = None
        for task in list(self._callback_tasks):
            task.cancel()
        self._callback_tasks.clear()
        if self._listener is not None:
            listener, self._listener = self._listener, None
            try:
                await asyncio.wait_for(listener.close(), self._connect_timeout)
            except Exception:
                listener.terminate()
        self._subscribers.clear()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), self._command_timeout + self._connect_timeout)
            except Exception:  # a connection stuck on a dead socket: drop them all
                log.warning("%r: pool did not close in time, terminating it", self, exc_info=True)
                pool.terminate()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def migrate(self) -> int:
        """Apply pending migrations, each in its own transaction; return the schema version.

        Holds a session advisory lock keyed by the ``search_path`` for the whole run, so a node starting
        while another migrates waits and then finds nothing to do. Raises :class:`SchemaTooNewError` if a
        newer relayd migrated the database, :class:`StoreError` if a migration has no PostgreSQL DDL.
        """
        pool = self._require_pool()
        try:
            async with pool.acquire(timeout=self._connect_timeout) as conn:
                return await self._migrate_on(conn)
        except DB_ERRORS as exc:
            raise StoreError(f"{mask(self.dsn)}: migration failed: {exc}") from exc

    async def _migrate_on(self, conn: Connection) -> int:
        lock = f"{LOCK_MIGRATE}, hashtext(current_setting('search_path'))"
        await conn.execute(f"SELECT pg_advisory_lock({lock})", timeout=_MIGRATE_TIMEOUT)
        try:
            if self.schema is not None:
                await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            await conn.execute(_SCHEMA_TABLE)
            while True:
                async with conn.transaction():
                    await conn.execute("SET LOCAL synchronous_commit = on")
                    current = int(
                        await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations")
                    )
                    if current > LATEST_VERSION:
                        raise SchemaTooNewError(
                            f"{mask(self.dsn)}: schema version {current} is newer than this relayd "
                            f"({LATEST_VERSION}); upgrade relayd"
                        )
                    todo = pending(current)
                    if not todo:
                        return current
                    step = todo[0]
                    if step.postgresql is None:
                        raise StoreError(f"migration {step.version} ({step.name}) has no PostgreSQL DDL")
                    for statement in step.postgresql:
                        await conn.execute(statement, timeout=_MIGRATE_TIMEOUT)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
                        step.version,
                        step.name,
                        micros(utcnow()),
                    )
                log.info("%r: migrated store schema to version %d (%s)", self, step.version, step.name)
        finally:
            if not conn.is_closed():
                with contextlib.suppress(*DB_ERRORS):
                    await conn.execute(f"SELECT pg_advisory_unlock({lock})")

    def _require_pool(self) -> asyncpg.Pool[asyncpg.Record]:
        if self._pool is None:
            raise StoreError(f"{mask(self.dsn)}: store is not open")
        return self._pool

    async def _on_error(self, exc: BaseException) -> None:
        """After a lost connection, replace every idle connection too: they likely died together."""
        if lost_connection(exc) and self._pool is not None and not self._closing:
            with contextlib.suppress(Exception):
                await self._pool.expire_connections()

    def _error(self, what: str, exc: BaseException) -> StoreError:
        return StoreError(f"{mask(self.dsn)}: {what}: {type(exc).__name__}: {exc}")

    async def _fetch(self, sql: str, *args: Any) -> list[Record]:
        """Run a read; on a lost connection retry once on a fresh one (reads are idempotent)."""
        for attempt in (1, 2):
            pool = self._require_pool()
            try:
                conn = await pool.acquire(timeout=self._connect_timeout)
            except DB_ERRORS as exc:  # the pool just tried a fresh connection: do not try again
                await self._on_error(exc)
                raise self._error("cannot connect", exc) from exc
            try:
                return await conn.fetch(sql, *args)
            except DB_ERRORS as exc:
                await self._on_error(exc)
                if attempt == 1 and lost_connection(exc):
                    log.info("%r: connection lost (%s), retrying the read", self, exc)
                    continue
                raise self._error("query failed", exc) from exc
            finally:
                with contextlib.suppress(*DB_ERRORS):
                    await pool.release(conn)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _begin(self, begin: str) -> Connection:
        """Acquire a connection and run ``begin`` (``BEGIN; ...``), retrying once on a dead connection:
        nothing has been written yet, so the retry cannot apply anything twice."""
        for attempt in (1, 2):
            pool = self._require_pool()
            try:
                conn = await pool.acquire(timeout=self._connect_timeout)
            except DB_ERRORS as exc:
                await self._on_error(exc)
                raise self._error("cannot connect", exc) from exc
            try:
                await conn.execute(begin)
                return conn
            except BaseException as exc:
                # e.g. the lock wait timed out: leave no aborted transaction for the pool to find
                if conn.is_in_transaction() and not conn.is_closed():
                    with contextlib.suppress(*DB_ERRORS):
                        await conn.execute("ROLLBACK")
                with contextlib.suppress(*DB_ERRORS):
                    await pool.release(conn)
                if not isinstance(exc, DB_ERRORS):
                    raise
                await self._on_error(exc)
                if attempt == 1 and lost_connection(exc):
                    continue
                raise self._error("cannot begin a transaction", exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    @asynccontextmanager
    async def _transaction(self, *, durable: bool, lock: str = "") -> AsyncIterator[Connection]:
        """A transaction, committed on success, rolled back otherwise; errors become StoreError.

        ``durable=False`` commits without waiting for the WAL flush (the session default, see the module
        docstring). ``lock``
        is SQL appended to the BEGIN round trip (``; SELECT pg_advisory_xact_lock(...)``): our own
        integers only, never caller text.
        """
        begin = "BEGIN; SET LOCAL synchronous_commit = on" if durable else "BEGIN"
        conn = await self._begin(begin + lock)
        pool = self._require_pool()
        try:
            try:
                yield conn
                await conn.execute("COMMIT")
            except BaseException as exc:
                if conn.is_in_transaction() and not conn.is_closed():
                    with contextlib.suppress(*DB_ERRORS):
                        await conn.execute("ROLLBACK")
                if not isinstance(exc, DB_ERRORS):
                    raise
                await self._on_error(exc)
                raise self._error("write failed", exc) from exc
        finally:
            with contextlib.suppress(*DB_ERRORS):
                await pool.release(conn)

    async def _autocommit(self, sql: str, *args: Any) -> list[Record]:
        """One statement as its own transaction (non-durable: the session default): one round trip.

        Not retried on a lost connection: the statement may have committed before the connection died,
        and most of these writes are not idempotent (an event, a counter increment).
        """
        pool = self._require_pool()
        try:
            conn = await pool.acquire(timeout=self._connect_timeout)
        except DB_ERRORS as exc:
            await self._on_error(exc)
            raise self._error("cannot connect", exc) from exc
        try:
            return await conn.fetch(sql, *args)
        except DB_ERRORS as exc:
            await self._on_error(exc)
            raise self._error("write failed", exc) from exc
        finally:
            with contextlib.suppress(*DB_ERRORS):
                await pool.release(conn)

    async def _autocommit_count(self, sql: str, *args: Any) -> int:
        """Like :meth:`_autocommit` for a DELETE: the number of rows it removed."""
        rows = await self._autocommit(f"WITH gone AS ({sql} RETURNING 1) SELECT count(*) FROM gone", *args)
        return int(rows[0][0])

    @staticmethod
    async def _notify(conn: Connection, channel: str, payload: str) -> None:
        await conn.execute("SELECT pg_notify($1, $2)", channel, payload)
