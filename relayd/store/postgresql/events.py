"""The events log in PostgreSQL, and the webhook outbox read from it (events by id, per-endpoint cursors)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from ..models import Event, utcnow
from ..rows import HOUR_US, event, event_row, micros
from ..sql import EVENT_COLUMNS, events_since
from .connection import PostgresConnection
from .driver import CHUNK, as_columns, dollar


def _merge_keyed(events: Iterable[Event]) -> list[Event]:
    """One event per key, at the place of its first: one INSERT .. ON CONFLICT may not update a row twice.

    The later ones add their ``count`` and move ``last_seen``, as they would have one statement later."""
    out: list[Event] = []
    where: dict[str, int] = {}
    for e in events:
        if e.key is None:
            out.append(e)
            continue
        i = where.get(e.key)
        if i is None:
            where[e.key] = len(out)
            out.append(e)
            continue
        first = out[i]
        seen = max(first.last_seen or first.at, e.last_seen or e.at)
        out[i] = dataclasses.replace(first, count=first.count + e.count, last_seen=seen)
    return out


class EventTables(PostgresConnection):
    """:class:`relayd.store.protocols.EventStore` and :class:`relayd.store.protocols.WebhookCursorStore`."""

    async def record_event(self, event: Event) -> None:
        await self._events.add([event])

    async def record_events(self, events: Iterable[Event]) -> None:
        rows = [event_row(e) for e in _merge_keyed(events)]
        if not rows:
            return
        self._require_pool()
        if len(rows) <= CHUNK:
            await self._autocommit(self._insert_events, *as_columns(rows, 11))
            return
        async with self._transaction(durable=False) as conn:  # the lock is re-entrant: one per chunk is fine
            for start in range(0, len(rows), CHUNK):
                await conn.execute(self._insert_events, *as_columns(rows[start : start + CHUNK], 11))

    async def event_by_key(self, key: str) -> Event | None:
        rows = await self._fetch(f"SELECT {EVENT_COLUMNS} FROM events WHERE dedup_key = $1", key)
        return event(rows[0]) if rows else None

    async def events(
        self,
        since: datetime,
        limit: int = 1000,
        account: str | None = None,
        kind: str | None = None,
    ) -> list[Event]:
        sql, params = events_since(dollar, micros(since), limit, account, kind)
        return [event(row) for row in await self._fetch(sql, *params)]

    async def prune_events(self, before: datetime) -> int:
        return await self._autocommit_count("DELETE FROM events WHERE at < $1", micros(before))

    async def count_events(
        self,
        kind: str,
        since: datetime,
        *,
        account: str | None = None,
        address: str | None = None,
        reason: str | None = None,
    ) -> int:
        start = micros(since)
        if account is not None and address is None:
            # roll-up for the whole hours, the log (events_account_kind_at) for the partial first hour
            edge = -(-start // HOUR_US)
            raw = "SELECT count(*) FROM events WHERE account = $1 AND kind = $2 AND at >= $3 AND at < $4"
            rollup = (
                "SELECT coalesce(sum(n), 0) FROM event_hourly WHERE account = $1 AND kind = $2 AND hour >= $5"
            )
            params: list[Any] = [account, kind, start, edge * HOUR_US, edge]
            if reason is not None:
                raw += " AND reason = $6"
                rollup += " AND reason = $6"
                params.append(reason)
            rows = await self._fetch(f"SELECT ({raw}) + ({rollup})", *params)
            return int(rows[0][0])
        sql = "SELECT count(*) FROM events WHERE kind = $1 AND at >= $2"
        params = [kind, start]
        for column, value in (("address", address), ("account", account), ("reason", reason)):
            if value is not None:
                params.append(value)
                sql += f" AND {column} = ${len(params)}"
        rows = await self._fetch(sql, *params)
        return int(rows[0][0])

    async def events_after(
        self, after_id: int, account: str | None, limit: int = 100
    ) -> list[tuple[int, Event]]:
        # Primary-key range scan; `coalesce(account, '')` keeps the planner off the account indexes (it
        # would otherwise sort an account's whole history by id on every poll), as in SQLite.
        sql = f"SELECT id, {EVENT_COLUMNS} FROM events WHERE id > $1"
        params: list[Any] = [after_id]
        if account is not None:
            params.append(account)
            sql += " AND coalesce(account, '') = $2"
        params.append(limit)
        sql += f" ORDER BY id LIMIT ${len(params)}"
        return [(int(row[0]), event(row, 1)) for row in await self._fetch(sql, *params)]

    async def max_event_id(self) -> int:
        rows = await self._fetch("SELECT coalesce(max(id), 0) FROM events")
        return int(rows[0][0])

    async def get_webhook_cursor(self, key: str) -> int | None:
        rows = await self._fetch("SELECT event_id FROM webhook_cursor WHERE endpoint = $1", key)
        return int(rows[0][0]) if rows else None

    async def set_webhook_cursor(self, key: str, event_id: int) -> None:
        await self._autocommit(
            "INSERT INTO webhook_cursor (endpoint, event_id, updated_at) VALUES ($1, $2, $3)"
            " ON CONFLICT (endpoint) DO UPDATE SET"
            " event_id = excluded.event_id, updated_at = excluded.updated_at",
            key,
            event_id,
            micros(utcnow()),
        )
