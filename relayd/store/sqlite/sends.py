"""Send counters (frequency caps) and the sent ledger in SQLite.

Both are written on every message, so their writes go through the per-message writer (group commit, see
:mod:`relayd.store.sqlite.connection`).
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Final

from ..groupcommit import nothing_to_write
from ..models import SendsContended, SentRecord, StoreError
from ..rows import HOUR_US, cap_windows, distinct, micros, sent_record, sent_row
from ..sql import sent_lookup, sent_page
from ..sqlitewriter import JobRefused
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
        cap_windows(caps)  # ValueError for a window that is not positive, before the job is given
        lname = list_name or ""

        def reserve(db: sqlite3.Connection) -> set[str]:
            allowed = set(unique) - _over_cap(db, account, lname, unique, at_us, caps)
            if allowed:
                db.executemany(_UPSERT_SEND, [(account, lname, a, at_us) for a in unique if a in allowed])
            return allowed

        allowed = await self._require_hot().run(reserve)
        return allowed

    async def check_sends(
        self,
        account: str,
        list_name: str | None,
        addresses: Sequence[str],
        at: datetime,
        caps: Mapping[int, int],
    ) -> set[str]:
        """A read on the loop's thread (no turn of the loop, which under load is a few ms of the other
        sessions' work): the count is made, and checked again, in the message's ledger write
        (:meth:`record_sent`), so a list message pays one group commit on this store, not two."""
        unique = distinct(addresses)
        windows = cap_windows(caps)
        if any(caps[w] <= 0 for w in windows):
            return set()
        over: set[str] = set()
        for sql, params in _window_sums(account, list_name or "", unique, micros(at), caps):
            over.update(_at_cap(await self._fetch_hot(sql, params), windows, caps))
        return set(unique) - over

    async def prune(self, before: datetime) -> int:
        async with self._transaction(durable=False) as db:
            cursor = await db.execute("DELETE FROM send_log WHERE sent_at < ?", [micros(before)])
            return cursor.rowcount

    def record_sent(
        self, records: Iterable[SentRecord], *, caps: Mapping[int, int] | None = None
    ) -> asyncio.Future[None]:
        """Group commit, like events: every message accepted meanwhile shares one transaction. Refused
        by a store opened without ``ledger`` (its writer does not fsync: the rows could be lost).

        With ``caps``, the sends are counted in the same job, after checking again that each address is
        still within every cap: another message may have counted one since :meth:`check_sends` read
        (:class:`SendsContended`, the job's savepoint rolled back: neither count nor ledger row)."""
        rows: list[Row] = [sent_row(r) for r in records]
        if rows and not self._ledger:
            raise StoreError(f"{self.path}: opened without the sent ledger (ledger=False)")
        if not rows:
            return nothing_to_write()
        if not caps:
            return self._submit_hot(_INSERT_SENT, rows)
        if len({(row[2], row[3], row[5]) for row in rows}) != 1:
            raise ValueError("counted sends must share account, list and time (one message's records)")
        return self._require_hot().submit(functools.partial(_count_and_record, rows, dict(caps)))

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


class _Contended(SendsContended, JobRefused):
    """:class:`SendsContended` as the writer passes it on: a job's decision, not the store failing."""


def _window_sums(
    account: str, lname: str, addresses: Sequence[str], at_us: int, caps: Mapping[int, int]
) -> Iterator[tuple[str, list[object]]]:
    """The queries giving, per address that has sends, its sends inside each window of ``caps`` (shortest
    first; window w holds sent_at > at - w), a padded chunk of ``addresses`` each."""
    windows = cap_windows(caps)
    if not windows:
        return
    starts = [at_us - w * 1_000_000 for w in windows]
    sums = ", ".join("sum(CASE WHEN sent_at > ? THEN n ELSE 0 END)" for _ in windows)
    for chunk in padded_chunks(addresses):
        yield (
            f"SELECT address, {sums} FROM send_log WHERE account = ? AND list_name = ?"
            f" AND address IN ({marks(len(chunk))}) AND sent_at > ? GROUP BY address",
            [*starts, account, lname, *chunk, min(starts)],
        )


def _at_cap(rows: Iterable[Row], windows: Sequence[int], caps: Mapping[int, int]) -> Iterator[str]:
    """The addresses of ``rows`` (from :func:`_window_sums`) with a window already at its cap."""
    for row in rows:
        if any(row[i + 1] >= caps[w] for i, w in enumerate(windows)):
            yield row[0]


def _over_cap(
    db: sqlite3.Connection,
    account: str,
    lname: str,
    addresses: Sequence[str],
    at_us: int,
    caps: Mapping[int, int],
) -> set[str]:
    """The addresses one more send at ``at_us`` would take past a cap (all of them when a cap is 0)."""
    windows = cap_windows(caps)
    if any(caps[w] <= 0 for w in windows):
        return set(addresses)
    over: set[str] = set()
    for sql, params in _window_sums(account, lname, addresses, at_us, caps):
        over.update(_at_cap(db.execute(sql, params).fetchall(), windows, caps))
    return over


def _count_and_record(rows: list[Row], caps: dict[int, int], db: sqlite3.Connection) -> None:
    """The ledger job of a message whose list has caps: the addresses checked again, then counted and
    recorded; or :class:`_Contended` and nothing."""
    _, _, account, lname, _, at_us = rows[0]
    addresses = distinct(row[4] for row in rows)
    over = _over_cap(db, account, lname, addresses, at_us, caps)
    if over:
        raise _Contended(f"send cap of list {lname or '(none)'} used meanwhile for {', '.join(sorted(over))}")
    db.executemany(_UPSERT_SEND, [(account, lname, a, at_us) for a in addresses])
    db.executemany(_INSERT_SENT, rows)
