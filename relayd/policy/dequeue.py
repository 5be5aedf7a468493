"""The last look before a delivery attempt: is this still allowed to go out?

Things change while mail waits in the queue: a recipient bounces hard on another message, complains or
unsubscribes; an account gets suspended. So the suppression check runs again at dequeue (all scopes, the
message's list included), and a suspended account's mail is held instead of sent.

A first attempt within :data:`FRESH` seconds of acceptance skips the suppression lookup: the recipient
passed it at RCPT (and the list scope at DATA) a moment ago, and mail that goes straight out would
otherwise pay a second store query per recipient for nothing. Mail that waited longer (a backlog, a retry,
a restart, a held account released) is looked up again. Postfix looks nothing up at dequeue.

When the store can't answer (PostgreSQL unreachable from this node), queued mail keeps going out on the
last known state: the recipient passed every check when it was accepted, and the suspension set is the
gate's last good copy. Holding all mail for the length of a database outage would turn a store problem into
a delivery outage, which is worse for everyone (DESIGN: "queued mail keeps being delivered").
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum

from relayd.policy.suspension import AccountGate
from relayd.queue.store import DueRecipient
from relayd.store.base import Event, Store, StoreError

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

#: seconds after acceptance during which a first attempt trusts the checks made at submission
FRESH = 30.0


class DequeueCheck:
    def __init__(self, store: Store, gate: AccountGate) -> None:
        self._store = store
        self._gate = gate
        self._degraded = False

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
        if item.attempts == 0 and time.time() - item.created_at < FRESH:
            return SEND
        now = datetime.now(UTC)
        hits = await self._store.check([item.address], item.account, item.list_name, now)
        if self._degraded:
            log.info("store reachable again at dequeue")
            self._degraded = False
        entry = hits.get(item.address)
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
            evidence=json.dumps({"rule": "dequeue-suppression", "scope": str(entry.scope)}),
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
