"""What every feedback handler acts through: its dependencies, and the steps all of them share.

Why one base: bounces, complaints, our own delivery failures and mailto unsubscribes all record events the
same way (metrics with them), count a repeated report on its first event instead of acting again, ignore
reports about copies sent too long ago, and re-judge the account's reputation after an effect that counts
against it. :class:`Effects` holds the store, the queue, the token secret and the config once, so no
handler takes them as parameters; :meth:`Effects.reload` swaps the config for all of them.

Failure: store and queue errors raise :class:`~relayd.core.errors.StorageError`; a reputation evaluation
that fails after the events are committed is logged, not raised (see :meth:`Effects._reevaluate`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Protocol

from relayd.config import Config
from relayd.core import metrics
from relayd.core.errors import StorageError
from relayd.feedback import reputation
from relayd.feedback.reputation import QueueControl
from relayd.policy.reloaded import Reloaded
from relayd.store import (
    AccountStateStore,
    Event,
    EventStore,
    SentLedger,
    SentRecord,
    SuppressionStore,
)

log = logging.getLogger(__name__)

__all__ = ["Effects", "FeedbackStore"]


class FeedbackStore(SuppressionStore, AccountStateStore, EventStore, SentLedger, Protocol):
    """The slices of the state store feedback uses: the sent ledger to attribute a report, suppressions and
    events to act on it, account states to suspend an account whose rates cross a threshold."""


class Effects:
    """The dependencies of the feedback handlers, and the steps they share (see the module docstring)."""

    def __init__(self, store: FeedbackStore, queue: QueueControl, secret: bytes, cfg: Config) -> None:
        self.store = store
        self.queue = queue
        #: the key of our tokens (VERP, trace, unsubscribe): the only thing attribution trusts
        self.secret = secret
        self.cfg = cfg

    def reload(self, new: Reloaded) -> None:
        """A new config (SIGHUP): the next report is judged by its limits and thresholds."""
        self.cfg = new.cfg

    def _late(self, record: SentRecord, now: datetime) -> bool:
        """Whether the copy a report is about was sent longer ago than ``[inbound] report_max_age``: a report
        that old proves little (a replayed token, a provider's backlog) and must not act any more."""
        return now - record.sent_at > timedelta(seconds=self.cfg.inbound.report_max_age)

    async def _repeat(self, event: Event) -> bool:
        """Whether ``event``'s key was recorded before; if so, count this report on it (no effects, no
        metrics: the first report had them)."""
        assert event.key is not None
        earlier = await self.store.event_by_key(event.key)
        if earlier is None:
            return False
        await self.store.record_events([event])
        log.info(
            "%s: account=%s rcpt=<%s> %s reported again (%d times): counted once",
            event.queue_id,
            event.account,
            event.address,
            event.kind,
            earlier.count + 1,
        )
        return True

    async def _commit(self, events: Sequence[Event]) -> None:
        if events:
            await self.store.record_events(events)
            metrics.observe_events(events)

    async def _reevaluate(self, account: str, now: datetime) -> None:
        """Reputation after a complaint or hard bounce; its failure must not make the remote resend a report
        whose events are already committed (they would be counted twice)."""
        try:
            await reputation.evaluate(self.store, self.queue, self.cfg, account, now)
        except StorageError as exc:
            log.error("account %s: reputation evaluation failed: %s", account, exc)
