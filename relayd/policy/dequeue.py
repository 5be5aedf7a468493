"""The last look before a delivery attempt: is this still allowed to go out?

Things change while mail waits in the queue: a recipient bounces hard on another message, complains or
unsubscribes; an account gets suspended. So the suppression check runs again at dequeue (all scopes, the
message's list included), and a suspended account's mail is held instead of sent. Transactional mail passes
what it passed at submission, an unsubscribe of a list or of the account, and nothing else
(:mod:`relayd.policy.rules.messageclass`); caps and consent are not checked here for any class.

The lookups are batched: the recipients of a message start their first attempts together, and those
that ask in the same turn of the event loop share one store query (one ``IN (...)`` per account and
list) instead of one each -- measured at ~4 % of relayd's CPU with 10 recipients a message.

When the store can't answer (PostgreSQL unreachable from this node), queued mail keeps going out on the
last known state: the recipient passed every check when it was accepted, and the suspension set is the
gate's last good copy. Holding all mail for the length of a database outage would turn a store problem into
a delivery outage, which is worse for everyone (DESIGN: "queued mail keeps being delivered").
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Protocol

from relayd.core.models import DueRecipient
from relayd.core.msgclass import MessageClass
from relayd.policy.rules.suppression import blocking_transactional
from relayd.policy.rules.suspension import AccountGate
from relayd.store.models import Event, StoreError, SuppressionEntry
from relayd.store.protocols import AccountStateStore, EventStore, SuppressionStore

log = logging.getLogger(__name__)


class Decision(Enum):
    SEND = "send"
    DROP = "drop"
    HOLD = "hold"


@dataclass(frozen=True, slots=True)
class DequeueVerdict:
    decision: Decision
    reason: str = ""


SEND = DequeueVerdict(Decision.SEND)

_Waiters = list[tuple[str, "asyncio.Future[SuppressionEntry | None]"]]


class DequeueStore(SuppressionStore, AccountStateStore, EventStore, Protocol):
    """What the last look reads and writes: suppressions, account states, and the drop events."""


class DequeueCheck:
    def __init__(self, store: DequeueStore, gate: AccountGate) -> None:
        self._store = store
        self._gate = gate
        self._degraded = False
        self._pending: dict[tuple[str, str | None], _Waiters] = {}  # (account, list) -> who waits
        self._flushing: set[asyncio.Task[None]] = set()

    async def check(self, item: DueRecipient) -> DequeueVerdict:
        """Never raises for a store failure: then the last known state decides (see the module doc)."""
        try:
            return await self._check(item)
        except StoreError as exc:
            if not self._degraded:
                log.warning("store unavailable at dequeue (%s): delivering on the last known state", exc)
            self._degraded = True
            if self._gate.is_suspended(item.account):
                return DequeueVerdict(Decision.HOLD, "suspended")
            return SEND

    async def _check(self, item: DueRecipient) -> DequeueVerdict:
        if self._gate.is_suspended(item.account):
            # the gate's set is up to a second old: ask the store before holding, or mail that
            # `relayd account reinstate` has just released would be held again, for good
            state = await self._store.get_account_state(item.account)
            if state is not None and state.suspended:
                return DequeueVerdict(Decision.HOLD, "suspended")
        now = datetime.now(UTC)
        entry = await self._lookup(item)
        if self._degraded:
            log.info("store reachable again at dequeue")
            self._degraded = False
        if entry is not None and item.msg_class is MessageClass.TRANSACTIONAL:
            entry = await blocking_transactional(self._store, entry, item.account, item.list_name, now)
        if entry is None:
            return SEND
        reason = f"suppressed:{entry.reason}"
        event = Event(
            at=now,
            kind="dropped",
            account=item.account,
            list=item.list_name,
            address=item.address,
            reason=reason,
            queue_id=item.queue_id,
            evidence=json.dumps(
                {"rule": "dequeue-suppression", "scope": str(entry.scope), "class": str(item.msg_class)}
            ),
        )
        try:
            await self._store.record_event(event)
        except StoreError as exc:  # the drop stands even if its event can't be written
            log.error(
                "%s: dropped <%s> (%s) but the event was not recorded: %s",
                item.queue_id,
                item.address,
                reason,
                exc,
            )
        return DequeueVerdict(Decision.DROP, reason)

    async def _lookup(self, item: DueRecipient) -> SuppressionEntry | None:
        """The entry suppressing ``item`` (all scopes, its list included), or None; raises StoreError."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[SuppressionEntry | None] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)  # after the other attempts that are ready to run have asked
        self._pending.setdefault((item.account, item.list_name), []).append((item.address, fut))
        return await fut

    def _flush(self) -> None:
        batch, self._pending = self._pending, {}
        task = asyncio.create_task(self._query(batch))
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _query(self, batch: dict[tuple[str, str | None], _Waiters]) -> None:
        now = datetime.now(UTC)
        for (account, list_name), waiters in batch.items():
            try:
                hits = await self._store.check([a for a, _ in waiters], account, list_name, now)
            except Exception as exc:  # StoreError for each waiter (and any bug reaches them too)
                for _, fut in waiters:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for address, fut in waiters:
                if not fut.done():
                    fut.set_result(hits.get(address))
