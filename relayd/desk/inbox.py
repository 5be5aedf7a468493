"""Which inbound messages a person must see, and keeping them: the postmaster's inbox.

RFC 2142 wants abuse@ and postmaster@ to reach a person. relayd reads machine reports itself; what it
cannot act on is kept here for the postmaster, as one :class:`~relayd.store.models.InboxItem` each:

==========================  =======================================================================
``complaint-text``          mail to abuse@/postmaster@ that is no report: a person wrote it
``provider-notice``         the same, sent by a machine or a mailing system: a mailbox provider's
                            warning, a blocklist's notice (``Auto-Submitted``, ``Precedence: bulk``,
                            ``List-Id``/``List-Unsubscribe``, or a no-reply-style sender)
``unattributed-report``     a bounce or complaint report, to any inbound address, that carries no
                            token of ours (relayd keeps an ``unattributed`` event and acts on nobody)
``unreadable-report``       a report the parser gave up on (time limit, crash), or a DMARC report
                            that was refused (bomb, not a report): the ``note`` says why
==========================  =======================================================================

A machine-readable report relayd could attribute is acted on and not kept: it needs nobody.

Bounds, since anyone can mail these addresses: each item keeps at most :data:`MAX_RAW` bytes of its
message (``truncated`` says when it was cut) and every header field shown is clipped; a source (the client
address, an IPv6 client's /64) gets at most :data:`PER_SOURCE_HOUR` items an hour, after which its mail
is only logged and counted (the ``unattributed`` events still count it). Items are pruned after
``[inbound] keep_inbox`` by :mod:`relayd.app.retention`, open or done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import email.header
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32
from enum import StrEnum

from relayd.store.models import InboxItem, as_utc
from relayd.store.protocols import InboxStore

log = logging.getLogger(__name__)

__all__ = [
    "MAX_RAW",
    "PER_SOURCE_HOUR",
    "Kept",
    "Kind",
    "automated",
    "headers_of",
    "keep",
]

#: Bytes of a message kept with its item; the rest is cut (a complaint is read from its start).
MAX_RAW = 256 * 1024
#: Items kept per source and hour: a person writes a few; a flood gets no further than this.
PER_SOURCE_HOUR = 20
_FIELD_MAX = 300
_HEADER_BYTES = 65536

_HEADERS = BytesHeaderParser(policy=compat32)
#: Local parts of senders that are machines, whatever they put in their headers.
_MACHINE_LOCALS = ("noreply", "no-reply", "donotreply", "do-not-reply", "mailer-daemon", "notification")


class Kind(StrEnum):
    """Why an item was kept (the table in the module docstring)."""

    COMPLAINT_TEXT = "complaint-text"
    PROVIDER_NOTICE = "provider-notice"
    UNATTRIBUTED_REPORT = "unattributed-report"
    UNREADABLE_REPORT = "unreadable-report"


@dataclass(frozen=True, slots=True)
class Kept:
    """An item kept (``item.id`` is its number), or None for ``item`` when the source was over its cap."""

    item: InboxItem | None
    capped: bool = False


def headers_of(raw: bytes) -> Message:
    """The header block of ``raw`` (its first 64 KiB), for classifying and listing."""
    try:
        return _HEADERS.parsebytes(raw[:_HEADER_BYTES])
    except Exception:
        return Message()


def automated(headers: Message, mail_from: str) -> bool:
    """Whether a message was sent by a machine: ``Auto-Submitted`` other than ``no`` (RFC 3834), a bulk
    ``Precedence``, list headers, a null or MAILER-DAEMON sender, or a no-reply-style From. A heuristic
    for sorting the listing only: nothing is dropped or acted on because of it."""
    auto = str(headers.get("Auto-Submitted", "no")).strip().lower()
    if auto and not auto.startswith("no"):
        return True
    if str(headers.get("Precedence", "")).strip().lower() in ("bulk", "list", "junk", "auto_reply"):
        return True
    if headers.get("List-Id") is not None or headers.get("List-Unsubscribe") is not None:
        return True
    sender = mail_from.strip().strip("<>").lower()
    if not sender or sender.partition("@")[0] == "mailer-daemon":
        return True
    from_local = _field(headers, "From").lower().rpartition("@")[0].rpartition("<")[2]
    return any(word in from_local for word in _MACHINE_LOCALS)


def _field(headers: Message, name: str) -> str:
    """A header field decoded (RFC 2047) and clipped to one line of at most a few hundred characters."""
    value = headers.get(name)
    if value is None:
        return ""
    text = str(value)[: _FIELD_MAX * 4]
    with contextlib.suppress(Exception):  # a malformed encoded-word is shown as it came
        text = str(email.header.make_header(email.header.decode_header(text)))
    return " ".join(text.split())[:_FIELD_MAX]


async def keep(
    store: InboxStore,
    raw: bytes,
    kind: Kind,
    now: datetime,
    *,
    source: str,
    mail_from: str = "",
    note: str = "",
) -> Kept:
    """Keep ``raw`` as an item of ``kind`` unless ``source`` has had :data:`PER_SOURCE_HOUR` items kept
    within the last hour. Raises StoreError (the listener answers 451 and the sender retries)."""
    now = as_utc(now)
    if await store.count_inbox_from(source, now - timedelta(hours=1)) >= PER_SOURCE_HOUR:
        log.info("inbox: %s item from %s not kept: over %d an hour", kind.value, source, PER_SOURCE_HOUR)
        return Kept(None, capped=True)
    headers = headers_of(raw)
    item = InboxItem(
        id=0,
        received_at=now,
        kind=kind.value,
        source=source[:80],
        mail_from=" ".join(mail_from.split())[:_FIELD_MAX],
        from_header=_field(headers, "From"),
        subject=_field(headers, "Subject"),
        date_header=_field(headers, "Date"),
        note=" ".join(note.split())[:_FIELD_MAX],
        size=len(raw),
        truncated=len(raw) > MAX_RAW,
    )
    item_id = await store.add_inbox_item(item, raw[:MAX_RAW])
    log.info(
        "inbox: item %d kept (%s) from %s: %s%s",
        item_id,
        kind.value,
        source,
        item.subject[:80] or "(no subject)",
        f" (first {MAX_RAW} of {len(raw)} bytes)" if item.truncated else "",
    )
    return Kept(dataclasses.replace(item, id=item_id))
