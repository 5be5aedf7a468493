"""The last look before a delivery attempt: is this still allowed to go out?

Things change while mail waits in the queue: a recipient bounces hard on another message, complains or
unsubscribes; an account gets suspended. So the suppression check runs again at dequeue (all scopes, the
message's list included), and a suspended account's mail is held instead of sent. A store failure here
defers the attempt (the recipient stays queued) rather than sending on stale knowledge.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum

from relayd.policy.suspension import AccountGate
from relayd.queue.store import DueRecipient
from relayd.store.base import Event, Store


class Decision(Enum):
    SEND = "send"
    DROP = "drop"
    HOLD = "hold"


@dataclass(frozen=True, slots=True)
class DequeueVerdict:
    decision: Decision
    reason: str = ""


SEND = DequeueVerdict(Decision.SEND)


class DequeueCheck:
    def __init__(self, store: Store, gate: AccountGate) -> None:
        self._store = store
        self._gate = gate

    async def check(self, item: DueRecipient) -> DequeueVerdict:
        """Raises StoreError when the store can't answer (the scheduler then defers)."""
        if self._gate.is_suspended(item.account):
            # the gate's set is up to a second old: ask the store before holding, or mail that
            # `relayd account reinstate` has just released would be held again, for good
            state = await self._store.get_account_state(item.account)
            if state is not None and state.suspended:
                return DequeueVerdict(Decision.HOLD, "suspended")
        now = datetime.now(UTC)
        hits = await self._store.check([item.address], item.account, item.list_name, now)
        entry = hits.get(item.address)
        if entry is None:
            return SEND
        reason = f"suppressed:{entry.reason}"
        await self._store.record_event(
            Event(
                at=now,
                kind="dropped",
                account=item.account,
                list=item.list_name,
                address=item.address,
                reason=reason,
                queue_id=item.queue_id,
                evidence=json.dumps({"rule": "dequeue-suppression", "scope": str(entry.scope)}),
            )
        )
        return DequeueVerdict(Decision.DROP, reason)
