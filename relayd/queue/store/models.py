"""What the queue stores and what its readers get back: states, rows, an operator's selections.

Frozen dataclasses, no I/O: the command line (relayd.cli.queue), the tenant API and delivery read these
and never see a database row. The SQL conditions beside :class:`View` and :class:`Selection` are the
readers' and the operator's ``WHERE`` clauses over ``recipients r JOIN messages m``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from relayd.core.msgclass import MessageClass


class State(StrEnum):
    QUEUED = "queued"
    HELD = "held"
    DELIVERED = "delivered"
    FAILED = "failed"
    EXPIRED = "expired"
    DROPPED = "dropped"


FINAL_STATES = (State.DELIVERED, State.FAILED, State.EXPIRED, State.DROPPED)


@dataclass(frozen=True, slots=True)
class NewMessage:
    """What the submission listener hands to the queue: one message, its recipients, who sent it."""

    queue_id: str
    account: str
    mail_from: str
    recipients: tuple[str, ...]
    data: bytes
    list_name: str | None = None
    #: each recipient gets its own copy, made from ``data`` at delivery (relayd.policy.render: unsubscribe
    #: link, trace token, DKIM signature); False: ``data`` is delivered as it is
    render: bool = False
    #: bulk or transactional: the dequeue check and the copy made at delivery depend on it
    msg_class: MessageClass = MessageClass.BULK
    #: stored in front of ``data`` (our ``Received`` field) when no one keeps the joined bytes in memory
    #: (relayd.queue.handoff ``keeps_bytes``): the queue writes both as they are, a big message is not
    #: copied once more to put a line in front of it
    head: bytes = b""

    @property
    def size(self) -> int:
        """Octets of the message as stored: ``head`` and ``data``."""
        return len(self.head) + len(self.data)


@dataclass(frozen=True, slots=True)
class StoredData:
    """What delivery reads for one recipient: bytes, and whether a copy must be rendered from them.

    A queue written before copies were made at delivery holds finished per-recipient copies
    (``recipients.data``); those are delivered as they are."""

    data: bytes
    render: bool


_CLASSES: dict[str, MessageClass] = {c.value: c for c in MessageClass}


def class_of(value: str) -> MessageClass:
    """The stored class; one this version does not know is taken as bulk, which applies every rule. (A
    dict, not ``MessageClass(value)``: it runs for every row a scan reads, and the enum's call was 1.7% of
    a delivery process's time.)"""
    return _CLASSES.get(value, MessageClass.BULK)


@dataclass(frozen=True, slots=True)
class RecipientRow:
    """One recipient of a message, its state and its last attempt (``relayd queue show``)."""

    queue_id: str
    index: int
    address: str
    state: str
    attempts: int
    next_attempt: float
    updated_at: float
    last_reply: str | None


@dataclass(frozen=True, slots=True)
class MessageRow:
    queue_id: str
    account: str
    mail_from: str
    list_name: str | None
    created_at: float
    size: int
    recipients: tuple[RecipientRow, ...]
    msg_class: MessageClass = MessageClass.BULK


class Action(StrEnum):
    """What an operator does to recipients from the command line (Postfix's postsuper/postqueue)."""

    HOLD = "hold"
    RELEASE = "release"
    RETRY = "retry"
    DROP = "drop"


class View(StrEnum):
    """The states ``relayd queue list`` shows, as an operator thinks of them (Postfix's queues).

    ``deferred``: queued, tried before, waiting for its next attempt; ``active``: queued and due now or
    never tried; ``held``: kept until released; ``done``: delivered, failed, expired or dropped. The
    states on disk (:class:`State`) are views of their own."""

    PENDING = "pending"  # every unfinished recipient: the default
    DEFERRED = "deferred"
    ACTIVE = "active"
    HELD = "held"
    DONE = "done"
    QUEUED = "queued"
    DELIVERED = "delivered"
    FAILED = "failed"
    EXPIRED = "expired"
    DROPPED = "dropped"


#: the SQL condition of each view; ``?`` is the current time
VIEW_SQL: dict[View, tuple[str, int]] = {
    View.PENDING: ("r.state IN ('queued', 'held')", 0),
    View.DEFERRED: ("r.state = 'queued' AND r.attempts > 0 AND r.next_attempt > ?", 1),
    View.ACTIVE: ("r.state = 'queued' AND (r.attempts = 0 OR r.next_attempt <= ?)", 1),
    View.HELD: ("r.state = 'held'", 0),
    View.DONE: ("r.state NOT IN ('queued', 'held')", 0),
    View.QUEUED: ("r.state = 'queued'", 0),
    View.DELIVERED: ("r.state = 'delivered'", 0),
    View.FAILED: ("r.state = 'failed'", 0),
    View.EXPIRED: ("r.state = 'expired'", 0),
    View.DROPPED: ("r.state = 'dropped'", 0),
}

#: the part of a recipient address after its last ``@``, lower-cased (rtrim strips every character but
#: ``@`` from the right: linear in the address, which RCPT bounds)
RCPT_DOMAIN = "lower(substr(r.address, length(rtrim(r.address, replace(r.address, '@', ''))) + 1))"

#: qshape's age buckets in minutes: a recipient counts in the first bucket its message's age is within,
#: or in the last one (older than all of them)
AGE_BUCKETS = (5, 10, 20, 40, 80, 160, 320, 640, 1280)


@dataclass(frozen=True, slots=True)
class Selection:
    """Which recipients an operator means: every criterion given must match. Nothing given selects every
    recipient (the command line refuses that for hold, release and drop)."""

    queue_ids: tuple[str, ...] = ()
    domain: str | None = None
    account: str | None = None
    recipient: str | None = None
    sender: str | None = None
    created_before: float | None = None

    def sql(self) -> tuple[str, list[Any]]:
        """`` AND ...`` conditions over ``recipients r JOIN messages m``, and their parameters."""
        parts: list[str] = []
        params: list[Any] = []
        if self.queue_ids:
            parts.append(f"r.msg_id IN ({', '.join('?' * len(self.queue_ids))})")
            params.extend(self.queue_ids)
        if self.domain is not None:
            parts.append(f"{RCPT_DOMAIN} = ?")
            params.append(self.domain.lower().rstrip("."))
        if self.account is not None:
            parts.append("m.account = ?")
            params.append(self.account)
        if self.recipient is not None:
            parts.append("lower(r.address) = ?")
            params.append(self.recipient.lower())
        if self.sender is not None:
            parts.append("lower(m.mail_from) = ?")
            params.append(self.sender.lower())
        if self.created_before is not None:
            parts.append("m.created_at < ?")
            params.append(self.created_before)
        return "".join(f" AND {p}" for p in parts), params


@dataclass(frozen=True, slots=True)
class Affected:
    """A recipient an operator's action selected; ``changed`` False: left as it was (a release of a
    recipient the suspension of its account holds)."""

    queue_id: str
    index: int
    address: str
    account: str
    held_by: str | None
    changed: bool


@dataclass(frozen=True, slots=True)
class QueueEntry(RecipientRow):
    """One recipient with its message's envelope: a row of ``relayd queue list``.

    The recipient's own columns come first, as :class:`RecipientRow` has them, so a row of
    ``recipients r JOIN messages m`` builds either one positionally."""

    held_by: str | None
    account: str
    mail_from: str
    list_name: str | None
    created_at: float
    size: int
