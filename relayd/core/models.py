"""The values that cross every layer: an event, a queued recipient, the clock's "now".

Why here, at the bottom: the store keeps events, the metrics count them, policy and delivery both look at a
queued recipient. Defined in a layer they all sit on, none of them imports the others to name the value.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from relayd.core.msgclass import MessageClass

__all__ = ["DeliveryOutcome", "DueRecipient", "Event", "as_utc", "utcnow"]


class DeliveryOutcome(StrEnum):
    """What one delivery attempt of one recipient came to; the value is the event kind and the metric label.

    Why an enum in the bottom layer: delivery produces it, feedback, metrics and webhooks act on it, and a
    misspelt string would silently match nothing.
    """

    DELIVERED = "delivered"
    DEFERRED = "deferred"  # a 4xx or a connection failure: retried later
    BOUNCED = "bounced"  # a 5xx: final
    EXPIRED = "expired"  # retried until ``[queue] max_age``: final
    DROPPED = "dropped"  # the dequeue check refused it (suppressed, suspended): final, never sent
    #: not an attempt's end: a block reply suspended a source address for the destination (the attempt
    #: itself is then ``deferred``)
    IP_SUSPENDED = "ip_suspended"


def utcnow() -> datetime:
    """Aware current UTC time: the default ``now`` of every method that takes one."""
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """Aware UTC copy of ``value``; naive values are taken as UTC (the store never guesses local time)."""
    if value.tzinfo is UTC:
        return value
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class Event:
    """Something policy did or learned, kept for operators and rate computations.

    ``kind`` is a free string (``dropped``, ``suppressed``, ``delivered``, ``bounced`` ...); ``reason`` the
    drop or bounce reason (``suppressed:hard_bounce``, ``cap``, ``userunknown``); ``evidence`` a JSON text
    (the DSN status line, the ARF feedback type) so the schema need not change for each new kind.
    Unattributable reports leave ``account``/``list``/``address`` as ``None``.

    ``key`` makes an event one of a kind: recording an event whose key is already in the log adds its
    ``count`` to the stored one and moves ``last_seen`` (the stored ``at``, evidence and fields stay those
    of the first). Rate counts (:meth:`EventStore.count_events`) count keys, not repeats, so a report
    replayed a hundred times counts once. ``None`` (most events): every record is a new row.
    """

    at: datetime
    kind: str
    account: str | None = None
    list: str | None = None
    address: str | None = None
    reason: str | None = None
    queue_id: str | None = None
    evidence: str = "{}"
    key: str | None = None
    count: int = 1
    last_seen: datetime | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "at", as_utc(self.at))
        if self.last_seen is not None:
            object.__setattr__(self, "last_seen", as_utc(self.last_seen))


@dataclass(frozen=True, slots=True)
class DueRecipient:
    """One recipient ready for a delivery attempt (the message bytes are loaded separately)."""

    queue_id: str
    index: int
    address: str
    attempts: int
    account: str
    mail_from: str
    created_at: float
    list_name: str | None = None
    msg_class: MessageClass = MessageClass.BULK
