"""The postmaster's inbox and DMARC aggregate counts, in SQLite."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from typing import Any, Final

from ..models import DmarcCount, InboxItem
from ..rows import day_number, dmarc_count, dmarc_row, inbox_item, inbox_row, micros
from ..sql import DMARC_ADD_CONFLICT, DMARC_COLUMNS, INBOX_COLUMNS, INBOX_LIST_COLUMNS
from .connection import SqliteConnection, marks

_ADD_DMARC: Final = f"INSERT INTO dmarc_counts ({DMARC_COLUMNS}) VALUES ({marks(13)}){DMARC_ADD_CONFLICT}"


class DeskTables(SqliteConnection):
    """:class:`relayd.store.protocols.InboxStore` and :class:`relayd.store.protocols.DmarcStore`."""

    async def add_inbox_item(self, item: InboxItem, raw: bytes) -> int:
        sql = f"INSERT INTO inbox ({INBOX_COLUMNS}) VALUES ({marks(13)})"
        async with self._transaction(durable=True) as db:
            cursor = await db.execute(sql, inbox_row(item, raw))
            return int(cursor.lastrowid or 0)

    async def count_inbox_from(self, source: str, since: datetime) -> int:
        rows = await self._fetch(
            "SELECT count(*) FROM inbox WHERE source = ? AND received_at >= ?", [source, micros(since)]
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
        where = ["received_at >= ?"]
        params: list[Any] = [micros(since) if since is not None else 0]
        if kind is not None:
            where.append("kind = ?")
            params.append(kind)
        if state is not None:
            where.append("state = ?")
            params.append(state)
        rows = await self._fetch(
            f"SELECT {INBOX_LIST_COLUMNS} FROM inbox WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?",
            [*params, limit],
        )
        return [inbox_item(row) for row in rows]

    async def get_inbox_item(self, item_id: int) -> InboxItem | None:
        rows = await self._fetch(f"SELECT {INBOX_LIST_COLUMNS}, raw FROM inbox WHERE id = ?", [item_id])
        return inbox_item(rows[0][:13], rows[0][13]) if rows else None

    async def mark_inbox_done(self, item_id: int, at: datetime) -> bool:
        async with self._transaction(durable=False) as db:
            cursor = await db.execute(
                "UPDATE inbox SET state = 'done', done_at = coalesce(done_at, ?) WHERE id = ?",
                [micros(at), item_id],
            )
            return cursor.rowcount == 1

    async def count_open_inbox(self) -> int:
        rows = await self._fetch("SELECT count(*) FROM inbox WHERE state = 'open'")
        return int(rows[0][0])

    async def prune_inbox(self, before: datetime) -> int:
        async with self._transaction(durable=False) as db:
            cursor = await db.execute("DELETE FROM inbox WHERE received_at < ?", [micros(before)])
            return cursor.rowcount

    async def add_dmarc_report(
        self, org: str, report_id: str, domain: str, received_at: datetime, counts: Sequence[DmarcCount]
    ) -> bool:
        day = min((c.day for c in counts), default=received_at.date())
        async with self._transaction(durable=False) as db:
            cursor = await db.execute(
                "INSERT INTO dmarc_reports (org, report_id, domain, day, received_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                [org, report_id, domain, day_number(day), micros(received_at)],
            )
            if cursor.rowcount != 1:
                return False
            await db.executemany(_ADD_DMARC, [dmarc_row(c) for c in counts])
            return True

    async def dmarc_counts(self, domain: str, since: date) -> list[DmarcCount]:
        rows = await self._fetch(
            f"SELECT {DMARC_COLUMNS} FROM dmarc_counts WHERE domain = ? AND day >= ?",
            [domain, day_number(since)],
        )
        return [dmarc_count(row) for row in rows]

    async def prune_dmarc(self, before: date) -> int:
        day = day_number(before)
        async with self._transaction(durable=False) as db:
            await db.execute("DELETE FROM dmarc_reports WHERE day < ?", [day])
            cursor = await db.execute("DELETE FROM dmarc_counts WHERE day < ?", [day])
            return cursor.rowcount
