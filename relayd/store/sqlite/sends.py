"""Send counters (frequency caps) and the sent ledger in SQLite.

Both are written on every message, so their writes go through the per-message writer (group commit, see
:mod:`relayd.store.sqlite.connection`).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Final

from ..groupcommit import nothing_to_write
from ..models import SentRecord, StoreError
from ..rows import HOUR_US, cap_windows, distinct, micros, sent_record, sent_row
from ..sql import sent_lookup, sent_page
from .connection import Row, SqliteConnection, marks, padded_chunks, qmark

_UPSERT_SEND: Final = (
    "INSERT INTO send_log (account, list_name, address, sent_at, n) VALUES (?, ?, ?, ?, 1)"
    " ON CONFLICT (account, list_name, address, sent_at) DO UPDATE SET n = send_log.n + excluded.n"
)

_INSERT_SENT: Final = (
    "INSERT OR REPLACE INTO sent (queue_id, idx, account, list_name, address, sent_at)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)


class SendTables(SqliteConnection):
    """Send counters (:class:`relayd.store.protocols.SendCounterStore`) and the sent ledger
    (:class:`relayd.store.protocols.SentLedger`)."""

    async def record_sends(
        self, account: str, list_name: str | None, addresses: Sequence[str], at: datetime
    ) -> None:
        at_us = micros(at)
        rows = [(account, list_name or "", a, at_us) for a in dict.fromkeys(addresses)]
        if not rows:
            return
        async with self._transaction(durable=False) as db:
            await db.executemany(_UPSERT_SEND, rows)

    async def count_sends(
        self, account: str, list_name: str | None, addresses: Sequence[str], since: datetime
    ) -> dict[str, int]:
        unique = distinct(addresses)
        counts = dict.fromkeys(unique, 0)
        for chunk in padded_chunks(unique):
            rows = await self._fetch(
                "SELECT address, sum(n) FROM send_log WHERE account = ? AND list_name = ?"
                f" AND address IN ({marks(len(chunk))}) AND sent_at >= ? GROUP BY address",
                [account, list_name or "", *chunk, micros(since)],
            )
            for address, n in rows:
                counts[address] = int(n)
        return counts

    async def reserve_sends(
        self,
        account: str,
        list_name: str | None,
        addresses: Sequence[str],
        at: datetime,
        caps: Mapping[int, int],
    ) -> set[str]:
        unique = distinct(addresses)
        if not unique:
            return set()
        at_us = micros(at)
        windows = cap_windows(caps)
        lname = list_name or ""

        def reserve(db: sqlite3.Connection) -> set[str]:
            allowed = set(unique)
            if windows:
                # One query: per address, the sends inside each window (window w: sent_at > at - w).
                starts = [at_us - w * 1_000_000 for w in windows]
                sums = ", ".join("sum(CASE WHEN sent_at > ? THEN n ELSE 0 END)" for _ in windows)
                for chunk in padded_chunks(unique):
                    rows = db.execute(
                        f"SELECT address, {sums} FROM send_log WHERE account = ? AND list_name = ?"
                        f" AND address IN ({marks(len(chunk))}) AND sent_at > ? GROUP BY address",
                        [*starts, account, lname, *chunk, min(starts)],
                    ).fetchall()
                    for row in rows:
                        if any(row[i + 1] >= caps[w] for i, w in enumerate(windows)):
                            allowed.discard(row[0])
                if any(caps[w] <= 0 for w in windows):
                    allowed.clear()
            if allowed:
                db.executemany(_UPSERT_SEND, [(account, lname, a, at_us) for a in unique if a in allowed])
            return allowed

        allowed = await self._require_hot().run(reserve)
        return allowed

    async def prune(self, before: datetime) -> int:
        async with self._transaction(durable=False) as db:
            cursor = await db.execute("DELETE FROM send_log WHERE sent_at < ?", [micros(before)])
            return cursor.rowcount

    def record_sent(self, records: Iterable[SentRecord]) -> asyncio.Future[None]:
        """Group commit, like events: every message accepted meanwhile shares one transaction. Refused
        by a store opened without ``ledger`` (its writer does not fsync: the rows could be lost)."""
        rows: list[Row] = [sent_row(r) for r in records]
        if rows and not self._ledger:
            raise StoreError(f"{self.path}: opened without the sent ledger (ledger=False)")
        if not rows:
            return nothing_to_write()
        return self._submit_hot(_INSERT_SENT, rows)

    async def lookup_sent(self, queue_id: str, index: int) -> SentRecord | None:
        rows = await self._fetch(sent_lookup(qmark), (queue_id, index))
        return sent_record(rows[0]) if rows else None

    async def scan_sent(self, *, batch_size: int = 10_000) -> AsyncIterator[list[SentRecord]]:
        last: tuple[str, int] = ("", -1)
        while True:
            rows = await self._fetch(sent_page(qmark), (*last, batch_size))
            if not rows:
                return
            yield [sent_record(row) for row in rows]
            last = (rows[-1][0], rows[-1][1])

    async def prune_sent(self, before: datetime) -> int:
        async with self._transaction(durable=False) as db:
            cursor = await db.execute("DELETE FROM sent WHERE sent_at < ?", [micros(before)])
            return cursor.rowcount

    async def count_sent(self, account: str, since: datetime) -> int:
        start = micros(since)
        edge = -(-start // HOUR_US)  # first whole hour at or after `since`
        rows = await self._fetch(
            "SELECT (SELECT count(*) FROM sent WHERE account = ? AND sent_at >= ? AND sent_at < ?)"
            " + (SELECT coalesce(sum(n), 0) FROM sent_hourly WHERE account = ? AND hour >= ?)",
            [account, start, edge * HOUR_US, account, edge],
        )
        return int(rows[0][0])
