"""Account suspension in PostgreSQL (:class:`relayd.store.protocols.AccountStateStore`)."""

from __future__ import annotations

import logging
from datetime import datetime

from ..models import AccountState, SuspendReason, utcnow
from ..rows import account_state, micros
from ..sql import ACCOUNT_COLUMNS
from .connection import CHANNEL_ACCOUNT, PostgresConnection

log = logging.getLogger(__package__)


class AccountTables(PostgresConnection):
    """Suspend, reinstate, read account states; changes are announced on :data:`CHANNEL_ACCOUNT`."""

    async def suspend(
        self, account: str, reason: SuspendReason, details: str = "", at: datetime | None = None
    ) -> AccountState:
        reason = SuspendReason(reason)
        async with self._transaction(durable=True) as conn:
            row = await conn.fetchrow(
                f"INSERT INTO account_state ({ACCOUNT_COLUMNS}) VALUES ($1, true, $2, $3, $4)"
                " ON CONFLICT (account) DO UPDATE SET suspended = true,"
                " reason = excluded.reason, details = excluded.details,"
                " since = CASE WHEN account_state.suspended THEN account_state.since ELSE excluded.since END"
                f" RETURNING {ACCOUNT_COLUMNS}",
                account,
                reason.value,
                details,
                micros(at or utcnow()),
            )
            await self._notify(conn, CHANNEL_ACCOUNT, account)
        assert row is not None  # an upsert always returns its row
        log.info("account %s suspended (%s)", account, reason.value)
        return account_state(row)

    async def reinstate(self, account: str, at: datetime | None = None) -> AccountState | None:
        async with self._transaction(durable=True) as conn:
            row = await conn.fetchrow(
                "UPDATE account_state SET suspended = false, reason = NULL, details = '', since = $1"
                f" WHERE account = $2 AND suspended RETURNING {ACCOUNT_COLUMNS}",
                micros(at or utcnow()),
                account,
            )
            if row is None:
                row = await conn.fetchrow(
                    f"SELECT {ACCOUNT_COLUMNS} FROM account_state WHERE account = $1", account
                )
            else:
                await self._notify(conn, CHANNEL_ACCOUNT, account)
        if row is None:
            return None
        log.info("account %s reinstated", account)
        return account_state(row)

    async def get_account_state(self, account: str) -> AccountState | None:
        rows = await self._fetch(f"SELECT {ACCOUNT_COLUMNS} FROM account_state WHERE account = $1", account)
        return account_state(rows[0]) if rows else None

    async def list_account_states(self, *, suspended_only: bool = False) -> list[AccountState]:
        sql = f"SELECT {ACCOUNT_COLUMNS} FROM account_state"
        if suspended_only:
            sql += " WHERE suspended"
        return [account_state(row) for row in await self._fetch(sql + " ORDER BY account")]
