"""Unsubscribing one recipient: token -> sent ledger -> suppression, event, queued mail dropped.

Shared by every unsubscribe channel (DESIGN.md "Flow" step 6): the RFC 8058 one-click POST and the button on
the unsubscribe page (:mod:`relayd.edge.web.app`), and mail to ``unsubscribe+<token>@<inbound domain>`` (the
inbound listener). Nothing HTTP-specific is in here: the caller says which channel asked (``source``) and
passes whatever evidence it has.

Why the token is checked against the ledger and not trusted on its face: a token carries only
``<queue id>-<index>-<mac>``; the recipient address, account and list come from the sent ledger, and the MAC
must verify for *that* address (:func:`relayd.core.tokens.verify_token`). So a tampered token, a token minted
for another address, or one whose ledger record was pruned is simply invalid: RFC 8058 §4 asks for a
hard-to-forge component that the server verifies.

Order of writes, and what happens on failure:

1. the suppression entry (list scope; account scope when the message named no list), committed durably
   (``synchronous=FULL`` in the SQLite store). If this fails, :class:`~relayd.store.StoreError`
   propagates and nothing changed: the web answers 503, a mailbox provider retries.
2. the ``unsubscribed`` event (evidence: source, user agent, IP). A failure here is logged, not raised: the
   unsubscribe itself is done, and telling the recipient to try again would be false.
3. ``queue.drop_matching`` for mail already queued to that (account, list, address) (Mail-Maker's rule,
   seeds/002: "also from mailings in progress"). A failure is logged, not raised: the suppression check at
   dequeue (:mod:`relayd.policy.dequeue`) stops that mail anyway.

Idempotent: when an active unsubscribe entry for the same key exists, it is left as it was (its
``created_at`` is the time of the first request, which is the one that counts as evidence), no second event
is written, and queued mail is still dropped. Two requests racing may both write; the store's upsert keeps
one entry.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Protocol

from relayd.core import metrics
from relayd.core.errors import StorageError
from relayd.core.tokens import verify_token
from relayd.feedback.reputation import QueueControl
from relayd.store import (
    Event,
    EventStore,
    Reason,
    Scope,
    SentLedger,
    SentRecord,
    SuppressionEntry,
    SuppressionStore,
)

__all__ = [
    "PURPOSE",
    "UnsubscribeResult",
    "UnsubscribeSource",
    "UnsubscribeStore",
    "is_unsubscribed",
    "resolve",
    "scope_of",
    "unsubscribe",
]

log = logging.getLogger(__name__)

#: The token purpose mixed into the MAC (:func:`relayd.policy.render.unsubscribe_url` mints with it).
PURPOSE = "unsub"

# The exact token alphabet (lower-case RFC 4648 base32, decimal index). Checked before parse_token because
# str.isdigit() accepts non-ASCII digits and hmac.compare_digest raises TypeError on non-ASCII str: a
# crafted URL must be "invalid", never a 500.
_TOKEN = re.compile(r"[a-z2-7]{16}-[0-9]{1,6}-[a-z2-7]{16}", re.ASCII | re.IGNORECASE)


class UnsubscribeStore(SuppressionStore, EventStore, SentLedger, Protocol):
    """What an unsubscribe reads and writes: the ledger, the suppression list and the event log."""


class UnsubscribeSource(StrEnum):
    """Which channel asked; it goes into the suppression entry's ``source`` and the event's evidence."""

    ONE_CLICK = "one-click"  # RFC 8058 POST by a mailbox provider's unsubscribe button
    WEB = "web"  # the button on our unsubscribe page
    MAILTO = "mailto"  # mail to unsubscribe+<token>@<inbound domain>


@dataclass(frozen=True, slots=True)
class UnsubscribeResult:
    """What an unsubscribe did. ``already``: an active unsubscribe for this key was on file and was kept;
    ``dropped``: how many queued recipients were dropped (0 when there was no queue or it failed)."""

    account: str
    list: str | None
    address: str
    scope: Scope
    queue_id: str
    already: bool
    dropped: int


def scope_of(record: SentRecord) -> Scope:
    """An unsubscribe is for the list the message named; mail of an account's unnamed list has no list to
    leave, so the recipient leaves the account (DESIGN.md "Reasons and scopes")."""
    return Scope.LIST if record.list else Scope.ACCOUNT


async def resolve(store: UnsubscribeStore, secret: bytes, token: str) -> SentRecord | None:
    """The ledger record a valid unsubscribe token stands for, or None (bad shape, unknown (queue id,
    index), MAC not valid for the recorded address). Reads only. Raises StoreError if the ledger fails."""
    token = token.strip()
    if not _TOKEN.fullmatch(token):
        return None
    queue_id, index, _mac = token.lower().split("-")
    record = await store.lookup_sent(queue_id, int(index))
    if record is None:
        return None
    if verify_token(secret, PURPOSE, token, record.address) is None:
        return None
    return record


async def _entry_at_key(
    store: UnsubscribeStore, record: SentRecord, now: datetime
) -> SuppressionEntry | None:
    """The active entry stored under this record's (address, scope, account, list), if any."""
    entries = await store.list_entries(
        address=record.address,
        scope=scope_of(record),
        account=record.account,
        list_name=record.list,
        now=now,
        limit=1,
    )
    return entries[0] if entries else None


async def is_unsubscribed(store: UnsubscribeStore, record: SentRecord, now: datetime) -> bool:
    """True when an active unsubscribe entry already covers this record's (address, scope, account, list)."""
    entry = await _entry_at_key(store, record, now)
    return entry is not None and entry.reason is Reason.UNSUBSCRIBE


async def unsubscribe(
    store: UnsubscribeStore,
    queue: QueueControl | None,
    secret: bytes,
    token: str,
    *,
    source: UnsubscribeSource | str,
    now: datetime,
    evidence: Mapping[str, str] | None = None,
) -> UnsubscribeResult | None:
    """Unsubscribe the recipient ``token`` was minted for; None (and nothing written) if it is invalid.

    ``source`` is one of :class:`UnsubscribeSource` (``ValueError`` otherwise); ``evidence`` adds keys to
    the event's evidence JSON (the web passes ``user_agent`` and ``ip``, the mail path the sender).
    Raises StoreError when the suppression cannot be written (see the module docstring for the rest).
    """
    src = UnsubscribeSource(source)
    record = await resolve(store, secret, token)
    if record is None:
        return None
    scope = scope_of(record)
    existing = await _entry_at_key(store, record, now)
    already = existing is not None and existing.reason is Reason.UNSUBSCRIBE
    if not already:
        # an entry of another reason under the same key (a complaint) is kept, not replaced: it blocks
        # all the same mail, and more (transactional mail passes an unsubscribe, never a complaint)
        if existing is None:
            await store.add(
                [
                    SuppressionEntry(
                        record.address,
                        scope,
                        record.account,
                        record.list if scope is Scope.LIST else None,
                        Reason.UNSUBSCRIBE,
                        source=src.value,
                        created_at=now,
                    )
                ]
            )
        log.info(
            "%s: account=%s list=%s rcpt=<%s> unsubscribed (%s)",
            record.queue_id,
            record.account,
            record.list or "-",
            record.address,
            src.value,
        )
        details = {"source": src.value, "index": record.index, **(evidence or {})}
        event = Event(
            at=now,
            kind="unsubscribed",
            account=record.account,
            list=record.list,
            address=record.address,
            reason=Reason.UNSUBSCRIBE.value,
            queue_id=record.queue_id,
            evidence=json.dumps(details, sort_keys=True),
        )
        metrics.observe_events([event])
        try:
            await store.record_event(event)
        except StorageError:
            log.error(
                "%s: account=%s rcpt=<%s> unsubscribed but the event could not be recorded",
                record.queue_id,
                record.account,
                record.address,
                exc_info=True,
            )
    dropped = 0
    if queue is not None:
        try:
            # transactional mail (a password reset) is not what the person unsubscribed from: it stays
            dropped = await queue.drop_matching(
                record.account, record.list, record.address, "unsubscribed", keep_transactional=True
            )
        except StorageError:
            log.warning(
                "%s: account=%s rcpt=<%s> queued mail not dropped now (the dequeue check will stop it)",
                record.queue_id,
                record.account,
                record.address,
                exc_info=True,
            )
    if dropped:
        log.info(
            "%s: account=%s rcpt=<%s> %d queued recipient(s) dropped: unsubscribed",
            record.queue_id,
            record.account,
            record.address,
            dropped,
        )
    return UnsubscribeResult(
        account=record.account,
        list=record.list,
        address=record.address,
        scope=scope,
        queue_id=record.queue_id,
        already=already,
        dropped=dropped,
    )
