"""Consent records and confirmation mails sent, in PostgreSQL
(:class:`relayd.store.protocols.ConsentStore`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import datetime
from typing import Final

from ..models import ConsentRecord
from ..rows import consent, consent_row, distinct, micros
from ..sql import CONSENT_COLUMNS, CONSENT_UPSERT_CONFLICT, consent_page
from .connection import PostgresConnection
from .driver import CHUNK, as_columns, dollar, last_per_key

_UPSERT_CONSENT: Final = (
    f"INSERT INTO consent ({CONSENT_COLUMNS})"
    " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::text[],"
    f" $7::text[], $8::text[]){CONSENT_UPSERT_CONFLICT}"
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


class ConsentTables(PostgresConnection):
    """Double opt-in: the proof of each consent, and the rate limit of confirmation mails."""

    async def add_consent(self, records: Iterable[ConsentRecord]) -> int:
        # One row per key, the last given (a statement may not upsert a row twice), in key order.
        rows, written = last_per_key((consent_row(r) for r in records), 3)
        if not rows:
            return 0
        async with self._transaction(durable=True) as conn:
            for start in range(0, len(rows), CHUNK):
                await conn.execute(_UPSERT_CONSENT, *as_columns(rows[start : start + CHUNK], 8))
        return written

    async def get_consent(self, account: str, list_name: str, address: str) -> ConsentRecord | None:
        rows = await self._fetch(
            f"SELECT {CONSENT_COLUMNS} FROM consent WHERE account = $1 AND list_name = $2 AND address = $3",
            account,
            list_name,
            address,
        )
        return consent(rows[0]) if rows else None

    async def has_consent(self, account: str, list_name: str, addresses: Sequence[str]) -> set[str]:
        unique = distinct(addresses)
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
    ) -> AsyncIterator[list[ConsentRecord]]:
        # Keyset pagination in key order, like scan(): each batch is one index range read.
        first, params = consent_page(
            dollar, account=account, list_name=list_name, address=address, after=False
        )
        following, _ = consent_page(dollar, account=account, list_name=list_name, address=address, after=True)
        rows = await self._fetch(first, *params, batch_size)
        while rows:
            yield [consent(row) for row in rows]
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
        at_us = micros(at)
        rows = await self._autocommit(
            _RESERVE_OPTIN, account, list_name, unique, at_us, at_us - round(window * 1_000_000)
        )
        return {row[0] for row in rows}

    async def prune_optin(self, before: datetime) -> int:
        return await self._autocommit_count("DELETE FROM optin_sent WHERE sent_at < $1", micros(before))
