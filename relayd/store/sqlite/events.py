"""The events log in SQLite, and the webhook outbox read from it (events by id, per-endpoint cursors)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any, Final

from ..models import Event, utcnow
from ..rows import HOUR_US, event, event_row, micros
from ..sql import EVENT_COLUMNS, events_since
from .connection import Row, SqliteConnection, qmark

_SELECT_EVENTS: Final = f"SELECT {EVENT_COLUMNS} FROM events"

# A keyed event seen again adds to the stored one (migration 6); as an update, not an insert, it leaves the
# hourly roll-ups alone, so rates count each key once.
_INSERT_EVENT: Final = (
    f"INSERT INTO events ({EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (dedup_key) WHERE dedup_key IS NOT NULL DO UPDATE SET"
    " count = events.count + excluded.count,"
    " last_seen = max(coalesce(events.last_seen, events.at), coalesce(excluded.last_seen, excluded.at))"
)


class EventTables(SqliteConnection):
    """:class:`relayd.store.protocols.EventStore` and :class:`relayd.store.protocols.WebhookCursorStore`."""

    async def record_event(self, event: Event) -> None:
        await self._insert_hot(_INSERT_EVENT, [event_row(event)])

    async def record_events(self, events: Iterable[Event]) -> None:
        rows: list[Row] = [event_row(e) for e in events]
        if rows:
            await self._insert_hot(_INSERT_EVENT, rows)

    async def events(
        self,
        since: datetime,
        limit: int = 1000,
        account: str | None = None,
        kind: str | None = None,
    ) -> list[Event]:
        sql, params = events_since(qmark, micros(since), limit, account, kind)
        return [event(row) for row in await self._fetch(sql, params)]

    async def event_by_key(self, key: str) -> Event | None:
        rows = await self._fetch(f"{_SELECT_EVENTS} WHERE dedup_key = ?", [key])
        return event(rows[0]) if rows else None

    async def prune_events(self, before: datetime) -> int:
        async with self._transaction(durable=False) as db:
            cursor = await db.execute("DELETE FROM events WHERE at < ?", [micros(before)])
            return cursor.rowcount

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
            raw = "SELECT count(*) FROM events WHERE account = ? AND kind = ? AND at >= ? AND at < ?"
            raw_params: list[Any] = [account, kind, start, edge * HOUR_US]
            rollup = (
                "SELECT coalesce(sum(n), 0) FROM event_hourly WHERE account = ? AND kind = ? AND hour >= ?"
            )
            rollup_params: list[Any] = [account, kind, edge]
            if reason is not None:
                raw += " AND reason = ?"
                raw_params.append(reason)
                rollup += " AND reason = ?"
                rollup_params.append(reason)
            rows = await self._fetch(f"SELECT ({raw}) + ({rollup})", [*raw_params, *rollup_params])
            return int(rows[0][0])
        sql = "SELECT count(*) FROM events WHERE kind = ? AND at >= ?"
        params: list[Any] = [kind, start]
        for column, value in (("address", address), ("account", account), ("reason", reason)):
            if value is not None:
                sql += f" AND {column} = ?"
                params.append(value)
        rows = await self._fetch(sql, params)
        return int(rows[0][0])

    async def events_after(
        self, after_id: int, account: str | None, limit: int = 100
    ) -> list[tuple[int, Event]]:
        # Read by primary-key range, never through the account indexes: SQLite would otherwise pick
        # events_account_* for "account = ?" and sort the account's whole history by id on every poll.
        # `coalesce(account, '')` hides the column from the planner (portable, unlike SQLite's `+account`).
        sql = f"SELECT id, {EVENT_COLUMNS} FROM events WHERE id > ?"
        params: list[Any] = [after_id]
        if account is not None:
            sql += " AND coalesce(account, '') = ?"
            params.append(account)
        sql += " ORDER BY id LIMIT ?"
        params.append(limit)
        return [(int(row[0]), event(row, 1)) for row in await self._fetch(sql, params)]

    async def max_event_id(self) -> int:
        rows = await self._fetch("SELECT coalesce(max(id), 0) FROM events")
        return int(rows[0][0])

    async def get_webhook_cursor(self, key: str) -> int | None:
        rows = await self._fetch("SELECT event_id FROM webhook_cursor WHERE endpoint = ?", [key])
        return int(rows[0][0]) if rows else None

    async def set_webhook_cursor(self, key: str, event_id: int) -> None:
        async with self._transaction(durable=False) as db:
            await db.execute(
                "INSERT INTO webhook_cursor (endpoint, event_id, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (endpoint) DO UPDATE SET"
                " event_id = excluded.event_id, updated_at = excluded.updated_at",
                [key, event_id, micros(utcnow())],
            )
