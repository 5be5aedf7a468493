"""The postmaster's inbox and DMARC aggregate counts, in PostgreSQL."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from typing import Any, Final

from ..models import DmarcCount, InboxItem
from ..rows import day_number, dmarc_count, dmarc_row, inbox_item, inbox_row, micros
from ..sql import DMARC_ADD_CONFLICT, DMARC_COLUMNS, INBOX_COLUMNS, INBOX_LIST_COLUMNS
from .connection import PostgresConnection

_ADD_DMARC: Final = (
    f"INSERT INTO dmarc_counts ({DMARC_COLUMNS})"
    " SELECT * FROM unnest($1::text[], $2::int4[], $3::text[], $4::text[], $5::text[], $6::int8[],"
    " $7::int8[], $8::int8[], $9::int8[], $10::int8[], $11::int8[], $12::int8[], $13::int8[])"
    f"{DMARC_ADD_CONFLICT}"
)


class DeskTables(PostgresConnection):
    """:class:`relayd.store.protocols.InboxStore` and :class:`relayd.store.protocols.DmarcStore`."""

    async def add_inbox_item(self, item: InboxItem, raw: bytes) -> int:
        marks = ", ".join(f"${i}" for i in range(1, 14))
        rows = await self._autocommit(
            f"INSERT INTO inbox ({INBOX_COLUMNS}) VALUES ({marks}) RETURNING id",
            *inbox_row(item, raw),
        )
        return int(rows[0][0])

    async def count_inbox_from(self, source: str, since: datetime) -> int:
        rows = await self._fetch(
            "SELECT count(*) FROM inbox WHERE source = $1 AND received_at >= $2", source, micros(since)
        )
        return int(rows[0][0])

    async def inbox_items(
        self,
        *,
        since: datetime | None = None,
        kind: str | None = None,
        state: str | None = None,
        limit: int = 1000,
    ) -> list[InboxItem]:
        rows = await self._fetch(
            f"SELECT {INBOX_LIST_COLUMNS} FROM inbox WHERE received_at >= $1"
            " AND ($2::text IS NULL OR kind = $2) AND ($3::text IS NULL OR state = $3)"
            " ORDER BY id DESC LIMIT $4",
            micros(since) if since is not None else 0,
            kind,
            state,
            limit,
        )
        return [inbox_item(tuple(row)) for row in rows]

    async def get_inbox_item(self, item_id: int) -> InboxItem | None:
        rows = await self._fetch(f"SELECT {INBOX_LIST_COLUMNS}, raw FROM inbox WHERE id = $1", item_id)
        return inbox_item(tuple(rows[0])[:13], rows[0][13]) if rows else None

    async def mark_inbox_done(self, item_id: int, at: datetime) -> bool:
        rows = await self._autocommit(
            "UPDATE inbox SET state = 'done', done_at = coalesce(done_at, $1) WHERE id = $2 RETURNING id",
            micros(at),
            item_id,
        )
        return len(rows) == 1

    async def count_open_inbox(self) -> int:
        rows = await self._fetch("SELECT count(*) FROM inbox WHERE state = 'open'")
        return int(rows[0][0])

    async def prune_inbox(self, before: datetime) -> int:
        return await self._autocommit_count("DELETE FROM inbox WHERE received_at < $1", micros(before))

    async def add_dmarc_report(
        self, org: str, report_id: str, domain: str, received_at: datetime, counts: Sequence[DmarcCount]
    ) -> bool:
        day = min((c.day for c in counts), default=received_at.date())
        # one row per key (a statement may not upsert a row twice), in key order (no deadlock between nodes)
        summed: dict[tuple[Any, ...], list[int]] = {}
        for c in counts:
            row = dmarc_row(c)
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
                day_number(day),
                micros(received_at),
            )
            if not claimed:
                return False
            keys = sorted(summed)
            if keys:
                columns = [list(col) for col in zip(*[(*k, *summed[k]) for k in keys], strict=True)]
                await conn.execute(_ADD_DMARC, *columns)
            return True

    async def dmarc_counts(self, domain: str, since: date) -> list[DmarcCount]:
        rows = await self._fetch(
            f"SELECT {DMARC_COLUMNS} FROM dmarc_counts WHERE domain = $1 AND day >= $2",
            domain,
            day_number(since),
        )
        return [dmarc_count(tuple(row)) for row in rows]

    async def prune_dmarc(self, before: date) -> int:
        day = day_number(before)
        await self._autocommit_count("DELETE FROM dmarc_reports WHERE day < $1", day)
        return await self._autocommit_count("DELETE FROM dmarc_counts WHERE day < $1", day)
