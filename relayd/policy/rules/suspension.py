"""Account suspension: a suspended account can't submit, and its queued mail is held, not lost.

The set of suspended accounts is read from the store once a second (and at once after the CLI or the
reputation code changed it in this process), so MAIL FROM costs no store round trip. Suspension decided
elsewhere (the CLI, another node) takes effect here within ``refresh_interval``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from relayd.store.models import StoreError
from relayd.store.protocols import AccountStateStore

log = logging.getLogger(__name__)

SUSPENDED_REPLY = "550 5.7.1 account suspended"


class AccountGate:
    def __init__(self, store: AccountStateStore, refresh_interval: float = 1.0) -> None:
        self._store = store
        self._interval = refresh_interval
        self._suspended: frozenset[str] = frozenset()
        self._task: asyncio.Task[None] | None = None

    def is_suspended(self, account: str) -> bool:
        return account in self._suspended

    async def refresh(self) -> frozenset[str]:
        """Re-read the suspended accounts; on a store failure keep the last known set (fail safe: a
        store outage neither suspends nor releases anyone)."""
        try:
            states = await self._store.list_account_states(suspended_only=True)
        except StoreError as exc:
            log.warning("could not refresh account states: %s", exc)
            return self._suspended
        self._suspended = frozenset(s.account for s in states)
        return self._suspended

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="account-gate")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.refresh()
