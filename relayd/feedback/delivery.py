"""What happens after each of our own delivery attempts: a metric, an event, and for a final failure the
effects of a bounce.

Why here and not in the delivery scheduler: the scheduler knows how an attempt ended, not what that means
for the recipient or the account. Webhooks and the account rates read the event; a 5xx (or retries
expired) is the same news as a bounce report about the copy, already attributed, so it suppresses and
counts as a DSN would (:meth:`~relayd.feedback.bounces.BounceHandling.on_delivery_failure`).
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from collections.abc import Sequence

from relayd.core import metrics
from relayd.core.errors import DeliveryError
from relayd.core.models import DeliveryOutcome, DueRecipient, Event
from relayd.feedback.bounces import BounceHandling
from relayd.store import SentRecord

__all__ = ["DeliveryRecording"]

_FINAL_FAILURES = frozenset({DeliveryOutcome.BOUNCED, DeliveryOutcome.EXPIRED})


class DeliveryRecording(BounceHandling):
    """The scheduler's observer of delivery attempts (see the module docstring)."""

    async def record_deliveries(self, done: Sequence[tuple[DueRecipient, str, float]]) -> None:
        """:meth:`record_delivery` for several delivered attempts, (recipient, reply, seconds) each, with
        their events written in one go (the copies of one message, sent one after another). Raises
        StorageError."""
        now = dt.datetime.now(dt.UTC)
        _count([(item, seconds) for item, _, seconds in done], DeliveryOutcome.DELIVERED)
        await self.store.record_events(
            [_event(item, DeliveryOutcome.DELIVERED, r, now) for item, r, _ in done]
        )

    async def record_delivery(
        self,
        item: DueRecipient,
        outcome: DeliveryOutcome,
        reply: str,
        seconds: float,
        error: DeliveryError | None,
    ) -> None:
        """Count and record one attempt of ``item`` that came to ``outcome`` with ``reply`` after
        ``seconds``; a final failure with its ``error`` also has a bounce's effects. ``dropped`` is only
        counted (the dequeue check recorded its event with the reason). Raises StorageError."""
        outcome = DeliveryOutcome(outcome)
        _count([(item, seconds)], outcome)
        if outcome is DeliveryOutcome.DROPPED:
            return  # the dequeue check recorded the event with its reason
        await self.store.record_event(_event(item, outcome, reply, dt.datetime.now(dt.UTC)))
        if outcome in _FINAL_FAILURES and error is not None:
            now = dt.datetime.now(dt.UTC)
            await self.on_delivery_failure(
                SentRecord(item.queue_id, item.index, item.account, item.list_name, item.address, now),
                code=error.code or (550 if outcome is DeliveryOutcome.BOUNCED else 451),
                enhanced=error.status,
                text=error.text or str(error),
                command=error.command,
                now=now,
            )


def _count(attempts: Sequence[tuple[DueRecipient, float]], outcome: DeliveryOutcome) -> None:
    """Attempts (recipient, seconds) that came to ``outcome``: counted once per domain, not per attempt
    (each count is a write to the metrics' shared memory file)."""
    if outcome is not DeliveryOutcome.IP_SUSPENDED:  # about our source address, not a delivery outcome
        domains = Counter(item.address.rpartition("@")[2] for item, _ in attempts)
        for domain, n in domains.items():
            metrics.DELIVERIES.labels(outcome.value, metrics.domain_label(domain)).inc(n)
    if outcome in (DeliveryOutcome.DELIVERED, DeliveryOutcome.BOUNCED):
        for _, seconds in attempts:
            metrics.DELIVERY_SECONDS.observe(seconds)


def _event(item: DueRecipient, outcome: DeliveryOutcome, reply: str, at: dt.datetime) -> Event:
    return Event(
        at=at,
        kind=outcome.value,
        account=item.account,
        list=item.list_name,
        address=item.address,
        reason=None,
        queue_id=item.queue_id,
        evidence=json.dumps({"reply": reply[:500], "index": item.index, "class": item.msg_class.value}),
    )
