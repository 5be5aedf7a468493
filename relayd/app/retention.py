"""Forget what is older than its keep time: the sent ledger, the event log, the caps' send log and the
opt-in confirmations sent.

Why: both grow with every message and every report, and anyone can mail us reports. The ledger is kept
for ``[inbound] report_max_age``: a report about an older copy acts on nobody anyway, and once its row is
gone every token of that copy (VERP address, trace id, unsubscribe link) verifies for nothing, so tokens
expire without carrying a date. Events are kept for ``[store] keep_events``, but never for less than
``report_max_age``: the keyed outcome events are how a replayed report is recognised, for as long as its
token still attributes. Account rates do not read the pruned rows (hourly roll-ups, which stay). The
caps' send log is needed for the longest cap window (30 days), the confirmations sent for the opt-in
window (24 h): older rows count for nothing, so they go too. The postmaster inbox's items (open or done)
and the DMARC aggregate counts are kept for ``[inbound] keep_inbox``.

Deletes are idempotent, so several processes or nodes pruning the same store do no harm; the daemon runs
it in one process per store. Failure: a store error is logged and the next run tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from relayd.config import Config
from relayd.policy.rules.caps import MONTH
from relayd.policy.rules.consent import OPTIN_WINDOW
from relayd.store.models import StoreError, as_utc, utcnow
from relayd.store.protocols import (
    ConsentStore,
    DmarcStore,
    EventStore,
    InboxStore,
    SendCounterStore,
    SentLedger,
)

log = logging.getLogger(__name__)

__all__ = ["INTERVAL", "Pruned", "prune", "run"]

#: How often :func:`run` prunes. An hour late is nothing against keep times of days.
INTERVAL = 3600.0


class PrunableStore(SentLedger, EventStore, SendCounterStore, ConsentStore, InboxStore, DmarcStore, Protocol):
    """The slices of the store pruning needs."""


@dataclass(frozen=True, slots=True)
class Pruned:
    """How many rows one :func:`prune` removed."""

    sent: int
    events: int
    sends: int = 0
    optin: int = 0
    inbox: int = 0
    dmarc: int = 0


async def prune(store: PrunableStore, cfg: Config, now: datetime | None = None) -> Pruned:
    """Delete ledger rows older than ``report_max_age``, events older than ``keep_events`` (at least
    ``report_max_age``), caps' sends older than the longest cap window and opt-in confirmations older
    than the opt-in window, inbox items and DMARC counts older than ``keep_inbox``. Raises StoreError."""
    now = as_utc(now or utcnow())
    ledger_age = cfg.inbound.report_max_age
    events_age = max(cfg.store.keep_events, ledger_age)
    sent = await store.prune_sent(now - timedelta(seconds=ledger_age))
    events = await store.prune_events(now - timedelta(seconds=events_age))
    sends = await store.prune(now - timedelta(seconds=MONTH))
    optin = await store.prune_optin(now - timedelta(seconds=OPTIN_WINDOW))
    desk_before = now - timedelta(seconds=cfg.inbound.keep_inbox)
    inbox = await store.prune_inbox(desk_before)
    dmarc = await store.prune_dmarc(desk_before.date())
    if sent or events or sends or optin or inbox or dmarc:
        log.info(
            "pruned %d sent-ledger row(s), %d event(s), %d caps send(s), %d opt-in confirmation(s),"
            " %d inbox item(s), %d DMARC count(s)",
            sent,
            events,
            sends,
            optin,
            inbox,
            dmarc,
        )
    return Pruned(sent, events, sends, optin, inbox, dmarc)


async def run(
    store: PrunableStore, config: Callable[[], Config], stop: asyncio.Event, interval: float = INTERVAL
) -> None:
    """Prune now and then every ``interval`` seconds until ``stop`` is set; ``config()`` is read at each
    run, so a reload's new keep times apply from the next one."""
    while not stop.is_set():
        try:
            await prune(store, config())
        except StoreError as exc:
            log.error("pruning the store failed (retried in %.0f s): %s", interval, exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)
