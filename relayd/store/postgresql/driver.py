"""What the PostgreSQL store needs from asyncpg beyond queries: its error types mapped to ours, the
placeholders, array arguments and advisory-lock keys, and a DSN safe to log.

Why a module of its own: every table's module writes through these, and none of them depends on the pool
(:mod:`relayd.store.postgresql.connection`).
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import asyncpg

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

__all__ = [
    "CHUNK",
    "DB_ERRORS",
    "IDENT",
    "LOCK_EVENTS",
    "LOCK_MIGRATE",
    "LOCK_SENDS",
    "Connection",
    "Record",
    "as_columns",
    "dollar",
    "last_per_key",
    "lock_key",
    "lost_connection",
    "mask",
    "reset",
]

Record: TypeAlias = asyncpg.Record
Connection: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"  # generic in the stubs only

CHUNK: Final = 50_000  # rows per INSERT statement in bulk writes (a 1 M-row import is 20 statements)

# First key of our two-int advisory locks ("rd" + kind), so they never meet another application's locks.
LOCK_MIGRATE: Final = 0x72640001
LOCK_EVENTS: Final = 0x72640002
LOCK_SENDS: Final = 0x72640003

#: A schema or channel name: a lower-case SQL identifier, written into SQL text unquoted.
IDENT: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")

#: What may come out of asyncpg (or the socket under it): mapped to StoreError at the edge.
#: InternalClientError: e.g. a query on a connection whose server just sent "terminating connection" while
#: it was idle in the pool, before the socket's EOF was read ("cannot switch to state ...").
DB_ERRORS: Final = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)


def as_columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    """Rows to per-column lists: the array arguments of an ``unnest`` insert."""
    return [[row[i] for row in rows] for i in range(width)] if rows else [[] for _ in range(width)]


def lock_key(*parts: str) -> int:
    """A stable signed 32-bit hash (the second key of a two-int advisory lock); NUL-joined parts."""
    digest = hashlib.blake2b("\0".join(parts).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


def dollar(n: int) -> str:
    """asyncpg's placeholder for the n-th parameter (for the statements shared with SQLite)."""
    return f"${n}"


def mask(dsn: str) -> str:
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


def lost_connection(exc: BaseException) -> bool:
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


async def reset(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """Pool ``reset`` hook: nothing to undo (asyncpg rolls back an open transaction before calling it).

    Passing it replaces asyncpg's default, a ``RESET ALL; UNLISTEN *; ...`` round trip on every release.
    """


def last_per_key(rows: Iterable[tuple[Any, ...]], width: int) -> tuple[list[tuple[Any, ...]], int]:
    """One row per key (its first ``width`` columns), the last one given, in key order; and how many rows
    were given. One INSERT .. ON CONFLICT may not update a row twice, and two transactions writing rows in
    the same order cannot deadlock on them."""
    by_key: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    given = 0
    for row in rows:
        given += 1
        by_key[row[:width]] = row
    return [by_key[k] for k in sorted(by_key)], given
