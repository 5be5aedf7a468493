"""What delivery shares between nodes, in PostgreSQL: the MTA-STS policy cache and TLS report counts."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, datetime
from typing import Any, Final

from ..models import MtaStsRecord, TlsSessionCount, utcnow
from ..rows import day_number, micros, mta_sts_record, mta_sts_row, tls_count, tls_row
from ..sql import TLS_ADD_CONFLICT, TLS_COLUMNS, mta_sts_upsert
from .connection import PostgresConnection
from .driver import dollar

_ADD_TLS_SESSIONS: Final = (
    f"INSERT INTO tlsrpt_counts ({TLS_COLUMNS})"
    " SELECT * FROM unnest($1::int4[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],"
    f" $7::text[], $8::int8[]){TLS_ADD_CONFLICT}"
)
_UPSERT_MTA_STS: Final = mta_sts_upsert(dollar)


class TransportTables(PostgresConnection):
    """:class:`relayd.store.protocols.MtaStsCache` and :class:`relayd.store.protocols.TlsReportStore`."""

    async def get_mta_sts(self, domain: str) -> MtaStsRecord | None:
        rows = await self._fetch(
            "SELECT policy_id, mode, mx, max_age, fetched_at FROM mta_sts_policies WHERE domain = $1", domain
        )
        return mta_sts_record(domain, tuple(rows[0])) if rows else None

    async def put_mta_sts(self, record: MtaStsRecord) -> None:
        await self._autocommit(_UPSERT_MTA_STS, *mta_sts_row(record))

    async def prune_mta_sts(self, before: datetime) -> int:
        return await self._autocommit_count(
            "DELETE FROM mta_sts_policies WHERE expires_at < $1", micros(before)
        )

    async def add_tls_sessions(self, counts: Iterable[TlsSessionCount]) -> None:
        # one row per key (a statement may not upsert a row twice), in key order (no deadlock between nodes)
        summed: dict[tuple[Any, ...], int] = {}
        for c in counts:
            key = tls_row(c)[:-1]
            summed[key] = summed.get(key, 0) + c.sessions
        if not summed:
            return
        keys = sorted(summed)
        columns = [list(col) for col in zip(*keys, strict=True)]
        await self._autocommit(_ADD_TLS_SESSIONS, *columns, [summed[k] for k in keys])

    async def tls_sessions(self, day: date) -> list[TlsSessionCount]:
        rows = await self._fetch(f"SELECT {TLS_COLUMNS} FROM tlsrpt_counts WHERE day = $1", day_number(day))
        return [tls_count(tuple(row)) for row in rows]

    async def claim_tls_report(self, day: date, domain: str) -> bool:
        rows = await self._autocommit(
            "INSERT INTO tlsrpt_sent (day, domain, sent_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING"
            " RETURNING day",
            day_number(day),
            domain,
            micros(utcnow()),
        )
        return len(rows) == 1

    async def prune_tls_sessions(self, before: date) -> int:
        await self._autocommit_count("DELETE FROM tlsrpt_sent WHERE day < $1", day_number(before))
        return await self._autocommit_count("DELETE FROM tlsrpt_counts WHERE day < $1", day_number(before))
