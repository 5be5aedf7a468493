"""Account reputation: complaint, hard-bounce and spam-trap figures over a rolling window, and their effects.

Why it exists: mailbox providers judge the *sending IPs and domains*, which all accounts share; one account
whose recipients complain takes everyone's deliverability down with it. So every ESP in ``shared/seeds/``
warns, then suspends, on the same few figures (DESIGN.md "Reasons and scopes"):

* complaint rate = complaints / sent: warn above ``complaint_warn`` (0.1 %), suspend above
  ``complaint_suspend`` (0.2 %; KlickTipp, seeds/003: "1,000 mails, no more than two complaints");
* hard-bounce rate = hard bounces / sent: suspend above ``hard_bounce_suspend`` (5 %; Courrielleur,
  seeds/004);
* spam-trap hits: ``spamtrap_suspend`` hits (default 1) suspend at once, whatever the volume.

Rates are judged only once the window holds ``minimum_sent`` recipients: two complaints on a first test send
of 50 messages say nothing yet. A rate is "crossed" when it is strictly above its threshold, so exactly
0.2 % is still allowed, as the seeds word it.

**The window** is ``[policy.thresholds] window`` (30 days) ending now, but never reaching back before the
account's last reinstatement: an operator who reinstates an account after talking to its owner gives it a
clean slate, otherwise the very next complaint would suspend it again on last month's figures.

**Counting** uses :meth:`Store.count_sent` and :meth:`Store.count_events`, which read hourly roll-ups, so
:func:`evaluate` costs a handful of index lookups however much the account sends; it runs after every
complaint, hard bounce and spam-trap hit. Events counted: ``complaint``, ``hard_bounce`` and
``dropped``/``spamtrap`` (written by the policy pipeline when the message is accepted). A trap hit by a
confirmation mail is ``dropped``/``spamtrap:optin`` and not counted: its address came from whoever filled
in the sender's sign-up form.

**Effects** of :func:`evaluate`: a warning is an event ``reputation_warning`` plus a log line, at most
once per window (the event itself is the "already warned" flag, so it holds across restarts and nodes);
a suspension is ``store.suspend`` (the listeners' :class:`~relayd.policy.rules.suspension.AccountGate` picks
it
up within a second), ``queue.hold_account`` (queued mail is parked, not lost) and an event ``suspended``
carrying the figures. A suspended account is not judged again until it is reinstated.

Failure: store and queue errors propagate (:class:`~relayd.core.errors.StorageError`); callers that already
committed the triggering event log them and go on, since the next event re-evaluates.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Protocol

from relayd.config import Config, ThresholdsConfig
from relayd.core import metrics
from relayd.store import AccountStateStore, Event, EventStore, SentLedger, SuspendReason, as_utc

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_WINDOW", "QueueControl", "Rates", "ReputationStore", "evaluate", "rates"]

DEFAULT_WINDOW = 30 * 86400.0

WARNING_KIND = "reputation_warning"
SUSPENDED_KIND = "suspended"


class QueueControl(Protocol):
    """The two queue operations feedback needs (``relayd.queue.store.QueueStore`` has both)."""

    async def hold_account(self, account: str) -> int: ...

    async def drop_matching(
        self,
        account: str,
        list_name: str | None,
        address: str,
        reason: str,
        *,
        keep_transactional: bool = False,
    ) -> int: ...


class ReputationStore(AccountStateStore, EventStore, SentLedger, Protocol):
    """What judging an account reads and writes: its state, its events and what it sent."""


@dataclass(frozen=True, slots=True)
class Rates:
    """An account's figures over ``[since, until]``; rates are 0.0 while nothing was sent."""

    account: str
    since: datetime
    until: datetime
    sent: int
    complaints: int
    hard_bounces: int
    spamtraps: int

    @property
    def complaint_rate(self) -> float:
        return self.complaints / self.sent if self.sent else 0.0

    @property
    def hard_bounce_rate(self) -> float:
        return self.hard_bounces / self.sent if self.sent else 0.0

    def figures(self) -> dict[str, object]:
        """JSON-ready figures, for events, suspension details and ``relayd account show``."""
        out: dict[str, object] = asdict(self)
        out["since"] = self.since.isoformat()
        out["until"] = self.until.isoformat()
        out["complaint_rate"] = round(self.complaint_rate, 6)
        out["hard_bounce_rate"] = round(self.hard_bounce_rate, 6)
        return out


async def window_start(store: ReputationStore, account: str, now: datetime, window: float) -> datetime:
    """``now - window``, or the last reinstatement when that is later (see the module docstring)."""
    start = as_utc(now) - timedelta(seconds=window)
    state = await store.get_account_state(account)
    if state is not None and not state.suspended and state.since > start:
        return state.since
    return start


async def rates(
    store: ReputationStore, account: str, now: datetime, *, window: float = DEFAULT_WINDOW
) -> Rates:
    """The account's current figures (for ``relayd account show`` and :func:`evaluate`)."""
    now = as_utc(now)
    since = await window_start(store, account, now, window)
    return Rates(
        account=account,
        since=since,
        until=now,
        sent=await store.count_sent(account, since),
        complaints=await store.count_events("complaint", since, account=account),
        hard_bounces=await store.count_events("hard_bounce", since, account=account),
        spamtraps=await store.count_events("dropped", since, account=account, reason="spamtrap"),
    )


def _verdict(r: Rates, t: ThresholdsConfig) -> tuple[SuspendReason, str, float] | None:
    """The first suspension rule the figures break: (reason, figure name, threshold), or None."""
    if t.spamtrap_suspend > 0 and r.spamtraps >= t.spamtrap_suspend:
        return SuspendReason.SPAMTRAP, "spamtraps", float(t.spamtrap_suspend)
    if r.sent < max(t.minimum_sent, 1):
        return None
    if r.complaint_rate > t.complaint_suspend:
        return SuspendReason.COMPLAINT_RATE, "complaint_rate", t.complaint_suspend
    if r.hard_bounce_rate > t.hard_bounce_suspend:
        return SuspendReason.HARD_BOUNCE_RATE, "hard_bounce_rate", t.hard_bounce_suspend
    return None


async def evaluate(
    store: ReputationStore, queue: QueueControl, cfg: Config, account: str, now: datetime
) -> Rates:
    """Judge ``account`` after a complaint, hard bounce or trap hit; warn or suspend when a threshold is
    crossed (see the module docstring for what each does). Returns the figures it judged."""
    t = cfg.policy.thresholds
    now = as_utc(now)
    state = await store.get_account_state(account)
    r = await rates(store, account, now, window=t.window)
    if state is not None and state.suspended:
        return r
    verdict = _verdict(r, t)
    if verdict is not None:
        reason, figure, threshold = verdict
        details = {**r.figures(), "reason": reason.value, "figure": figure, "threshold": threshold}
        text = json.dumps(details, sort_keys=True)
        await store.suspend(account, reason, details=text, at=now)
        held = await queue.hold_account(account)
        suspended = Event(now, SUSPENDED_KIND, account=account, reason=reason.value, evidence=text)
        await store.record_event(suspended)
        metrics.observe_events([suspended])
        log.warning(
            "account %s suspended (%s): sent=%d complaints=%d hard_bounces=%d spamtraps=%d "
            "complaint_rate=%.4f hard_bounce_rate=%.4f threshold=%s; %d queued recipients held",
            account,
            reason.value,
            r.sent,
            r.complaints,
            r.hard_bounces,
            r.spamtraps,
            r.complaint_rate,
            r.hard_bounce_rate,
            threshold,
            held,
        )
        return r
    if r.sent >= max(t.minimum_sent, 1) and r.complaint_rate > t.complaint_warn:
        already = await store.count_events(WARNING_KIND, r.since, account=account, reason="complaint_rate")
        if not already:
            details = {**r.figures(), "figure": "complaint_rate", "threshold": t.complaint_warn}
            await store.record_event(
                Event(
                    now,
                    WARNING_KIND,
                    account=account,
                    reason="complaint_rate",
                    evidence=json.dumps(details, sort_keys=True),
                )
            )
            log.warning(
                "account %s: complaint rate %.4f above the warning threshold %s (sent=%d complaints=%d)",
                account,
                r.complaint_rate,
                t.complaint_warn,
                r.sent,
                r.complaints,
            )
    return r
