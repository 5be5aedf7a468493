"""Suppression: nobody who bounced, complained, unsubscribed or was suppressed by hand gets mail.

Three places ask the store, each with one round trip:
* RCPT: global and account scope (the list is not known before DATA) -> ``550 5.7.1 <a>: suppressed (r)``;
* DATA: all scopes for all recipients of the message at once, now that List-Id names the list;
* dequeue (:mod:`relayd.policy.dequeue`): an address suppressed after its message was queued is never sent to.
"""

from __future__ import annotations

from relayd.policy.model import Action, MessageRequest, RcptRequest, Verdict
from relayd.store.base import SuppressionEntry, SuppressionStore


def suppressed_verdict(address: str, entry: SuppressionEntry) -> Verdict:
    return Verdict(
        Action.REJECT,
        "suppression",
        f"suppressed:{entry.reason}",
        f"550 5.7.1 <{address}>: suppressed ({entry.reason})",
    )


class SuppressionRule:
    name = "suppression"

    def __init__(self, store: SuppressionStore) -> None:
        self._store = store

    async def check(self, req: RcptRequest) -> Verdict | None:
        hits = await self._store.check([req.address], req.account, None, req.now)
        entry = hits.get(req.address)
        return suppressed_verdict(req.address, entry) if entry else None


class ListSuppressionRule:
    name = "list-suppression"

    def __init__(self, store: SuppressionStore) -> None:
        self._store = store

    async def check(self, req: MessageRequest, recipients: tuple[str, ...]) -> dict[str, Verdict]:
        hits = await self._store.check(list(recipients), req.account, req.list_name, req.now)
        return {addr: suppressed_verdict(addr, entry) for addr, entry in hits.items()}
