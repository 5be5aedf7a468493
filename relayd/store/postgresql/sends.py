"""Send counters (frequency caps) and the sent ledger in PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Final

from ..groupcommit import nothing_to_write
from ..models import SentRecord
from ..rows import HOUR_US, cap_windows, distinct, micros, sent_record, sent_row
from ..sql import sent_lookup, sent_page
from .connection import PostgresConnection
from .driver import CHUNK, LOCK_SENDS, as_columns, dollar, lock_key

_UPSERT_SENDS: Final = (
    "INSERT INTO send_log (account, list_name, address, sent_at, n)"
    " SELECT $1, $2, a, $4, 1 FROM unnest($3::text[]) AS a"
    " ON CONFLICT (account, list_name, address, sent_at) DO UPDATE SET n = send_log.n + 1"
)


# Count and record in one statement (one snapshot, taken after the address locks are held): `blocked` is
# every address with cap or more sends inside some window (window w: sent_at > at - w), the INSERT
# records the rest and returns them.
_RESERVE: Final = (
    "WITH blocked AS ("
    " SELECT l.address FROM send_log AS l"
    " JOIN unnest($5::int8[], $6::int8[]) AS w(start, cap) ON l.sent_at > w.start"
    " WHERE l.account = $1 AND l.list_name = $2 AND l.address = ANY($3::text[]) AND l.sent_at > $7"
    " GROUP BY l.address, w.start, w.cap HAVING sum(l.n) >= w.cap)"
    " INSERT INTO send_log (account, list_name, address, sent_at, n)"
    " SELECT $1, $2, a, $4, 1 FROM unnest($3::text[]) AS a"
    " WHERE a NOT IN (SELECT address FROM blocked)"
    " ON CONFLICT (account, list_name, address, sent_at) DO UPDATE SET n = send_log.n + 1"
    " RETURNING address"
)

_UPSERT_SENT: Final = (
    "INSERT INTO sent (queue_id, idx, account, list_name, address, sent_at)"
    " SELECT * FROM unnest($1::text[], $2::int4[], $3::text[], $4::text[], $5::text[], $6::int8[])"
    " ON CONFLICT (queue_id, idx) DO UPDATE SET account = excluded.account,"
    " list_name = excluded.list_name, address = excluded.address, sent_at = excluded.sent_at"
)


class SendTables(PostgresConnection):
    """Send counters (:class:`relayd.store.protocols.SendCounterStore`) and the sent ledger
    (:class:`relayd.store.protocols.SentLedger`)."""

    async def record_sends(
        self, account: str, list_name: str | None, addresses: Sequence[str], at: datetime
    ) -> None:
        unique = distinct(addresses)
        if not unique:
            return
        await self._autocommit(_UPSERT_SENDS, account, list_name or "", unique, micros(at))

    async def count_sends(
        self, account: str, list_name: str | None, addresses: Sequence[str], since: datetime
    ) -> dict[str, int]:
        unique = distinct(addresses)
        counts = dict.fromkeys(unique, 0)
        if not unique:
            return counts
        rows = await self._fetch(
            "SELECT address, sum(n) FROM send_log WHERE account = $1 AND list_name = $2"
            " AND address = ANY($3::text[]) AND sent_at >= $4 GROUP BY address",
            account,
            list_name or "",
            unique,
            micros(since),
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
        windows = cap_windows(caps)
        if any(caps[w] <= 0 for w in windows):
            return set()  # nothing may be sent: no need to lock or write anything
        at_us = micros(at)
        lname = list_name or ""
        if not windows:
            await self.record_sends(account, list_name, unique, at)
            return set(unique)
        # Lock keys in ascending order, inlined into the BEGIN round trip (they are our own integers).
        keys = sorted({lock_key(self._schema_name, account, lname, a) for a in unique})
        lock = (
            f"; SELECT pg_advisory_xact_lock({LOCK_SENDS}, k)"
            f" FROM unnest('{{{','.join(map(str, keys))}}}'::int4[]) AS k"
        )
        starts = [at_us - w * 1_000_000 for w in windows]
        async with self._transaction(durable=False, lock=lock) as conn:
            rows = await conn.fetch(
                _RESERVE, account, lname, unique, at_us, starts, [caps[w] for w in windows], min(starts)
            )
        return {row[0] for row in rows}

    async def check_sends(
        self,
        account: str,
        list_name: str | None,
        addresses: Sequence[str],
        at: datetime,
        caps: Mapping[int, int],
    ) -> set[str]:
        """Reserved here (:meth:`reserve_sends`): the advisory locks that make a reservation atomic across
        nodes take a transaction of their own, which the ledger's group commit (one statement for every
        message waiting) has no room for; ``record_sent`` then counts nothing."""
        return await self.reserve_sends(account, list_name, addresses, at, caps)

    async def prune(self, before: datetime) -> int:
        return await self._autocommit_count("DELETE FROM send_log WHERE sent_at < $1", micros(before))

    def record_sent(
        self, records: Iterable[SentRecord], *, caps: Mapping[int, int] | None = None
    ) -> asyncio.Future[None]:
        """Group commit, like events: every message accepted meanwhile shares one transaction. ``caps`` is
        not used: :meth:`check_sends` counted the sends already."""
        rows = [sent_row(r) for r in records]
        if not rows:
            return nothing_to_write()
        return self._sent.submit(rows)

    async def _write_sent(self, rows: list[tuple[Any, ...]]) -> None:
        """Durable (WAL flushed at commit), unlike the other per-message writes: the queue is, and a
        queued message whose ledger row a server crash took would carry an unsubscribe link, VERP address
        and trace token that verify for nothing. Group commit shares the flush among concurrent messages."""
        # One row per (queue_id, idx), the last given: insert-or-replace, and one statement may not
        # upsert a row twice.
        unique = list({(row[0], row[1]): row for row in rows}.values())
        async with self._transaction(durable=True) as conn:
            for start in range(0, len(unique), CHUNK):
                await conn.execute(_UPSERT_SENT, *as_columns(unique[start : start + CHUNK], 6))

    async def lookup_sent(self, queue_id: str, index: int) -> SentRecord | None:
        rows = await self._fetch(sent_lookup(dollar), queue_id, index)
        return sent_record(rows[0]) if rows else None

    async def scan_sent(self, *, batch_size: int = 10_000) -> AsyncIterator[list[SentRecord]]:
        # Keyset pagination over the primary key (queue_id is COLLATE "C": the same order as SQLite).
        last: tuple[str, int] = ("", -1)
        while True:
            rows = await self._fetch(sent_page(dollar), *last, batch_size)
            if not rows:
                return
            yield [sent_record(row) for row in rows]
            last = (rows[-1][0], rows[-1][1])

    async def prune_sent(self, before: datetime) -> int:
        return await self._autocommit_count("DELETE FROM sent WHERE sent_at < $1", micros(before))

    async def count_sent(self, account: str, since: datetime) -> int:
        start = micros(since)
        edge = -(-start // HOUR_US)  # first whole hour at or after `since`
        rows = await self._fetch(
            "SELECT (SELECT count(*) FROM sent WHERE account = $1 AND sent_at >= $2 AND sent_at < $3)"
            " + (SELECT coalesce(sum(n), 0) FROM sent_hourly WHERE account = $1 AND hour >= $4)",
            account,
            start,
            edge * HOUR_US,
            edge,
        )
        return int(rows[0][0])
