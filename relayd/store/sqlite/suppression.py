"""Suppression entries in SQLite: who must not be mailed
(:class:`relayd.store.protocols.SuppressionStore`).
"""

from __future__ import annotations

import operator
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import datetime
from typing import Any, Final

from ..models import Reason, Scope, SuppressionEntry, utcnow
from ..rows import distinct, entry_row, keep_broadest, micros, suppression_entry
from ..sql import (
    ENTRY_COLUMNS,
    ENTRY_UPSERT_CONFLICT,
    keep_reasons,
    suppression_list,
    suppression_page,
    suppression_remove,
)
from .connection import SqliteConnection, marks, padded_chunks, qmark

_UPSERT_SUPPRESSION: Final = (
    f"INSERT INTO suppression ({ENTRY_COLUMNS}) VALUES ({marks(8)}){ENTRY_UPSERT_CONFLICT}"
)

_KEY: Final = operator.itemgetter(0, 1, 2, 3)  # (address, scope, account, list_name) of an entry row


class SuppressionTables(SqliteConnection):
    """``add`` .. ``purge_expired`` of :class:`~relayd.store.sqlite.SqliteStore`."""

    async def add(self, entries: Iterable[SuppressionEntry], *, keep: frozenset[Reason] = frozenset()) -> int:
        rows = [entry_row(e) for e in entries]
        if not rows:
            return 0
        # Key order turns scattered b-tree inserts into a sweep (measured: 1.8x faster on shuffled CSVs).
        # The sort is stable, so of two rows with one key the later still wins, as upsert promises.
        rows.sort(key=_KEY)
        sql = _UPSERT_SUPPRESSION + keep_reasons(keep)
        async with self._transaction(durable=True) as db:
            await db.executemany(sql, rows)
        return len(rows)

    async def remove(
        self,
        address: str,
        scope: Scope | None = None,
        account: str | None = None,
        list_name: str | None = None,
    ) -> int:
        sql, params = suppression_remove(qmark, address, scope, account, list_name)
        async with self._transaction(durable=True) as db:
            cursor = await db.execute(sql, params)
            return cursor.rowcount

    async def list_entries(
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
    ) -> list[SuppressionEntry]:
        sql, params = suppression_list(
            qmark,
            address=address,
            scope=scope,
            account=account,
            list_name=list_name,
            reason=reason,
            not_expired_at_us=None if include_expired else micros(now or utcnow()),
            limit=limit,
            offset=offset,
        )
        return [suppression_entry(row) for row in await self._fetch(sql, params)]

    async def count(self, *, scope: Scope | None = None) -> int:
        if scope is None:
            rows = await self._fetch("SELECT count(*) FROM suppression")
        else:
            rows = await self._fetch("SELECT count(*) FROM suppression WHERE scope = ?", [Scope(scope).value])
        return int(rows[0][0])

    async def check(
        self,
        addresses: Sequence[str],
        account: str,
        list_name: str | None,
        now: datetime | None = None,
    ) -> dict[str, SuppressionEntry]:
        unique = distinct(addresses)
        if not unique:
            return {}
        now_us = micros(now or utcnow())
        found: dict[str, SuppressionEntry] = {}
        for chunk in padded_chunks(unique):
            # All scopes of one address are adjacent in the primary key, so this is one short range scan
            # per address; the scope/account/list filter and the expiry test run on those few rows.
            if list_name:
                scopes = "(scope = 'global' OR (scope = 'account' AND account = ?) OR (scope = 'list' AND account = ? AND list_name = ?))"  # noqa: E501
                params: list[Any] = [*chunk, account, account, list_name, now_us]
            else:
                scopes = "(scope = 'global' OR (scope = 'account' AND account = ?))"
                params = [*chunk, account, now_us]
            sql = (
                f"SELECT {ENTRY_COLUMNS} FROM suppression WHERE address IN ({marks(len(chunk))})"
                f" AND {scopes} AND (expires_at IS NULL OR expires_at > ?)"
            )
            keep_broadest(found, await self._fetch_hot(sql, params))
        return found

    async def scan(self, *, batch_size: int = 10_000) -> AsyncIterator[list[SuppressionEntry]]:
        # Keyset pagination: each batch is one indexed range read; no long-lived read transaction.
        rows = await self._fetch(suppression_page(qmark, first=True), [batch_size])
        while rows:
            yield [suppression_entry(row) for row in rows]
            if len(rows) < batch_size:
                return
            last = rows[-1]
            rows = await self._fetch(
                suppression_page(qmark, first=False), [last[0], last[1], last[2], last[3], batch_size]
            )

    async def purge_expired(self, now: datetime | None = None) -> int:
        async with self._transaction(durable=True) as db:
            cursor = await db.execute(
                "DELETE FROM suppression WHERE expires_at IS NOT NULL AND expires_at <= ?",
                [micros(now or utcnow())],
            )
            return cursor.rowcount
