"""Suppression entries in PostgreSQL: who must not be mailed
(:class:`relayd.store.protocols.SuppressionStore`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import datetime
from typing import Final

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
from .connection import CHANNEL_SUPPRESSION, PostgresConnection
from .driver import CHUNK, as_columns, dollar, last_per_key

_UPSERT_SUPPRESSION: Final = (
    f"INSERT INTO suppression ({ENTRY_COLUMNS})"
    " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],"
    f" $7::int8[], $8::int8[]){ENTRY_UPSERT_CONFLICT}"
)

_CHECK: Final = (
    f"SELECT {ENTRY_COLUMNS} FROM suppression WHERE address = ANY($1::text[])"
    " AND (scope = 'global' OR (scope = 'account' AND account = $2)"
    " OR (scope = 'list' AND account = $2 AND list_name = $3))"
    " AND (expires_at IS NULL OR expires_at > $4)"
)


class SuppressionTables(PostgresConnection):
    """``add`` .. ``purge_expired`` of :class:`~relayd.store.postgresql.PostgresStore`; changes are announced
    on :data:`CHANNEL_SUPPRESSION`."""

    async def add(self, entries: Iterable[SuppressionEntry], *, keep: frozenset[Reason] = frozenset()) -> int:
        # One row per key, the last one given (upsert semantics; a statement may not upsert a row twice),
        # in key order: two concurrent imports then lock rows in the same order and cannot deadlock.
        rows, written = last_per_key((entry_row(e) for e in entries), 4)
        if not rows:
            return 0
        addresses = {row[0] for row in rows}
        sql = _UPSERT_SUPPRESSION + keep_reasons(keep)
        async with self._transaction(durable=True) as conn:
            for start in range(0, len(rows), CHUNK):
                await conn.execute(sql, *as_columns(rows[start : start + CHUNK], 8))
            payload = next(iter(addresses)) if len(addresses) == 1 else ""
            await self._notify(conn, CHANNEL_SUPPRESSION, payload)
        return written

    async def remove(
        self,
        address: str,
        scope: Scope | None = None,
        account: str | None = None,
        list_name: str | None = None,
    ) -> int:
        sql, params = suppression_remove(dollar, address, scope, account, list_name)
        async with self._transaction(durable=True) as conn:
            status = await conn.execute(sql, *params)
            removed = int(status.rsplit(" ", 1)[1])
            if removed:
                await self._notify(conn, CHANNEL_SUPPRESSION, address)
        return removed

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
            dollar,
            address=address,
            scope=scope,
            account=account,
            list_name=list_name,
            reason=reason,
            not_expired_at_us=None if include_expired else micros(now or utcnow()),
            limit=limit,
            offset=offset,
        )
        return [suppression_entry(row) for row in await self._fetch(sql, *params)]

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
        unique = distinct(addresses)
        if not unique:
            return {}
        # One statement for every batch size and list/no list: '' matches no list-scope entry (those
        # always name a list), so the text stays the same and asyncpg's prepared statement is reused.
        rows = await self._fetch(_CHECK, unique, account, list_name or "", micros(now or utcnow()))
        found: dict[str, SuppressionEntry] = {}
        keep_broadest(found, rows)
        return found

    async def scan(self, *, batch_size: int = 10_000) -> AsyncIterator[list[SuppressionEntry]]:
        # Keyset pagination: each batch is one index range read; no long-lived transaction or cursor.
        rows = await self._fetch(suppression_page(dollar, first=True), batch_size)
        while rows:
            yield [suppression_entry(row) for row in rows]
            if len(rows) < batch_size:
                return
            last = rows[-1]
            rows = await self._fetch(
                suppression_page(dollar, first=False),
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
                micros(now or utcnow()),
            )
        return int(status.rsplit(" ", 1)[1])
