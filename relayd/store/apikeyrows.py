"""The ``api_keys`` table (migration 9) as both backends read and write it.

Why a module of its own: the statements and the row conversion are the same for SQLite and PostgreSQL
except for the placeholders (``mark(n)``: ``?`` or ``$n``), so they are written once here and each backend
only runs them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from .base import ApiKey, as_utc

__all__ = ["COLUMNS", "api_key", "api_key_row", "insert_sql", "list_sql", "revoke_sql", "select_sql"]

COLUMNS: Final = "key_id, account, key_hash, name, created_at, revoked_at"
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_US: Final = timedelta(microseconds=1)


def _us(value: datetime) -> int:
    return (as_utc(value) - _EPOCH) // _US


def api_key_row(key: ApiKey) -> tuple[Any, ...]:
    """The values of :data:`COLUMNS` for ``key``."""
    revoked = None if key.revoked_at is None else _us(key.revoked_at)
    return (key.key_id, key.account, key.key_hash, key.name, _us(key.created_at), revoked)


def api_key(row: Sequence[Any]) -> ApiKey:
    """An :class:`ApiKey` from a row of :data:`COLUMNS`."""
    key_id, account, key_hash, name, created_at, revoked_at = row
    return ApiKey(
        key_id=str(key_id),
        account=str(account),
        key_hash=str(key_hash),
        name=str(name),
        created_at=_EPOCH + timedelta(microseconds=int(created_at)),
        revoked_at=None if revoked_at is None else _EPOCH + timedelta(microseconds=int(revoked_at)),
    )


def insert_sql(mark: Callable[[int], str]) -> str:
    """Insert a key unless its id exists (the caller sees no row returned, or a row count of 0, then)."""
    values = ", ".join(mark(i) for i in range(1, 7))
    return (
        f"INSERT INTO api_keys ({COLUMNS}) VALUES ({values}) ON CONFLICT (key_id) DO NOTHING RETURNING key_id"
    )


def select_sql(mark: Callable[[int], str]) -> str:
    return f"SELECT {COLUMNS} FROM api_keys WHERE key_id = {mark(1)}"


def list_sql(mark: Callable[[int], str], *, by_account: bool) -> str:
    where = f" WHERE account = {mark(1)}" if by_account else ""
    return f"SELECT {COLUMNS} FROM api_keys{where} ORDER BY account, created_at, key_id"


def revoke_sql(mark: Callable[[int], str]) -> str:
    """Revoke a valid key: ``revoked_at`` = ``mark(1)`` where ``key_id`` = ``mark(2)``; returns its id."""
    return (
        f"UPDATE api_keys SET revoked_at = {mark(1)} WHERE key_id = {mark(2)} AND revoked_at IS NULL"
        " RETURNING key_id"
    )


def when(value: datetime) -> int:
    """``value`` as the table stores times (microseconds since the epoch)."""
    return _us(value)
