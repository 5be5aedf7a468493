"""Suppression: nobody who bounced, complained, unsubscribed or was suppressed by hand gets mail.

Three places ask the store, each with one round trip:
* RCPT: global and account scope (the list is not known before DATA) -> ``550 5.7.1 <a>: suppressed (r)``;
* DATA: all scopes for all recipients of the message at once, now that List-Id names the list;
* dequeue (:mod:`relayd.policy.dequeue`): an address suppressed after its message was queued is never sent to.

Transactional mail (:mod:`relayd.policy.rules.messageclass`) passes exactly one kind of entry: an unsubscribe
at
list or account scope (:func:`transactional_passes`). Every other entry stops it too. Because the class is
known only at DATA, RCPT lets such an unsubscribe pass for an account that may send transactional mail,
and DATA decides for each message (its bulk mail is then dropped there, with the same event).
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

from relayd.policy.model import Action, MessageRequest, RcptRequest, Verdict
from relayd.store.models import Reason, Scope, SuppressionEntry
from relayd.store.protocols import SuppressionStore


def suppressed_verdict(address: str, entry: SuppressionEntry) -> Verdict:
    return Verdict(
        Action.REJECT,
        "suppression",
        f"suppressed:{entry.reason}",
        f"550 5.7.1 <{address}>: suppressed ({entry.reason})",
    )


def transactional_passes(entry: SuppressionEntry) -> bool:
    """Whether ``entry`` lets transactional mail through: only an unsubscribe of a list or of the
    account's mail. Someone who left a newsletter still gets the password reset they ask for; but a hard
    bounce (the address is bad), a complaint (the person told their mailbox provider "spam"), a spam trap,
    a discard, a manual entry, a soft-bounce limit or a global unsubscribe stop it as they stop any mail,
    and so does any reason added later until it is named here."""
    return entry.reason is Reason.UNSUBSCRIBE and entry.scope in (Scope.LIST, Scope.ACCOUNT)


async def blocking_transactional(
    store: SuppressionStore,
    entry: SuppressionEntry,
    account: str,
    list_name: str | None,
    now: datetime,
) -> SuppressionEntry | None:
    """The entry that stops a transactional message, given ``entry``, the one ``check`` returned.

    ``check`` returns the broadest matching entry, so an account-scope unsubscribe can hide an entry of
    the message's list (a manual one, say). Only in that case is the list asked again: one more query for
    a recipient who unsubscribed from the account, none for anyone else."""
    if not transactional_passes(entry):
        return entry
    if entry.scope is not Scope.ACCOUNT or list_name is None:
        return None
    below = await store.list_entries(
        address=entry.address, scope=Scope.LIST, account=account, list_name=list_name, now=now, limit=1
    )
    return next((e for e in below if e.is_active(now) and not transactional_passes(e)), None)


class SuppressionRule:
    """RCPT: global and account entries. ``transactional_accounts`` are those allowed to send
    transactional mail: their recipients' account-scope unsubscribes are left to DATA, where the class
    of the message is known."""

    name = "suppression"

    def __init__(self, store: SuppressionStore, transactional_accounts: Collection[str] = ()) -> None:
        self._store = store
        self._transactional = frozenset(transactional_accounts)

    async def check(self, req: RcptRequest) -> Verdict | None:
        hits = await self._store.check([req.address], req.account, None, req.now)
        entry = hits.get(req.address)
        if entry is None:
            return None
        if req.account in self._transactional and transactional_passes(entry):
            return None  # decided at DATA: ListSuppressionRule (bulk) or TransactionalSuppressionRule
        return suppressed_verdict(req.address, entry)


class ListSuppressionRule:
    name = "list-suppression"

    def __init__(self, store: SuppressionStore) -> None:
        self._store = store

    async def check(self, req: MessageRequest, recipients: tuple[str, ...]) -> dict[str, Verdict]:
        hits = await self._store.check(list(recipients), req.account, req.list_name, req.now)
        return {addr: suppressed_verdict(addr, entry) for addr, entry in hits.items()}


class TransactionalSuppressionRule:
    """DATA, transactional mail: every scope of the message's list, minus what such mail passes."""

    name = "transactional-suppression"

    def __init__(self, store: SuppressionStore) -> None:
        self._store = store

    async def check(self, req: MessageRequest, recipients: tuple[str, ...]) -> dict[str, Verdict]:
        hits = await self._store.check(list(recipients), req.account, req.list_name, req.now)
        verdicts: dict[str, Verdict] = {}
        for addr, entry in hits.items():
            blocking = await blocking_transactional(self._store, entry, req.account, req.list_name, req.now)
            if blocking is not None:
                verdicts[addr] = suppressed_verdict(addr, blocking)
        return verdicts
