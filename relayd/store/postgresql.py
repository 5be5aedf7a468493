"""PostgreSQL backend of the policy store (asyncpg): several relayd nodes sharing one state.

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
import builtins
import contextlib
import dataclasses
import hashlib
import inspect
import logging
import re
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import asyncpg

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

from . import apikeyrows, deskrows
from .base import (
    SCOPE_PRECEDENCE,
    AccountState,
    ApiKey,
    ConsentRecord,
    DmarcCount,
    Event,
    InboxItem,
    MtaStsRecord,
    Reason,
    SchemaTooNewError,
    Scope,
    SentRecord,
    StoreError,
    SuppressionEntry,
    SuspendReason,
    TlsSessionCount,
    as_utc,
    utcnow,
)
from .groupcommit import GroupCommit
from .migrations import LATEST_VERSION, pending
from .query import ENTRY_COLUMNS, suppression_list

__all__ = ["CHANNEL_ACCOUNT", "CHANNEL_SUPPRESSION", "ChangeCallback", "PostgresStore"]

log = logging.getLogger(__name__)

#: ``NOTIFY`` channel of suppression changes; payload: the address when one address changed, else ``''``.
CHANNEL_SUPPRESSION: Final = "relayd_suppression"
#: ``NOTIFY`` channel of suspensions and reinstatements; payload: the account name.
CHANNEL_ACCOUNT: Final = "relayd_account"

#: ``callback(channel, payload)``; may be a coroutine function. An empty payload means "refresh everything"
#: (several addresses changed, or notifications may have been missed while the listener reconnected).
ChangeCallback: TypeAlias = Callable[[str, str], Awaitable[None] | None]

Record: TypeAlias = asyncpg.Record
Connection: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"  # generic in the stubs only

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_US: Final = timedelta(microseconds=1)
_HOUR_US: Final = 3_600_000_000  # the roll-up granularity of sent_hourly / event_hourly (migration 3)
_CHUNK: Final = 50_000  # rows per INSERT statement in bulk writes (a 1 M-row import is 20 statements)
_MIGRATE_TIMEOUT: Final = 3600.0  # another node may be folding millions of rows into a new roll-up

# First key of our two-int advisory locks ("rd" + kind), so they never meet another application's locks.
_LOCK_MIGRATE: Final = 0x72640001
_LOCK_EVENTS: Final = 0x72640002
_LOCK_SENDS: Final = 0x72640003

_IDENT: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")

#: What may come out of asyncpg (or the socket under it): mapped to StoreError at the edge.
#: InternalClientError: e.g. a query on a connection whose server just sent "terminating connection" while
#: it was idle in the pool, before the socket's EOF was read ("cannot switch to state ...").
_DB_ERRORS: Final = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)

_SCHEMA_TABLE: Final = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)"
)
_UPSERT_SUPPRESSION: Final = (
    f"INSERT INTO suppression ({ENTRY_COLUMNS})"
    " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],"
    " $7::int8[], $8::int8[])"
    " ON CONFLICT (address, scope, account, list_name) DO UPDATE SET"
    " reason = excluded.reason, source = excluded.source,"
    " created_at = excluded.created_at, expires_at = excluded.expires_at"
)
_CHECK: Final = (
    f"SELECT {ENTRY_COLUMNS} FROM suppression WHERE address = ANY($1::text[])"
    " AND (scope = 'global' OR (scope = 'account' AND account = $2)"
    " OR (scope = 'list' AND account = $2 AND list_name = $3))"
    " AND (expires_at IS NULL OR expires_at > $4)"
)
_UPSERT_SENDS: Final = (
    "INSERT INTO send_log (account, list_name, address, sent_at, n)"
    " SELECT $1, $2, a, $4, 1 FROM unnest($3::text[]) AS a"
    " ON CONFLICT (account, list_name, address, sent_at) DO UPDATE SET n = send_log.n + 1"
)
# Count and record in one statement (one snapshot, taken after the address locks are held): `blocked` is
# every address with cap or more sends inside some window (window w: sent_at > at - w), the INSERT
# records the rest and returns them.
_RESERVE: Final = (
    "WITH blocked AS ("
    " SELECT l.address FROM send_log AS l"
    " JOIN unnest($5::int8[], $6::int8[]) AS w(start, cap) ON l.sent_at > w.start"
    " WHERE l.account = $1 AND l.list_name = $2 AND l.address = ANY($3::text[]) AND l.sent_at > $7"
    " GROUP BY l.address, w.start, w.cap HAVING sum(l.n) >= w.cap)"
    " INSERT INTO send_log (account, list_name, address, sent_at, n)"
    " SELECT $1, $2, a, $4, 1 FROM unnest($3::text[]) AS a"
    " WHERE a NOT IN (SELECT address FROM blocked)"
    " ON CONFLICT (account, list_name, address, sent_at) DO UPDATE SET n = send_log.n + 1"
    " RETURNING address"
)
_ACCOUNT_COLUMNS: Final = "account, suspended, reason, details, since"
_EVENT_COLUMNS: Final = (
    "at, kind, account, list_name, address, reason, queue_id, evidence, dedup_key, count, last_seen"
)
# `{lock}`: the events lock of this store's schema. The INSERT joins the one-row CTE that takes it, so no
# row (and no id drawn by the identity default) exists before the lock is held; ORDER BY i draws the ids
# in the order the caller gave the events. A keyed event seen again adds to the stored one (migration 6):
# an update, so the statement trigger's NEW TABLE (inserted rows only) leaves the roll-ups alone.
_INSERT_EVENTS: Final = (
    "WITH serialise AS (SELECT pg_advisory_xact_lock({lock}))"
    f" INSERT INTO events ({_EVENT_COLUMNS}) SELECT {_EVENT_COLUMNS} FROM serialise, unnest($1::int8[],"
    " $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[],"
    f" $10::int8[], $11::int8[]) WITH ORDINALITY AS e({_EVENT_COLUMNS}, i) ORDER BY i"
    " ON CONFLICT (dedup_key) WHERE dedup_key IS NOT NULL DO UPDATE SET"
    " count = events.count + excluded.count,"
    " last_seen = greatest(coalesce(events.last_seen, events.at), coalesce(excluded.last_seen, excluded.at))"
)
_CONSENT_COLUMNS: Final = "account, list_name, address, confirmed_at, ip, user_agent, source, evidence"
_UPSERT_CONSENT: Final = (
    f"INSERT INTO consent ({_CONSENT_COLUMNS})"
    " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::text[],"
    " $7::text[], $8::text[])"
    " ON CONFLICT (account, list_name, address) DO UPDATE SET confirmed_at = excluded.confirmed_at,"
    " ip = excluded.ip, user_agent = excluded.user_agent, source = excluded.source,"
    " evidence = excluded.evidence"
)
# Check and record in one statement, without advisory locks: a concurrent reservation of the same key
# blocks on the row, and ON CONFLICT re-evaluates the WHERE against the row it committed, so exactly one
# of them gets it back from RETURNING.
_RESERVE_OPTIN: Final = (
    "INSERT INTO optin_sent (account, list_name, address, sent_at)"
    " SELECT $1, $2, a, $4 FROM unnest($3::text[]) AS a"
    " ON CONFLICT (account, list_name, address) DO UPDATE SET sent_at = excluded.sent_at"
    " WHERE optin_sent.sent_at <= $5"
    " RETURNING address"
)
_UPSERT_SENT: Final = (
    "INSERT INTO sent (queue_id, idx, account, list_name, address, sent_at)"
    " SELECT * FROM unnest($1::text[], $2::int4[], $3::text[], $4::text[], $5::text[], $6::int8[])"
    " ON CONFLICT (queue_id, idx) DO UPDATE SET account = excluded.account,"
    " list_name = excluded.list_name, address = excluded.address, sent_at = excluded.sent_at"
)


def _us(value: datetime) -> int:
    """Microseconds since the epoch, exactly (no float rounding)."""
    return (as_utc(value) - _EPOCH) // _US


def _dt(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


def _opt_dt(value: int | None) -> datetime | None:
    return None if value is None else _dt(value)


def _entry(row: Record) -> SuppressionEntry:
    return SuppressionEntry(
        address=row[0],
        scope=Scope(row[1]),
        account=row[2] or None,
        list=row[3] or None,
        reason=Reason(row[4]),
        source=row[5],
        created_at=_dt(row[6]),
        expires_at=_opt_dt(row[7]),
    )


def _event(row: Record, first: int = 0) -> Event:
    """The event in ``row``'s columns ``first`` .. ``first + 10`` (``_EVENT_COLUMNS`` order)."""
    return Event(
        at=_dt(row[first]),
        kind=row[first + 1],
        account=row[first + 2],
        list=row[first + 3],
        address=row[first + 4],
        reason=row[first + 5],
        queue_id=row[first + 6],
        evidence=row[first + 7],
        key=row[first + 8],
        count=row[first + 9],
        last_seen=_opt_dt(row[first + 10]),
    )


def _consent(row: Record) -> ConsentRecord:
    return ConsentRecord(
        account=row[0],
        list=row[1],
        address=row[2],
        confirmed_at=_dt(row[3]),
        ip=row[4],
        user_agent=row[5],
        source=row[6],
        evidence=row[7],
    )


def _account_state(row: Record) -> AccountState:
    return AccountState(
        account=row[0],
        suspended=bool(row[1]),
        reason=None if row[2] is None else SuspendReason(row[2]),
        details=row[3],
        since=_dt(row[4]),
    )


def _columns(rows: Sequence[Sequence[Any]], width: int) -> builtins.list[builtins.list[Any]]:
    """Rows to per-column lists: the array arguments of an ``unnest`` insert."""
    return [[row[i] for row in rows] for i in range(width)] if rows else [[] for _ in range(width)]


def _merge_keyed(events: Iterable[Event]) -> builtins.list[Event]:
    """One event per key, at the place of its first: one INSERT .. ON CONFLICT may not update a row twice.

    The later ones add their ``count`` and move ``last_seen``, as they would have one statement later."""
    out: builtins.list[Event] = []
    where: dict[str, int] = {}
    for e in events:
        if e.key is None:
            out.append(e)
            continue
        i = where.get(e.key)
        if i is None:
            where[e.key] = len(out)
            out.append(e)
            continue
        first = out[i]
        seen = max(first.last_seen or first.at, e.last_seen or e.at)
        out[i] = dataclasses.replace(first, count=first.count + e.count, last_seen=seen)
    return out


def _lock_key(*parts: str) -> int:
    """A stable signed 32-bit hash (the second key of a two-int advisory lock); NUL-joined parts."""
    digest = hashlib.blake2b("\0".join(parts).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


def _dollar(n: int) -> str:
    """asyncpg's placeholder for the n-th parameter (for the statements shared with SQLite)."""
    return f"${n}"


def _mask(dsn: str) -> str:
    """The DSN for messages and logs, with any password replaced by ``***``."""
    try:
        parts = urllib.parse.urlsplit(dsn)
    except ValueError:
        return "<unparsable dsn>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        netloc = f"{userinfo}@{host}"
    query = urllib.parse.urlencode(
        [
            (k, "***" if k == "password" else v)
            for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        ]
    )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _lost_connection(exc: BaseException) -> bool:
    """True when ``exc`` says the connection (or the server) is gone, not that one query failed."""
    if isinstance(exc, asyncpg.QueryCanceledError):  # statement timeout: the connection is fine
        return False
    return isinstance(
        exc,
        OSError
        | asyncpg.PostgresConnectionError
        | asyncpg.CannotConnectNowError
        | asyncpg.OperatorInterventionError  # e.g. 57P01 terminating connection (admin or shutdown)
        | asyncpg.InterfaceError  # "connection is closed"
        | asyncpg.InternalClientError,  # the protocol is in a state we did not put it in
    )


async def _reset(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """Pool ``reset`` hook: nothing to undo (asyncpg rolls back an open transaction before calling it).

    Passing it replaces asyncpg's default, a ``RESET ALL; UNLISTEN *; ...`` round trip on every release.
    """


class PostgresStore:
    """The policy store in a PostgreSQL database; implements :class:`relayd.store.base.Store`.

    ``dsn`` is a libpq-style URI (``postgresql://relayd@127.0.0.1/relayd``; passwords belong in a
    ``.pgpass`` file or ``PGPASSWORD``, not in the config). ``schema`` puts the tables in that schema
    (created on open) instead of the DSN's ``search_path``: for sharing a database, and for tests.
    ``min_size``/``max_size`` bound the pool; ``command_timeout`` bounds every statement, lock waits
    included, and ``connect_timeout`` every connection attempt (then :class:`StoreError`).
    """

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
        if schema is not None and not _IDENT.fullmatch(schema):
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
        self._subscribers: dict[str, builtins.list[ChangeCallback]] = {}
        self._listener: asyncpg.Connection[asyncpg.Record] | None = None
        self._listener_task: asyncio.Task[None] | None = None
        self._callback_tasks: set[asyncio.Task[None]] = set()
        self._listen_lock = asyncio.Lock()
        self._closing = False

    def __repr__(self) -> str:
        schema = f", schema={self.schema!r}" if self.schema else ""
        return f"PostgresStore({_mask(self.dsn)!r}{schema})"

    # -- lifecycle -------------------------------------------------------------------------------------

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
                reset=_reset,
            )
            await self.migrate()
            async with self._pool.acquire(timeout=self._connect_timeout) as conn:
                self._schema_name = str(await conn.fetchval("SELECT current_schema()"))
            key = _lock_key(self._schema_name)
            self._insert_events = _INSERT_EVENTS.format(lock=f"{_LOCK_EVENTS}, {key}")
        except (*_DB_ERRORS, ValueError) as exc:  # asyncpg raises ValueError subclasses for a bad DSN
            await self.close()
            raise StoreError(f"{_mask(self.dsn)}: cannot open store: {exc}") from exc
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
        for task in builtins.list(self._callback_tasks):
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

    async def __aenter__(self) -> PostgresStore:
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
        except _DB_ERRORS as exc:
            raise StoreError(f"{_mask(self.dsn)}: migration failed: {exc}") from exc

    async def _migrate_on(self, conn: Connection) -> int:
        lock = f"{_LOCK_MIGRATE}, hashtext(current_setting('search_path'))"
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
                            f"{_mask(self.dsn)}: schema version {current} is newer than this relayd "
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
                        _us(utcnow()),
                    )
                log.info("%r: migrated store schema to version %d (%s)", self, step.version, step.name)
        finally:
            if not conn.is_closed():
                with contextlib.suppress(*_DB_ERRORS):
                    await conn.execute(f"SELECT pg_advisory_unlock({lock})")

    # -- plumbing --------------------------------------------------------------------------------------

    def _require_pool(self) -> asyncpg.Pool[asyncpg.Record]:
        if self._pool is None:
            raise StoreError(f"{_mask(self.dsn)}: store is not open")
        return self._pool

    async def _on_error(self, exc: BaseException) -> None:
        """After a lost connection, replace every idle connection too: they likely died together."""
        if _lost_connection(exc) and self._pool is not None and not self._closing:
            with contextlib.suppress(Exception):
                await self._pool.expire_connections()

    def _error(self, what: str, exc: BaseException) -> StoreError:
        return StoreError(f"{_mask(self.dsn)}: {what}: {type(exc).__name__}: {exc}")

    async def _fetch(self, sql: str, *args: Any) -> builtins.list[Record]:
        """Run a read; on a lost connection retry once on a fresh one (reads are idempotent)."""
        for attempt in (1, 2):
            pool = self._require_pool()
            try:
                conn = await pool.acquire(timeout=self._connect_timeout)
            except _DB_ERRORS as exc:  # the pool just tried a fresh connection: do not try again
                await self._on_error(exc)
                raise self._error("cannot connect", exc) from exc
            try:
                return await conn.fetch(sql, *args)
            except _DB_ERRORS as exc:
                await self._on_error(exc)
                if attempt == 1 and _lost_connection(exc):
                    log.info("%r: connection lost (%s), retrying the read", self, exc)
                    continue
                raise self._error("query failed", exc) from exc
            finally:
                with contextlib.suppress(*_DB_ERRORS):
                    await pool.release(conn)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _begin(self, begin: str) -> Connection:
        """Acquire a connection and run ``begin`` (``BEGIN; ...``), retrying once on a dead connection:
        nothing has been written yet, so the retry cannot apply anything twice."""
        for attempt in (1, 2):
            pool = self._require_pool()
            try:
                conn = await pool.acquire(timeout=self._connect_timeout)
            except _DB_ERRORS as exc:
                await self._on_error(exc)
                raise self._error("cannot connect", exc) from exc
            try:
                await conn.execute(begin)
                return conn
            except BaseException as exc:
                # e.g. the lock wait timed out: leave no aborted transaction for the pool to find
                if conn.is_in_transaction() and not conn.is_closed():
                    with contextlib.suppress(*_DB_ERRORS):
                        await conn.execute("ROLLBACK")
                with contextlib.suppress(*_DB_ERRORS):
                    await pool.release(conn)
                if not isinstance(exc, _DB_ERRORS):
                    raise
                await self._on_error(exc)
                if attempt == 1 and _lost_connection(exc):
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
                    with contextlib.suppress(*_DB_ERRORS):
                        await conn.execute("ROLLBACK")
                if not isinstance(exc, _DB_ERRORS):
                    raise
                await self._on_error(exc)
                raise self._error("write failed", exc) from exc
        finally:
            with contextlib.suppress(*_DB_ERRORS):
                await pool.release(conn)

    async def _autocommit(self, sql: str, *args: Any) -> builtins.list[Record]:
        """One statement as its own transaction (non-durable: the session default): one round trip.

        Not retried on a lost connection: the statement may have committed before the connection died,
        and most of these writes are not idempotent (an event, a counter increment).
        """
        pool = self._require_pool()
        try:
            conn = await pool.acquire(timeout=self._connect_timeout)
        except _DB_ERRORS as exc:
            await self._on_error(exc)
            raise self._error("cannot connect", exc) from exc
        try:
            return await conn.fetch(sql, *args)
        except _DB_ERRORS as exc:
            await self._on_error(exc)
            raise self._error("write failed", exc) from exc
        finally:
            with contextlib.suppress(*_DB_ERRORS):
                await pool.release(conn)

    async def _autocommit_count(self, sql: str, *args: Any) -> int:
        """Like :meth:`_autocommit` for a DELETE: the number of rows it removed."""
        rows = await self._autocommit(f"WITH gone AS ({sql} RETURNING 1) SELECT count(*) FROM gone", *args)
        return int(rows[0][0])

    # -- change notification ---------------------------------------------------------------------------

    async def subscribe(self, channel: str, callback: ChangeCallback) -> None:
        """Call ``callback(channel, payload)`` for every ``NOTIFY`` on ``channel`` (any node's, ours too).

        Why: a node caching account states or suppression answers learns of another node's change within
        milliseconds instead of at its next poll. The listener has its own connection (a pooled one would
        be reset on release); when it is lost it is re-established in the background, and every callback
        is then called with payload ``''``, since notifications sent meanwhile are gone. Raises
        StoreError when the first connection cannot be made. Callbacks must not block; exceptions they
        raise are logged.
        """
        if not _IDENT.fullmatch(channel):
            raise ValueError(f"channel must be a lower-case SQL identifier, got {channel!r}")
        self._require_pool()
        async with self._listen_lock:  # two first subscribers must not open two listener connections
            callbacks = self._subscribers.setdefault(channel, [])
            callbacks.append(callback)
            if len(callbacks) > 1:
                return
            try:
                if self._listener is not None and not self._listener.is_closed():
                    await self._listener.add_listener(channel, self._on_notify)
                elif self._listener_task is None or self._listener_task.done():
                    self._listener = await self._connect_listener()  # listens on every channel
                # else: the reconnect loop will LISTEN on this channel too
            except _DB_ERRORS as exc:
                callbacks.remove(callback)
                raise self._error(f"cannot LISTEN on {channel}", exc) from exc

    async def unsubscribe(self, channel: str, callback: ChangeCallback) -> None:
        """Stop calling ``callback`` for ``channel``; unknown pairs are ignored."""
        callbacks = self._subscribers.get(channel, [])
        with contextlib.suppress(ValueError):
            callbacks.remove(callback)
        if not callbacks and self._listener is not None and not self._listener.is_closed():
            self._subscribers.pop(channel, None)
            with contextlib.suppress(*_DB_ERRORS):
                await self._listener.remove_listener(channel, self._on_notify)

    async def _connect_listener(self) -> asyncpg.Connection[asyncpg.Record]:
        conn = await asyncpg.connect(
            self.dsn, timeout=self._connect_timeout, server_settings=self._server_settings()
        )
        try:
            for channel in builtins.list(self._subscribers):
                await conn.add_listener(channel, self._on_notify)
        except BaseException:
            conn.terminate()
            raise
        conn.add_termination_listener(self._on_listener_lost)
        return conn

    def _on_listener_lost(self, conn: object) -> None:
        if self._closing or conn is not self._listener:
            return
        log.warning("%r: LISTEN connection lost; reconnecting", self)
        self._listener = None
        if self._listener_task is None or self._listener_task.done():
            self._listener_task = asyncio.get_running_loop().create_task(self._relisten())

    async def _relisten(self) -> None:
        """Reconnect the listener with backoff (0.1 s doubling to 5 s), then tell every subscriber."""
        delay = 0.1
        while not self._closing:
            try:
                async with (
                    self._listen_lock
                ):  # a concurrent subscribe() sees the channel list or the listener
                    self._listener = await self._connect_listener()
            except _DB_ERRORS as exc:
                log.debug("%r: LISTEN reconnect failed: %s", self, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            log.info("%r: LISTEN connection re-established", self)
            for channel, callbacks in builtins.list(self._subscribers.items()):
                for callback in builtins.list(callbacks):
                    self._dispatch(callback, channel, "")
            return

    def _on_notify(self, conn: object, pid: int, channel: str, payload: object) -> None:
        for callback in builtins.list(self._subscribers.get(channel, ())):
            self._dispatch(callback, channel, str(payload))

    def _dispatch(self, callback: ChangeCallback, channel: str, payload: str) -> None:
        try:
            result = callback(channel, payload)
        except Exception:
            log.exception("%r: %s callback failed", self, channel)
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(self._await_callback(result, channel))
            self._callback_tasks.add(task)
            task.add_done_callback(self._callback_tasks.discard)

    async def _await_callback(self, result: Awaitable[None], channel: str) -> None:
        try:
            await result
        except Exception:
            log.exception("%r: %s callback failed", self, channel)

    # -- suppression -----------------------------------------------------------------------------------

    async def add(self, entries: Iterable[SuppressionEntry], *, keep: frozenset[Reason] = frozenset()) -> int:
        # One row per key, the last one given (upsert semantics; a statement may not upsert a row twice),
        # in key order: two concurrent imports then lock rows in the same order and cannot deadlock.
        by_key: dict[tuple[str, str, str, str], tuple[Any, ...]] = {}
        written = 0
        for e in entries:
            written += 1
            key = (e.address, e.scope.value, e.account or "", e.list or "")
            by_key[key] = (
                *key,
                e.reason.value,
                e.source,
                _us(e.created_at),
                None if e.expires_at is None else _us(e.expires_at),
            )
        if not by_key:
            return 0
        rows = [by_key[k] for k in sorted(by_key)]
        addresses = {row[0] for row in rows}
        sql = _UPSERT_SUPPRESSION
        if keep:
            kept = ", ".join(f"'{Reason(r).value}'" for r in sorted(keep))  # enum values: no quoting issue
            sql += f" WHERE suppression.reason NOT IN ({kept})"
        async with self._transaction(durable=True) as conn:
            for start in range(0, len(rows), _CHUNK):
                await conn.execute(sql, *_columns(rows[start : start + _CHUNK], 8))
            payload = next(iter(addresses)) if len(addresses) == 1 else ""
            await self._notify(conn, CHANNEL_SUPPRESSION, payload)
        return written

    @staticmethod
    async def _notify(conn: Connection, channel: str, payload: str) -> None:
        await conn.execute("SELECT pg_notify($1, $2)", channel, payload)

    async def remove(
        self,
        address: str,
        scope: Scope | None = None,
        account: str | None = None,
        list_name: str | None = None,
    ) -> int:
        if scope is not None:
            sql = (
                "DELETE FROM suppression"
                " WHERE address = $1 AND scope = $2 AND account = $3 AND list_name = $4"
            )
            params: builtins.list[Any] = [address, Scope(scope).value, account or "", list_name or ""]
        else:
            sql = "DELETE FROM suppression WHERE address = $1"
            params = [address]
            if account is not None:
                params.append(account)
                sql += f" AND account = ${len(params)}"
            if list_name is not None:
                params.append(list_name)
                sql += f" AND list_name = ${len(params)}"
        async with self._transaction(durable=True) as conn:
            status = await conn.execute(sql, *params)
            removed = int(status.rsplit(" ", 1)[1])
            if removed:
                await self._notify(conn, CHANNEL_SUPPRESSION, address)
        return removed

    async def list(
        self,
        *,
        address: str | None = None,
        scope: Scope | None = None,
        account: str | None = None,
        list_name: str | None = None,
        reason: Reason | None = None,
        include_expired: bool = False,
        now: datetime | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> builtins.list[SuppressionEntry]:
        sql, params = suppression_list(
            lambda n: f"${n}",
            address=address,
            scope=scope,
            account=account,
            list_name=list_name,
            reason=reason,
            not_expired_at_us=None if include_expired else _us(now or utcnow()),
            limit=limit,
            offset=offset,
        )
        return [_entry(row) for row in await self._fetch(sql, *params)]

    async def count(self, *, scope: Scope | None = None) -> int:
        if scope is None:
            rows = await self._fetch("SELECT count(*) FROM suppression")
        else:
            rows = await self._fetch("SELECT count(*) FROM suppression WHERE scope = $1", Scope(scope).value)
        return int(rows[0][0])

    async def check(
        self,
        addresses: Sequence[str],
        account: str,
        list_name: str | None,
        now: datetime | None = None,
    ) -> dict[str, SuppressionEntry]:
        unique = builtins.list(dict.fromkeys(addresses))
        if not unique:
            return {}
        # One statement for every batch size and list/no list: '' matches no list-scope entry (those
        # always name a list), so the text stays the same and asyncpg's prepared statement is reused.
        rows = await self._fetch(_CHECK, unique, account, list_name or "", _us(now or utcnow()))
        found: dict[str, SuppressionEntry] = {}
        for row in rows:
            entry = _entry(row)
            best = found.get(entry.address)
            if best is None or SCOPE_PRECEDENCE[entry.scope] < SCOPE_PRECEDENCE[best.scope]:
                found[entry.address] = entry
        return found

    async def scan(self, *, batch_size: int = 10_000) -> AsyncIterator[builtins.list[SuppressionEntry]]:
        # Keyset pagination: each batch is one index range read; no long-lived transaction or cursor.
        order = " ORDER BY address, scope, account, list_name LIMIT "
        rows = await self._fetch(f"SELECT {ENTRY_COLUMNS} FROM suppression{order}$1", batch_size)
        while rows:
            yield [_entry(row) for row in rows]
            if len(rows) < batch_size:
                return
            last = rows[-1]
            rows = await self._fetch(
                f"SELECT {ENTRY_COLUMNS} FROM suppression"
                f" WHERE (address, scope, account, list_name) > ($1, $2, $3, $4){order}$5",
                last[0],
                last[1],
                last[2],
                last[3],
                batch_size,
            )

    async def purge_expired(self, now: datetime | None = None) -> int:
        # No NOTIFY: expired entries already stopped blocking, so no cached answer changes.
        async with self._transaction(durable=True) as conn:
            status = await conn.execute(
                "DELETE FROM suppression WHERE expires_at IS NOT NULL AND expires_at <= $1",
                _us(now or utcnow()),
            )
        return int(status.rsplit(" ", 1)[1])

    # -- send counters ---------------------------------------------------------------------------------

    async def record_sends(
        self, account: str, list_name: str | None, addresses: Sequence[str], at: datetime
    ) -> None:
        unique = builtins.list(dict.fromkeys(addresses))
        if not unique:
            return
        await self._autocommit(_UPSERT_SENDS, account, list_name or "", unique, _us(at))

    async def count_sends(
        self, account: str, list_name: str | None, addresses: Sequence[str], since: datetime
    ) -> dict[str, int]:
        unique = builtins.list(dict.fromkeys(addresses))
        counts = dict.fromkeys(unique, 0)
        if not unique:
            return counts
        rows = await self._fetch(
            "SELECT address, sum(n) FROM send_log WHERE account = $1 AND list_name = $2"
            " AND address = ANY($3::text[]) AND sent_at >= $4 GROUP BY address",
            account,
            list_name or "",
            unique,
            _us(since),
        )
        for address, n in rows:
            counts[address] = int(n)
        return counts

    async def reserve_sends(
        self,
        account: str,
        list_name: str | None,
        addresses: Sequence[str],
        at: datetime,
        caps: Mapping[int, int],
    ) -> set[str]:
        unique = builtins.list(dict.fromkeys(addresses))
        if not unique:
            return set()
        windows = sorted(caps)
        if any(w <= 0 for w in windows):
            raise ValueError(f"cap windows must be positive seconds, got {windows}")
        if any(caps[w] <= 0 for w in windows):
            return set()  # nothing may be sent: no need to lock or write anything
        at_us = _us(at)
        lname = list_name or ""
        if not windows:
            await self.record_sends(account, list_name, unique, at)
            return set(unique)
        # Lock keys in ascending order, inlined into the BEGIN round trip (they are our own integers).
        keys = sorted({_lock_key(self._schema_name, account, lname, a) for a in unique})
        lock = (
            f"; SELECT pg_advisory_xact_lock({_LOCK_SENDS}, k)"
            f" FROM unnest('{{{','.join(map(str, keys))}}}'::int4[]) AS k"
        )
        starts = [at_us - w * 1_000_000 for w in windows]
        async with self._transaction(durable=False, lock=lock) as conn:
            rows = await conn.fetch(
                _RESERVE, account, lname, unique, at_us, starts, [caps[w] for w in windows], min(starts)
            )
        return {row[0] for row in rows}

    async def prune(self, before: datetime) -> int:
        return await self._autocommit_count("DELETE FROM send_log WHERE sent_at < $1", _us(before))

    # -- account state ---------------------------------------------------------------------------------

    async def suspend(
        self, account: str, reason: SuspendReason, details: str = "", at: datetime | None = None
    ) -> AccountState:
        reason = SuspendReason(reason)
        async with self._transaction(durable=True) as conn:
            row = await conn.fetchrow(
                f"INSERT INTO account_state ({_ACCOUNT_COLUMNS}) VALUES ($1, true, $2, $3, $4)"
                " ON CONFLICT (account) DO UPDATE SET suspended = true,"
                " reason = excluded.reason, details = excluded.details,"
                " since = CASE WHEN account_state.suspended THEN account_state.since ELSE excluded.since END"
                f" RETURNING {_ACCOUNT_COLUMNS}",
                account,
                reason.value,
                details,
                _us(at or utcnow()),
            )
            await self._notify(conn, CHANNEL_ACCOUNT, account)
        assert row is not None  # an upsert always returns its row
        log.info("account %s suspended (%s)", account, reason.value)
        return _account_state(row)

    async def reinstate(self, account: str, at: datetime | None = None) -> AccountState | None:
        async with self._transaction(durable=True) as conn:
            row = await conn.fetchrow(
                "UPDATE account_state SET suspended = false, reason = NULL, details = '', since = $1"
                f" WHERE account = $2 AND suspended RETURNING {_ACCOUNT_COLUMNS}",
                _us(at or utcnow()),
                account,
            )
            if row is None:
                row = await conn.fetchrow(
                    f"SELECT {_ACCOUNT_COLUMNS} FROM account_state WHERE account = $1", account
                )
            else:
                await self._notify(conn, CHANNEL_ACCOUNT, account)
        if row is None:
            return None
        log.info("account %s reinstated", account)
        return _account_state(row)

    async def get_account_state(self, account: str) -> AccountState | None:
        rows = await self._fetch(f"SELECT {_ACCOUNT_COLUMNS} FROM account_state WHERE account = $1", account)
        return _account_state(rows[0]) if rows else None

    async def list_account_states(self, *, suspended_only: bool = False) -> builtins.list[AccountState]:
        sql = f"SELECT {_ACCOUNT_COLUMNS} FROM account_state"
        if suspended_only:
            sql += " WHERE suspended"
        return [_account_state(row) for row in await self._fetch(sql + " ORDER BY account")]

    # -- events ----------------------------------------------------------------------------------------

    async def record_event(self, event: Event) -> None:
        await self._events.add([event])

    async def record_events(self, events: Iterable[Event]) -> None:
        rows = [
            (
                _us(e.at),
                e.kind,
                e.account,
                e.list,
                e.address,
                e.reason,
                e.queue_id,
                e.evidence,
                e.key,
                e.count,
                None if e.last_seen is None else _us(e.last_seen),
            )
            for e in _merge_keyed(events)
        ]
        if not rows:
            return
        self._require_pool()
        if len(rows) <= _CHUNK:
            await self._autocommit(self._insert_events, *_columns(rows, 11))
            return
        async with self._transaction(durable=False) as conn:  # the lock is re-entrant: one per chunk is fine
            for start in range(0, len(rows), _CHUNK):
                await conn.execute(self._insert_events, *_columns(rows[start : start + _CHUNK], 11))

    async def event_by_key(self, key: str) -> Event | None:
        rows = await self._fetch(f"SELECT {_EVENT_COLUMNS} FROM events WHERE dedup_key = $1", key)
        return _event(rows[0]) if rows else None

    async def events(
        self,
        since: datetime,
        limit: int = 1000,
        account: str | None = None,
        kind: str | None = None,
    ) -> builtins.list[Event]:
        sql = f"SELECT {_EVENT_COLUMNS} FROM events WHERE at >= $1"
        params: builtins.list[Any] = [_us(since)]
        if account is not None:
            params.append(account)
            sql += f" AND account = ${len(params)}"
        if kind is not None:
            params.append(kind)
            sql += f" AND kind = ${len(params)}"
        params.append(limit)
        sql += f" ORDER BY at, id LIMIT ${len(params)}"
        return [_event(row) for row in await self._fetch(sql, *params)]

    async def prune_events(self, before: datetime) -> int:
        return await self._autocommit_count("DELETE FROM events WHERE at < $1", _us(before))

    async def count_events(
        self,
        kind: str,
        since: datetime,
        *,
        account: str | None = None,
        address: str | None = None,
        reason: str | None = None,
    ) -> int:
        start = _us(since)
        if account is not None and address is None:
            # roll-up for the whole hours, the log (events_account_kind_at) for the partial first hour
            edge = -(-start // _HOUR_US)
            raw = "SELECT count(*) FROM events WHERE account = $1 AND kind = $2 AND at >= $3 AND at < $4"
            rollup = (
                "SELECT coalesce(sum(n), 0) FROM event_hourly WHERE account = $1 AND kind = $2 AND hour >= $5"
            )
            params: builtins.list[Any] = [account, kind, start, edge * _HOUR_US, edge]
            if reason is not None:
                raw += " AND reason = $6"
                rollup += " AND reason = $6"
                params.append(reason)
            rows = await self._fetch(f"SELECT ({raw}) + ({rollup})", *params)
            return int(rows[0][0])
        sql = "SELECT count(*) FROM events WHERE kind = $1 AND at >= $2"
        params = [kind, start]
        for column, value in (("address", address), ("account", account), ("reason", reason)):
            if value is not None:
                params.append(value)
                sql += f" AND {column} = ${len(params)}"
        rows = await self._fetch(sql, *params)
        return int(rows[0][0])

    # -- sent ledger -----------------------------------------------------------------------------------

    async def record_sent(self, records: Iterable[SentRecord]) -> None:
        """Group commit, like events: every message accepted meanwhile shares one transaction."""
        rows = [(r.queue_id, r.index, r.account, r.list or "", r.address, _us(r.sent_at)) for r in records]
        if rows:
            await self._sent.add(rows)

    async def _write_sent(self, rows: builtins.list[tuple[Any, ...]]) -> None:
        """Durable (WAL flushed at commit), unlike the other per-message writes: the queue is, and a
        queued message whose ledger row a server crash took would carry an unsubscribe link, VERP address
        and trace token that verify for nothing. Group commit shares the flush among concurrent messages."""
        # One row per (queue_id, idx), the last given: insert-or-replace, and one statement may not
        # upsert a row twice.
        unique = builtins.list({(row[0], row[1]): row for row in rows}.values())
        async with self._transaction(durable=True) as conn:
            for start in range(0, len(unique), _CHUNK):
                await conn.execute(_UPSERT_SENT, *_columns(unique[start : start + _CHUNK], 6))

    async def lookup_sent(self, queue_id: str, index: int) -> SentRecord | None:
        rows = await self._fetch(
            "SELECT queue_id, idx, account, list_name, address, sent_at FROM sent"
            " WHERE queue_id = $1 AND idx = $2",
            queue_id,
            index,
        )
        if not rows:
            return None
        qid, idx, account, lname, address, at = rows[0]
        return SentRecord(qid, idx, account, lname or None, address, _dt(at))

    async def scan_sent(self, *, batch_size: int = 10_000) -> AsyncIterator[builtins.list[SentRecord]]:
        # Keyset pagination over the primary key (queue_id is COLLATE "C": the same order as SQLite).
        last: tuple[str, int] = ("", -1)
        while True:
            rows = await self._fetch(
                "SELECT queue_id, idx, account, list_name, address, sent_at FROM sent"
                " WHERE (queue_id, idx) > ($1, $2) ORDER BY queue_id, idx LIMIT $3",
                *last,
                batch_size,
            )
            if not rows:
                return
            yield [SentRecord(q, i, a, ln or None, addr, _dt(at)) for q, i, a, ln, addr, at in rows]
            last = (rows[-1][0], rows[-1][1])

    async def prune_sent(self, before: datetime) -> int:
        return await self._autocommit_count("DELETE FROM sent WHERE sent_at < $1", _us(before))

    async def count_sent(self, account: str, since: datetime) -> int:
        start = _us(since)
        edge = -(-start // _HOUR_US)  # first whole hour at or after `since`
        rows = await self._fetch(
            "SELECT (SELECT count(*) FROM sent WHERE account = $1 AND sent_at >= $2 AND sent_at < $3)"
            " + (SELECT coalesce(sum(n), 0) FROM sent_hourly WHERE account = $1 AND hour >= $4)",
            account,
            start,
            edge * _HOUR_US,
            edge,
        )
        return int(rows[0][0])

    # -- webhook outbox (events read by id, per-endpoint cursors) ---------------------------------------

    async def events_after(
        self, after_id: int, account: str | None, limit: int = 100
    ) -> builtins.list[tuple[int, Event]]:
        # Primary-key range scan; `coalesce(account, '')` keeps the planner off the account indexes (it
        # would otherwise sort an account's whole history by id on every poll), as in SQLite.
        sql = f"SELECT id, {_EVENT_COLUMNS} FROM events WHERE id > $1"
        params: builtins.list[Any] = [after_id]
        if account is not None:
            params.append(account)
            sql += " AND coalesce(account, '') = $2"
        params.append(limit)
        sql += f" ORDER BY id LIMIT ${len(params)}"
        return [(int(row[0]), _event(row, 1)) for row in await self._fetch(sql, *params)]

    async def max_event_id(self) -> int:
        rows = await self._fetch("SELECT coalesce(max(id), 0) FROM events")
        return int(rows[0][0])

    async def get_webhook_cursor(self, key: str) -> int | None:
        rows = await self._fetch("SELECT event_id FROM webhook_cursor WHERE endpoint = $1", key)
        return int(rows[0][0]) if rows else None

    async def set_webhook_cursor(self, key: str, event_id: int) -> None:
        await self._autocommit(
            "INSERT INTO webhook_cursor (endpoint, event_id, updated_at) VALUES ($1, $2, $3)"
            " ON CONFLICT (endpoint) DO UPDATE SET"
            " event_id = excluded.event_id, updated_at = excluded.updated_at",
            key,
            event_id,
            _us(utcnow()),
        )

    # -- consent (double opt-in) -----------------------------------------------------------------------

    async def add_consent(self, records: Iterable[ConsentRecord]) -> int:
        # One row per key, the last given (a statement may not upsert a row twice), in key order.
        by_key: dict[tuple[str, str, str], tuple[Any, ...]] = {}
        written = 0
        for r in records:
            written += 1
            key = (r.account, r.list, r.address)
            by_key[key] = (*key, _us(r.confirmed_at), r.ip, r.user_agent, r.source, r.evidence)
        if not by_key:
            return 0
        rows = [by_key[k] for k in sorted(by_key)]
        async with self._transaction(durable=True) as conn:
            for start in range(0, len(rows), _CHUNK):
                await conn.execute(_UPSERT_CONSENT, *_columns(rows[start : start + _CHUNK], 8))
        return written

    async def get_consent(self, account: str, list_name: str, address: str) -> ConsentRecord | None:
        rows = await self._fetch(
            f"SELECT {_CONSENT_COLUMNS} FROM consent WHERE account = $1 AND list_name = $2 AND address = $3",
            account,
            list_name,
            address,
        )
        return _consent(rows[0]) if rows else None

    async def has_consent(self, account: str, list_name: str, addresses: Sequence[str]) -> set[str]:
        unique = builtins.list(dict.fromkeys(addresses))
        if not unique:
            return set()
        rows = await self._fetch(
            "SELECT address FROM consent WHERE account = $1 AND list_name = $2 AND address = ANY($3::text[])",
            account,
            list_name,
            unique,
        )
        return {row[0] for row in rows}

    async def consents(
        self,
        *,
        account: str | None = None,
        list_name: str | None = None,
        address: str | None = None,
        batch_size: int = 10_000,
    ) -> AsyncIterator[builtins.list[ConsentRecord]]:
        # Keyset pagination in key order, like scan(): each batch is one index range read.
        where: builtins.list[str] = []
        params: builtins.list[Any] = []
        for column, value in (("account", account), ("list_name", list_name), ("address", address)):
            if value is not None:
                params.append(value)
                where.append(f"{column} = ${len(params)}")
        n = len(params)
        first = f"SELECT {_CONSENT_COLUMNS} FROM consent"
        if where:
            first += " WHERE " + " AND ".join(where)
        order = " ORDER BY account, list_name, address LIMIT "
        following = (
            f"SELECT {_CONSENT_COLUMNS} FROM consent WHERE "
            + " AND ".join([*where, f"(account, list_name, address) > (${n + 1}, ${n + 2}, ${n + 3})"])
            + f"{order}${n + 4}"
        )
        rows = await self._fetch(f"{first}{order}${n + 1}", *params, batch_size)
        while rows:
            yield [_consent(row) for row in rows]
            if len(rows) < batch_size:
                return
            last = rows[-1]
            rows = await self._fetch(following, *params, last[0], last[1], last[2], batch_size)

    async def reserve_optin(
        self,
        account: str,
        list_name: str,
        addresses: Sequence[str],
        at: datetime,
        window: float,
    ) -> set[str]:
        # Sorted: two batches sharing addresses lock their rows in the same order (no deadlock).
        unique = sorted(set(addresses))
        if not unique:
            return set()
        at_us = _us(at)
        rows = await self._autocommit(
            _RESERVE_OPTIN, account, list_name, unique, at_us, at_us - round(window * 1_000_000)
        )
        return {row[0] for row in rows}

    async def prune_optin(self, before: datetime) -> int:
        return await self._autocommit_count("DELETE FROM optin_sent WHERE sent_at < $1", _us(before))

    # -- tenant API keys -------------------------------------------------------------------------------

    async def add_api_key(self, key: ApiKey) -> None:
        async with self._transaction(durable=True) as conn:
            rows = await conn.fetch(apikeyrows.insert_sql(_dollar), *apikeyrows.api_key_row(key))
        if not rows:
            raise ValueError(f"API key id {key.key_id!r} exists already")

    async def get_api_key(self, key_id: str) -> ApiKey | None:
        rows = await self._fetch(apikeyrows.select_sql(_dollar), key_id)
        return apikeyrows.api_key(tuple(rows[0])) if rows else None

    async def list_api_keys(self, account: str | None = None) -> builtins.list[ApiKey]:
        sql = apikeyrows.list_sql(_dollar, by_account=account is not None)
        rows = await self._fetch(sql, account) if account is not None else await self._fetch(sql)
        return [apikeyrows.api_key(tuple(row)) for row in rows]

    async def revoke_api_key(self, key_id: str, at: datetime | None = None) -> bool:
        async with self._transaction(durable=True) as conn:
            rows = await conn.fetch(apikeyrows.revoke_sql(_dollar), apikeyrows.when(at or utcnow()), key_id)
        return bool(rows)

    # -- MTA-STS policy cache --------------------------------------------------------------------------

    async def get_mta_sts(self, domain: str) -> MtaStsRecord | None:
        rows = await self._fetch(
            "SELECT policy_id, mode, mx, max_age, fetched_at FROM mta_sts_policies WHERE domain = $1", domain
        )
        return _mta_sts_record(domain, tuple(rows[0])) if rows else None

    async def put_mta_sts(self, record: MtaStsRecord) -> None:
        await self._autocommit(_UPSERT_MTA_STS, *_mta_sts_row(record))

    async def prune_mta_sts(self, before: datetime) -> int:
        return await self._autocommit_count("DELETE FROM mta_sts_policies WHERE expires_at < $1", _us(before))

    # -- TLS reporting counts --------------------------------------------------------------------------

    async def add_tls_sessions(self, counts: Iterable[TlsSessionCount]) -> None:
        # one row per key (a statement may not upsert a row twice), in key order (no deadlock between nodes)
        summed: dict[tuple[Any, ...], int] = {}
        for c in counts:
            key = _tls_row(c)[:-1]
            summed[key] = summed.get(key, 0) + c.sessions
        if not summed:
            return
        keys = sorted(summed)
        columns = [list(col) for col in zip(*keys, strict=True)]
        await self._autocommit(_ADD_TLS_SESSIONS, *columns, [summed[k] for k in keys])

    async def tls_sessions(self, day: date) -> builtins.list[TlsSessionCount]:
        rows = await self._fetch(f"SELECT {_TLS_COLUMNS} FROM tlsrpt_counts WHERE day = $1", _day(day))
        return [_tls_count(tuple(row)) for row in rows]

    async def claim_tls_report(self, day: date, domain: str) -> bool:
        rows = await self._autocommit(
            "INSERT INTO tlsrpt_sent (day, domain, sent_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING"
            " RETURNING day",
            _day(day),
            domain,
            _us(utcnow()),
        )
        return len(rows) == 1

    async def prune_tls_sessions(self, before: date) -> int:
        await self._autocommit_count("DELETE FROM tlsrpt_sent WHERE day < $1", _day(before))
        return await self._autocommit_count("DELETE FROM tlsrpt_counts WHERE day < $1", _day(before))

    # -- the postmaster's inbox ------------------------------------------------------------------------

    async def add_inbox_item(self, item: InboxItem, raw: bytes) -> int:
        marks = ", ".join(f"${i}" for i in range(1, 14))
        rows = await self._autocommit(
            f"INSERT INTO inbox ({deskrows.INBOX_COLUMNS}) VALUES ({marks}) RETURNING id",
            *deskrows.inbox_row(item, raw),
        )
        return int(rows[0][0])

    async def count_inbox_from(self, source: str, since: datetime) -> int:
        rows = await self._fetch(
            "SELECT count(*) FROM inbox WHERE source = $1 AND received_at >= $2", source, _us(since)
        )
        return int(rows[0][0])

    async def inbox_items(
        self,
        *,
        since: datetime | None = None,
        kind: str | None = None,
        state: str | None = None,
        limit: int = 1000,
    ) -> builtins.list[InboxItem]:
        rows = await self._fetch(
            f"SELECT {deskrows.INBOX_LIST_COLUMNS} FROM inbox WHERE received_at >= $1"
            " AND ($2::text IS NULL OR kind = $2) AND ($3::text IS NULL OR state = $3)"
            " ORDER BY id DESC LIMIT $4",
            _us(since) if since is not None else 0,
            kind,
            state,
            limit,
        )
        return [deskrows.inbox_item(tuple(row)) for row in rows]

    async def get_inbox_item(self, item_id: int) -> InboxItem | None:
        rows = await self._fetch(
            f"SELECT {deskrows.INBOX_LIST_COLUMNS}, raw FROM inbox WHERE id = $1", item_id
        )
        return deskrows.inbox_item(tuple(rows[0])[:13], rows[0][13]) if rows else None

    async def mark_inbox_done(self, item_id: int, at: datetime) -> bool:
        rows = await self._autocommit(
            "UPDATE inbox SET state = 'done', done_at = coalesce(done_at, $1) WHERE id = $2 RETURNING id",
            _us(at),
            item_id,
        )
        return len(rows) == 1

    async def count_open_inbox(self) -> int:
        rows = await self._fetch("SELECT count(*) FROM inbox WHERE state = 'open'")
        return int(rows[0][0])

    async def prune_inbox(self, before: datetime) -> int:
        return await self._autocommit_count("DELETE FROM inbox WHERE received_at < $1", _us(before))

    # -- DMARC aggregate counts ------------------------------------------------------------------------

    async def add_dmarc_report(
        self, org: str, report_id: str, domain: str, received_at: datetime, counts: Sequence[DmarcCount]
    ) -> bool:
        day = min((c.day for c in counts), default=received_at.date())
        # one row per key (a statement may not upsert a row twice), in key order (no deadlock between nodes)
        summed: dict[tuple[Any, ...], list[int]] = {}
        for c in counts:
            row = deskrows.dmarc_row(c)
            total = summed.setdefault(row[:5], [0] * 8)
            for i, n in enumerate(row[5:]):
                total[i] += n
        async with self._transaction(durable=False) as conn:
            claimed = await conn.fetch(
                "INSERT INTO dmarc_reports (org, report_id, domain, day, received_at)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING day",
                org,
                report_id,
                domain,
                deskrows.day_number(day),
                _us(received_at),
            )
            if not claimed:
                return False
            keys = sorted(summed)
            if keys:
                columns = [list(col) for col in zip(*[(*k, *summed[k]) for k in keys], strict=True)]
                await conn.execute(_ADD_DMARC, *columns)
            return True

    async def dmarc_counts(self, domain: str, since: date) -> builtins.list[DmarcCount]:
        rows = await self._fetch(
            f"SELECT {deskrows.DMARC_COLUMNS} FROM dmarc_counts WHERE domain = $1 AND day >= $2",
            domain,
            deskrows.day_number(since),
        )
        return [deskrows.dmarc_count(tuple(row)) for row in rows]

    async def prune_dmarc(self, before: date) -> int:
        day = deskrows.day_number(before)
        await self._autocommit_count("DELETE FROM dmarc_reports WHERE day < $1", day)
        return await self._autocommit_count("DELETE FROM dmarc_counts WHERE day < $1", day)


_UPSERT_MTA_STS: Final = (
    "INSERT INTO mta_sts_policies (domain, policy_id, mode, mx, max_age, fetched_at, expires_at)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (domain) DO UPDATE SET policy_id = excluded.policy_id,"
    " mode = excluded.mode, mx = excluded.mx, max_age = excluded.max_age,"
    " fetched_at = excluded.fetched_at, expires_at = excluded.expires_at"
)


def _mta_sts_row(r: MtaStsRecord) -> tuple[Any, ...]:
    return (r.domain, r.policy_id, r.mode, "\n".join(r.mx), r.max_age, _us(r.fetched_at), _us(r.expires_at))


def _mta_sts_record(domain: str, row: Sequence[Any]) -> MtaStsRecord:
    policy_id, mode, mx, max_age, fetched_at = row
    patterns = tuple(str(mx).split("\n")) if mx else ()
    return MtaStsRecord(domain, str(policy_id), str(mode), patterns, int(max_age), _dt(int(fetched_at)))


_TLS_COLUMNS: Final = "day, domain, policy_type, policy, result_type, receiving_mx, receiving_ip, sessions"
_ADD_TLS_SESSIONS: Final = (
    f"INSERT INTO tlsrpt_counts ({_TLS_COLUMNS})"
    " SELECT * FROM unnest($1::int4[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],"
    " $7::text[], $8::int8[])"
    " ON CONFLICT (day, domain, policy_type, policy, result_type, receiving_mx, receiving_ip)"
    " DO UPDATE SET sessions = tlsrpt_counts.sessions + excluded.sessions"
)
_EPOCH_DAY: Final = date(1970, 1, 1)


def _day(value: date) -> int:
    return (value - _EPOCH_DAY).days


def _tls_row(c: TlsSessionCount) -> tuple[Any, ...]:
    key = (c.domain, c.policy_type, c.policy, c.result_type, c.receiving_mx, c.receiving_ip)
    return (_day(c.day), *key, c.sessions)


def _tls_count(row: Sequence[Any]) -> TlsSessionCount:
    day, *text, sessions = row
    domain, ptype, policy, result, mx, ip = (str(t) for t in text)
    return TlsSessionCount(
        _EPOCH_DAY + timedelta(days=int(day)), domain, ptype, policy, result, mx, ip, int(sessions)
    )


_ADD_DMARC: Final = (
    f"INSERT INTO dmarc_counts ({deskrows.DMARC_COLUMNS})"
    " SELECT * FROM unnest($1::text[], $2::int4[], $3::text[], $4::text[], $5::text[], $6::int8[],"
    " $7::int8[], $8::int8[], $9::int8[], $10::int8[], $11::int8[], $12::int8[], $13::int8[])"
    " ON CONFLICT (domain, day, org, report_id, source_ip) DO UPDATE SET"
    " total = dmarc_counts.total + excluded.total, spf_pass = dmarc_counts.spf_pass + excluded.spf_pass,"
    " dkim_pass = dmarc_counts.dkim_pass + excluded.dkim_pass,"
    " spf_aligned = dmarc_counts.spf_aligned + excluded.spf_aligned,"
    " dkim_aligned = dmarc_counts.dkim_aligned + excluded.dkim_aligned,"
    " dmarc_pass = dmarc_counts.dmarc_pass + excluded.dmarc_pass,"
    " quarantined = dmarc_counts.quarantined + excluded.quarantined,"
    " rejected = dmarc_counts.rejected + excluded.rejected"
)
