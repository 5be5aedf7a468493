"""What delivery shares between processes, in SQLite: the MTA-STS policy cache and TLS report counts."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, datetime
from typing import Final

from ..models import MtaStsRecord, TlsSessionCount, utcnow
from ..rows import day_number, micros, mta_sts_record, mta_sts_row, tls_count, tls_row
from ..sql import TLS_ADD_CONFLICT, TLS_COLUMNS, mta_sts_upsert
from .connection import SqliteConnection, marks, qmark

_ADD_TLS_SESSIONS: Final = f"INSERT INTO tlsrpt_counts ({TLS_COLUMNS}) VALUES ({marks(8)}){TLS_ADD_CONFLICT}"
_UPSERT_MTA_STS: Final = mta_sts_upsert(qmark)


class TransportTables(SqliteConnection):
    """:class:`relayd.store.protocols.MtaStsCache` and :class:`relayd.store.protocols.TlsReportStore`."""

    async def get_mta_sts(self, domain: str) -> MtaStsRecord | None:
        rows = await self._fetch(
            "SELECT policy_id, mode, mx, max_age, fetched_at FROM mta_sts_policies WHERE domain = ?", [domain]
        )
        return mta_sts_record(domain, rows[0]) if rows else None

    async def put_mta_sts(self, record: MtaStsRecord) -> None:
        async with self._transaction(durable=False) as db:
            await db.execute(_UPSERT_MTA_STS, mta_sts_row(record))

    async def prune_mta_sts(self, before: datetime) -> int:
        async with self._transaction(durable=False) as db:
            cursor = await db.execute("DELETE FROM mta_sts_policies WHERE expires_at < ?", [micros(before)])
            return cursor.rowcount

    async def add_tls_sessions(self, counts: Iterable[TlsSessionCount]) -> None:
        rows = [tls_row(c) for c in counts]
        if not rows:
            return
        async with self._transaction(durable=False) as db:
            await db.executemany(_ADD_TLS_SESSIONS, rows)

    async def tls_sessions(self, day: date) -> list[TlsSessionCount]:
        rows = await self._fetch(f"SELECT {TLS_COLUMNS} FROM tlsrpt_counts WHERE day = ?", [day_number(day)])
        return [tls_count(row) for row in rows]

    async def claim_tls_report(self, day: date, domain: str) -> bool:
        async with self._transaction(durable=False) as db:
            cursor = await db.execute(
                "INSERT INTO tlsrpt_sent (day, domain, sent_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                [day_number(day), domain, micros(utcnow())],
            )
            return cursor.rowcount == 1

    async def prune_tls_sessions(self, before: date) -> int:
        async with self._transaction(durable=False) as db:
            await db.execute("DELETE FROM tlsrpt_sent WHERE day < ?", [day_number(before)])
            cursor = await db.execute("DELETE FROM tlsrpt_counts WHERE day < ?", [day_number(before)])
            return cursor.rowcount
