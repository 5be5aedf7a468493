"""Account suspension in SQLite (:class:`relayd.store.protocols.AccountStateStore`)."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Final

from ..models import AccountState, SuspendReason, utcnow
from ..rows import account_state, micros
from .connection import SqliteConnection

log = logging.getLogger(__package__)

_SELECT_ACCOUNT: Final = "SELECT account, suspended, reason, details, since FROM account_state"


class AccountTables(SqliteConnection):
    """Suspend, reinstate, read account states."""

    async def suspend(
        self, account: str, reason: SuspendReason, details: str = "", at: datetime | None = None
    ) -> AccountState:
        reason = SuspendReason(reason)
        async with self._transaction(durable=True) as db:
            await db.execute(
                "INSERT INTO account_state (account, suspended, reason, details, since)"
                " VALUES (?, 1, ?, ?, ?) ON CONFLICT (account) DO UPDATE SET suspended = 1,"
                " reason = excluded.reason, details = excluded.details,"
                " since = CASE WHEN account_state.suspended = 1"
                " THEN account_state.since ELSE excluded.since END",
                [account, reason.value, details, micros(at or utcnow())],
            )
            rows = await db.execute_fetchall(f"{_SELECT_ACCOUNT} WHERE account = ?", [account])
        log.info("account %s suspended (%s)", account, reason.value)
        return account_state(next(iter(rows)))

    async def reinstate(self, account: str, at: datetime | None = None) -> AccountState | None:
        async with self._transaction(durable=True) as db:
            await db.execute(
                "UPDATE account_state SET suspended = 0, reason = NULL, details = '', since = ?"
                " WHERE account = ? AND suspended = 1",
                [micros(at or utcnow()), account],
            )
            rows = list(await db.execute_fetchall(f"{_SELECT_ACCOUNT} WHERE account = ?", [account]))
        if not rows:
            return None
        log.info("account %s reinstated", account)
        return account_state(rows[0])

    async def get_account_state(self, account: str) -> AccountState | None:
        rows = await self._fetch(f"{_SELECT_ACCOUNT} WHERE account = ?", [account])
        return account_state(rows[0]) if rows else None

    async def list_account_states(self, *, suspended_only: bool = False) -> list[AccountState]:
        sql = _SELECT_ACCOUNT
        if suspended_only:
            sql += " WHERE suspended = 1"
        return [account_state(row) for row in await self._fetch(sql + " ORDER BY account")]
