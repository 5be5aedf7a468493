"""Confirming a subscription (double opt-in): token -> sent ledger -> consent record with proof.

The confirmation mail (:mod:`relayd.mail.confirmation`) carries ``{public_url}/c/<token>``; ``GET`` shows a
page with one button and changes nothing (mail scanners and link previews fetch every URL, and a consent a
robot gave is no consent); ``POST`` from that button records the consent (:mod:`relayd.edge.web.app`). Nothing
HTTP-specific is in here.

Why the ledger, as for unsubscribes (:mod:`relayd.feedback.unsubscribe`): the token is only
``<queue id>-<index>-<mac>``; the address, account and list come from the sent ledger, and the MAC (purpose
``confirm``) must verify for that address. A tampered token, a token minted for another address, an
unsubscribe token presented as a confirm token, or one whose ledger record is gone is invalid, and then
nothing is written. The ledger's list of a confirmation mail is the list its ``X-Relayd-Optin`` named (the
pipeline makes it the message's list), so the token needs nothing else.

What is recorded, and on failure:

1. the consent record ``(account, list, address, confirmed_at, ip, user_agent, source="double-opt-in",
   evidence)`` with evidence ``{"queue_id", "index", "mailed_at"}`` (which confirmation mail, sent when),
   committed durably. If this fails, :class:`~relayd.store.models.StoreError` propagates: the page answers
   503 and nothing changed.
2. a ``consented`` event (for ``relayd events``; not a webhook event). A failure is logged, not raised: the
   consent itself is on file.

Idempotent: when a record for the key exists, it is kept as it is (its time and IP are those of the first
confirmation, which is the proof that counts) and ``already`` is set. Two clicks racing may both write; the
store's upsert keeps one record.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from relayd.core.errors import StorageError
from relayd.core.tokens import verify_token
from relayd.mail.confirmation import PURPOSE
from relayd.store.models import ConsentRecord, Event, SentRecord
from relayd.store.protocols import ConsentStore, EventStore, SentLedger

__all__ = ["SOURCE", "ConfirmResult", "confirm", "resolve"]

log = logging.getLogger(__name__)

#: ``source`` of a consent recorded by the confirm page.
SOURCE = "double-opt-in"

# The exact token alphabet, checked before anything else for the reasons given in relayd.feedback.unsubscribe.
_TOKEN = re.compile(r"[a-z2-7]{16}-[0-9]{1,6}-[a-z2-7]{16}", re.ASCII | re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class ConfirmResult:
    """What a confirmation did: the consent on file now, and whether it was already there."""

    account: str
    list: str
    address: str
    record: ConsentRecord
    already: bool


class ConfirmStore(SentLedger, ConsentStore, EventStore, Protocol):
    """What a confirmation reads and writes: the ledger entry of the mail, the consent, and its event."""


async def resolve(store: SentLedger, secret: bytes, token: str) -> SentRecord | None:
    """The ledger record a valid confirm token stands for, or None (bad shape, unknown (queue id, index),
    MAC not valid for the recorded address, or no list). Reads only; raises StoreError if the ledger fails."""
    token = token.strip()
    if not _TOKEN.fullmatch(token):
        return None
    queue_id, index, _mac = token.lower().split("-")
    record = await store.lookup_sent(queue_id, int(index))
    if record is None or record.list is None:
        return None
    if verify_token(secret, PURPOSE, token, record.address) is None:
        return None
    return record


async def confirm(
    store: ConfirmStore,
    secret: bytes,
    token: str,
    *,
    now: datetime,
    ip: str,
    user_agent: str | None,
) -> ConfirmResult | None:
    """Record the consent ``token`` stands for; None (and nothing written) if the token is invalid.

    ``ip`` and ``user_agent`` are the confirming client's (the proof). Raises StoreError when the consent
    cannot be written (see the module docstring for the rest)."""
    sent = await resolve(store, secret, token)
    if sent is None or sent.list is None:
        return None
    existing = await store.get_consent(sent.account, sent.list, sent.address)
    if existing is not None:
        return ConfirmResult(sent.account, sent.list, sent.address, existing, already=True)
    evidence = {"queue_id": sent.queue_id, "index": sent.index, "mailed_at": sent.sent_at.isoformat()}
    record = ConsentRecord(
        account=sent.account,
        list=sent.list,
        address=sent.address,
        confirmed_at=now,
        ip=ip,
        user_agent=user_agent,
        source=SOURCE,
        evidence=json.dumps(evidence, sort_keys=True),
    )
    await store.add_consent([record])
    log.info(
        "%s: account=%s list=%s rcpt=<%s> consent confirmed from %s",
        sent.queue_id,
        sent.account,
        sent.list,
        sent.address,
        ip or "-",
    )
    event = Event(
        at=now,
        kind="consented",
        account=sent.account,
        list=sent.list,
        address=sent.address,
        reason=SOURCE,
        queue_id=sent.queue_id,
        evidence=json.dumps({**evidence, "ip": ip, "user_agent": user_agent or ""}, sort_keys=True),
    )
    try:
        await store.record_event(event)
    except StorageError:
        log.error(
            "%s: account=%s rcpt=<%s> consent recorded but the event could not be",
            sent.queue_id,
            sent.account,
            sent.address,
            exc_info=True,
        )
    return ConfirmResult(sent.account, sent.list, sent.address, record, already=False)
