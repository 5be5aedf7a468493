"""Consent records and confirmation mails sent, in SQLite (:class:`relayd.store.protocols.ConsentStore`)."""

from __future__ import annotations

import operator
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import datetime
from typing import Final

from ..models import ConsentRecord
from ..rows import consent, consent_row, distinct, micros
from ..sql import CONSENT_COLUMNS, CONSENT_UPSERT_CONFLICT, consent_page
from .connection import SqliteConnection, marks, padded_chunks, qmark

_CONSENT_KEY: Final = operator.itemgetter(0, 1, 2)

_UPSERT_CONSENT: Final = (
    f"INSERT INTO consent ({CONSENT_COLUMNS}) VALUES ({marks(8)}){CONSENT_UPSERT_CONFLICT}"
)

_UPSERT_OPTIN: Final = (
    "INSERT INTO optin_sent (account, list_name, address, sent_at) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (account, list_name, address) DO UPDATE SET sent_at = excluded.sent_at"
)


class ConsentTables(SqliteConnection):
    """Double opt-in: the proof of each consent, and the rate limit of confirmation mails."""

    async def add_consent(self, records: Iterable[ConsentRecord]) -> int:
        rows = [consent_row(r) for r in records]
        if not rows:
            return 0
        rows.sort(key=_CONSENT_KEY)  # a sweep through the b-tree, as for suppressions (stable: last wins)
        async with self._transaction(durable=True) as db:
            await db.executemany(_UPSERT_CONSENT, rows)
        return len(rows)

    async def get_consent(self, account: str, list_name: str, address: str) -> ConsentRecord | None:
        rows = await self._fetch(
            f"SELECT {CONSENT_COLUMNS} FROM consent WHERE account = ? AND list_name = ? AND address = ?",
            [account, list_name, address],
        )
        return consent(rows[0]) if rows else None

    async def has_consent(self, account: str, list_name: str, addresses: Sequence[str]) -> set[str]:
        unique = distinct(addresses)
        found: set[str] = set()
        for chunk in padded_chunks(unique):
            rows = await self._fetch(
                "SELECT address FROM consent WHERE account = ? AND list_name = ?"
                f" AND address IN ({marks(len(chunk))})",
                [account, list_name, *chunk],
            )
            found.update(row[0] for row in rows)
        return found

    async def consents(
        self,
        *,
        account: str | None = None,
        list_name: str | None = None,
        address: str | None = None,
        batch_size: int = 10_000,
    ) -> AsyncIterator[list[ConsentRecord]]:
        # keyset pagination, like scan(): each batch one indexed range read, no long read transaction
        first, params = consent_page(
            qmark, account=account, list_name=list_name, address=address, after=False
        )
        following, _ = consent_page(qmark, account=account, list_name=list_name, address=address, after=True)
        rows = await self._fetch(first, [*params, batch_size])
        while rows:
            yield [consent(row) for row in rows]
            if len(rows) < batch_size:
                return
            last = rows[-1]
            rows = await self._fetch(following, [*params, last[0], last[1], last[2], batch_size])

    async def reserve_optin(
        self,
        account: str,
        list_name: str,
        addresses: Sequence[str],
        at: datetime,
        window: float,
    ) -> set[str]:
        unique = distinct(addresses)
        if not unique:
            return set()
        if window <= 0:
            raise ValueError(f"the opt-in window must be positive seconds, got {window}")
        at_us = micros(at)
        since = at_us - round(window * 1_000_000)
        async with self._transaction(durable=False) as db:
            recent: set[str] = set()
            for chunk in padded_chunks(unique):
                rows = await db.execute_fetchall(
                    "SELECT address FROM optin_sent WHERE account = ? AND list_name = ?"
                    f" AND address IN ({marks(len(chunk))}) AND sent_at > ?",
                    [account, list_name, *chunk, since],
                )
                recent.update(row[0] for row in rows)
            allowed = {a for a in unique if a not in recent}
            if allowed:
                await db.executemany(
                    _UPSERT_OPTIN, [(account, list_name, a, at_us) for a in unique if a in allowed]
                )
        return allowed

    async def prune_optin(self, before: datetime) -> int:
        async with self._transaction(durable=False) as db:
            cursor = await db.execute("DELETE FROM optin_sent WHERE sent_at < ?", [micros(before)])
            return cursor.rowcount
