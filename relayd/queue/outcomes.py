"""What became of a delivery attempt: written to the queue, logged, and told to the observer.

One transition per outcome (relayd.queue.store): delivered and bounced are final, a temporary failure is
deferred to the next slot of ``[queue] retry_schedule`` or expired once older than ``max_age``, a recipient
the dequeue check refused is dropped. Each outcome is logged on one line (Postfix-like text plus the same
facts as fields for JSON logs) and passed to the observer (relayd.feedback: events, counts, bounces).

Failure: an outcome the queue cannot take now (disk full) is kept in memory and written as soon as it can
be (:meth:`Outcomes.write_unrecorded`); an observer that fails is logged, never fatal to delivery.

The scheduler's attempts end as (each written through the queue's group commit):
  250            -> delivered
  5xx, null MX   -> failed (permanent; recorded per recipient)
  5xx block      -> deferred: a block list reply is about our source address, not the recipient; that
                    address is suspended for the destination (event ``ip_suspended``) and the retry goes out
                    through another address of the pool, or after the suspension
  4xx, timeouts  -> deferred to the next slot of ``retry_schedule``, or expired once older than ``max_age``
  shaping        -> postponed: next attempt moved, no attempt counted, no SMTP traffic
  our own bug    -> deferred, logged with the queue id (a crash in a worker never drops mail)
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

from relayd.config import QueueConfig
from relayd.core.errors import DeliveryError, PermanentFailure, StorageError
from relayd.core.models import DeliveryOutcome, DueRecipient
from relayd.queue.store import QueueStore, State

#: the delivery lines keep the logger name operators filter on (and JSON logs print), the scheduler's
log = logging.getLogger("relayd.queue.scheduler")

#: called after every attempt with (recipient, outcome, reply, seconds, error): delivered, deferred,
#: bounced, expired, dropped -- and ``ip_suspended`` (before that attempt's ``deferred``) when its block
#: reply suspended a source address for the destination; the reply then names the address, the destination
#: and for how long. Its failures are logged, never fatal to delivery.
Observer = Callable[[DueRecipient, DeliveryOutcome, str, float, DeliveryError | None], Awaitable[None]]

#: called once for several attempts that were all delivered, with (recipient, reply, seconds) each: what the
#: observer would be told of each, in one go (one write of their events). Without it the observer is
#: called for each.
ManyObserver = Callable[[Sequence[tuple[DueRecipient, str, float]]], Awaitable[None]]

_Key = tuple[str, int]


class Outcomes:
    """Records attempts' outcomes for the scheduler: the queue's transition, the log line, the observer."""

    def __init__(
        self,
        store: QueueStore,
        clock: Callable[[], float],
        observer: Observer | None,
        observer_many: ManyObserver | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._observer = observer
        self._observer_many = observer_many
        self._unrecorded: dict[_Key, Callable[[], Awaitable[Any]]] = {}

    @property
    def unrecorded(self) -> Collection[_Key]:
        """Recipients whose outcome is not written yet: not to be attempted again meanwhile."""
        return self._unrecorded.keys()

    async def record(self, item: DueRecipient, write: Callable[[], Awaitable[Any]]) -> None:
        """Write an attempt's outcome. When the queue can't take it now (disk full), the outcome is kept
        in memory and written as soon as it can be; until then the recipient is not attempted again,
        which would deliver it once more on every scan (seen in the endurance run on a full disk)."""
        try:
            await write()
        except StorageError as exc:
            log.error(
                "%s: recipient %d: outcome not written yet (%s); kept until it can be",
                item.queue_id,
                item.index,
                exc,
            )
            self._unrecorded[(item.queue_id, item.index)] = write

    async def write_unrecorded(self) -> None:
        for key, write in list(self._unrecorded.items()):
            try:
                await write()
            except StorageError:
                return  # still full: try again at the next scan
            del self._unrecorded[key]

    async def observe(
        self,
        item: DueRecipient,
        outcome: DeliveryOutcome,
        reply: str,
        seconds: float,
        error: DeliveryError | None = None,
    ) -> None:
        if self._observer is None:
            return
        try:
            await self._observer(item, outcome, reply, seconds, error)
        except Exception:
            log.exception("%s: recording the %s outcome failed", item.queue_id, outcome)

    async def dropped(self, item: DueRecipient, reason: str) -> None:
        """The dequeue check refused the recipient: dropped, never sent."""
        await self.record(item, lambda: self._store.drop_recipient(item.queue_id, item.index, reason))
        await self.observe(item, DeliveryOutcome.DROPPED, reason, 0.0)
        log_attempt(item, DeliveryOutcome.DROPPED, reason, 0.0, item.attempts)

    async def postponed(self, items: Sequence[DueRecipient], until: float, why: str) -> None:
        """Shaping postponed ``items`` (``why``: the destination and reason): their due time moves to
        ``until``, no attempt is counted and nothing was sent."""
        for item in items:
            await self.record(item, functools.partial(self._store.postpone, item.queue_id, item.index, until))
            log.debug(
                "%s: to=<%s> account=%s postponed by %s", item.queue_id, item.address, item.account, why
            )

    async def bounced(self, item: DueRecipient, exc: PermanentFailure, attempts: int, started: float) -> None:
        """A permanent failure (5xx, null MX) of the attempt begun at ``started`` (time.monotonic)."""
        failed = str(exc)
        await self.record(
            item, lambda: self._store.finish(item.queue_id, item.index, State.FAILED, failed, attempts)
        )
        log_attempt(item, DeliveryOutcome.BOUNCED, str(exc), time.monotonic() - started, attempts, exc)
        await self.observe(item, DeliveryOutcome.BOUNCED, str(exc), time.monotonic() - started, exc)

    async def delivered(self, item: DueRecipient, reply: str, attempts: int, started: float) -> None:
        """The attempt begun at ``started`` (time.monotonic) ended with ``reply``, a 250."""
        await self.record(
            item, lambda: self._store.finish(item.queue_id, item.index, State.DELIVERED, reply, attempts)
        )
        elapsed = time.monotonic() - started
        log_attempt(item, DeliveryOutcome.DELIVERED, reply, elapsed, attempts)
        await self.observe(item, DeliveryOutcome.DELIVERED, reply, elapsed)

    async def delivered_many(self, done: Sequence[tuple[DueRecipient, str, int, float]]) -> None:
        """Several attempts that each ended with a 250, (recipient, reply, attempts, seconds) each: the
        copies of one message sent one after another, recorded in one write and observed at once. A
        queue that can't take the write now keeps each outcome in memory, as :meth:`record` does."""
        if not done:
            return
        try:
            await self._store.finish_many(
                [(item.queue_id, item.index, State.DELIVERED, reply, n) for item, reply, n, _ in done]
            )
        except StorageError as exc:
            log.error(
                "%s: %d outcome(s) not written yet (%s); kept until they can be",
                done[0][0].queue_id,
                len(done),
                exc,
            )
            for item, reply, n, _ in done:
                write = functools.partial(
                    self._store.finish, item.queue_id, item.index, State.DELIVERED, reply, n
                )
                self._unrecorded[(item.queue_id, item.index)] = write
        for item, reply, n, seconds in done:
            log_attempt(item, DeliveryOutcome.DELIVERED, reply, seconds, n)
        if self._observer_many is None:
            for item, reply, _, seconds in done:
                await self.observe(item, DeliveryOutcome.DELIVERED, reply, seconds)
            return
        try:
            await self._observer_many([(item, reply, seconds) for item, reply, _, seconds in done])
        except Exception:
            log.exception("%s: recording %d delivered outcome(s) failed", done[0][0].queue_id, len(done))

    async def temporary(
        self,
        item: DueRecipient,
        attempts: int,
        reply: str,
        queue: QueueConfig,
        error: DeliveryError | None = None,
    ) -> DeliveryOutcome:
        """Defer, or expire once past ``max_age``; returns which."""
        now = self._clock()
        deadline = item.created_at + queue.max_age
        if now >= deadline:
            await self.record(
                item, lambda: self._store.finish(item.queue_id, item.index, State.EXPIRED, reply, attempts)
            )
            log_attempt(item, DeliveryOutcome.EXPIRED, reply, None, attempts, error)
            return DeliveryOutcome.EXPIRED
        schedule = queue.retry_schedule
        delay = schedule[min(attempts - 1, len(schedule) - 1)]
        next_attempt = min(now + delay, deadline)
        await self.record(
            item, lambda: self._store.defer(item.queue_id, item.index, next_attempt, reply, attempts)
        )
        log_attempt(item, DeliveryOutcome.DEFERRED, reply, None, attempts, error, retry_in=next_attempt - now)
        return DeliveryOutcome.DEFERRED


def log_attempt(
    item: DueRecipient,
    outcome: DeliveryOutcome,
    reply: str,
    seconds: float | None,
    attempts: int,
    error: DeliveryError | None = None,
    *,
    retry_in: float | None = None,
) -> None:
    """One line per delivery attempt: Postfix-like text, and the same facts as fields for JSON logs."""
    if error is not None:
        code, status = (str(error.code) if error.code else None), error.status
    elif reply[:3].isdigit():
        code, status = reply[:3], (reply.split(" ", 2)[1] if " " in reply else None)
    else:
        code, status = None, None
    fields = {
        "event": "delivery",
        "queue_id": item.queue_id,
        "account": item.account,
        "list": item.list_name,
        "rcpt_domain": item.address.rpartition("@")[2],
        "outcome": outcome,
        "reply_code": code,
        "status": status,
        "attempts": attempts,
        "latency": round(seconds, 4) if seconds is not None else None,
        "retry_in": round(retry_in) if retry_in is not None else None,
    }
    timing = f" delay={seconds:.3f}s" if seconds is not None else ""
    later = f" retry_in={retry_in:.0f}s" if retry_in is not None else ""
    log.info(
        "%s: to=<%s> account=%s status=%s%s%s reply=%s",
        item.queue_id,
        item.address,
        item.account,
        outcome,
        timing,
        later,
        reply,
        extra={"fields": fields},
    )
