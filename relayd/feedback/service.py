"""What comes back changes what goes out: bounces, complaints and mailto unsubscribes turned into effects.

The inbound listener (and the delivery scheduler, for our own attempts) hands reports here; the pure
parsers (:func:`relayd.reports.dsn.classify`, :func:`relayd.reports.arf.parse`) have already been written to
never raise. :class:`Feedback` does the two things they must not: **attribution** (which message, account,
list and recipient a report is about: :mod:`relayd.feedback.attribution`) and **effects** (suppression,
events, dropping queued mail, reputation). It is built once at start-up with the store, the queue, the
token secret and the config; :meth:`~relayd.feedback.effects.Effects.reload` swaps the config.

Where each kind of report is handled:

* :mod:`relayd.feedback.bounces`: DSNs and our own final delivery failures (the bounce taxonomy);
* :mod:`relayd.feedback.complaints`: ARF reports and forwarded complaints;
* :mod:`relayd.feedback.delivery`: the outcome of each of our delivery attempts;
* here: mailto unsubscribes (:func:`relayd.feedback.unsubscribe.unsubscribe`: event ``unsubscribed`` + list
  suppression, account scope when the message had no list, + queued mail for it dropped) and reports that
  could not be parsed.

Anything not attributed by a verified token (no token, unknown message, bad MAC, recipient mismatch, not a
report at all) is recorded as one event ``unattributed`` with no account or address and nothing else
happens: a forged report can never suppress anyone or hurt an account's rates.

**Replays and age.** A report acts once per recipient copy: each outcome event is keyed by (kind, queue id,
index), and a report whose outcome of that copy is already recorded only adds to that event's ``count``
(so a DSN replayed a hundred times is one hard bounce in the account's rates, and suppresses once). A
report about a copy sent longer ago than ``[inbound] report_max_age`` is an event ``late_report`` and
nothing else. Unattributed reports are one event per (kind, source, hour) with a count, and every event's
evidence is bounded (:mod:`relayd.feedback.events`), so forged reports cost a bounded amount of disk.

Failure: store/queue errors raise :class:`~relayd.core.errors.StorageError` *before* the events are
recorded, so the listener's ``451`` makes the remote MTA retry and the retry does the same idempotent writes
again. A reputation evaluation that fails after the events are committed is logged, not raised.
"""

from __future__ import annotations

import logging
from datetime import datetime

from relayd.feedback.complaints import ComplaintHandling
from relayd.feedback.delivery import DeliveryRecording
from relayd.feedback.events import message_id, per_source, source_of, unattributed
from relayd.feedback.unsubscribe import UnsubscribeSource, unsubscribe
from relayd.store import Event, Reason, as_utc

log = logging.getLogger(__name__)

__all__ = ["Feedback"]


class Feedback(ComplaintHandling, DeliveryRecording):
    """Every report and delivery outcome relayd learns from, acted on (see the module docstring).

    Methods: :meth:`on_dsn` and :meth:`on_delivery_failure` (bounces), :meth:`on_arf` (complaints),
    :meth:`record_delivery` (the scheduler's observer), :meth:`on_unsubscribe_mail`,
    :meth:`on_unclassified`; :meth:`reload` for a new config."""

    async def on_unclassified(
        self, raw: bytes, role: str, why: str, now: datetime, *, source_ip: str | None = None
    ) -> list[Event]:
        """A report that could not be parsed in time (or whose parser died on it): an ``unclassified`` event
        with no account or address, kept for the operator, acting on nobody. Like an unattributed report,
        it must not suppress anyone or count against an account: nothing about it was read. One event per
        (role, source, hour), counted, as for unattributed reports: whoever can make the parser time out
        once can do it a thousand times. Raises StorageError.
        """
        now = as_utc(now)
        log.warning("unclassified %s report (%d bytes): %s", role, len(raw), why)
        evidence: dict[str, object] = {"report": "unclassified", "why": why, "size": len(raw)}
        event = per_source(now, "unclassified", role, evidence, source_of(source_ip, raw))
        await self._commit([event])
        return [event]

    async def on_unsubscribe_mail(
        self, raw: bytes, token: str, now: datetime, *, source_ip: str | None = None
    ) -> list[Event]:
        """Mail to ``unsubscribe+<token>@`` (the List-Unsubscribe mailto, RFC 2369): the token (purpose
        "unsub") alone decides; whoever sends the mail proves nothing and needs to. Bad tokens are
        aggregated per ``source_ip`` (the connecting client) like other unattributed reports.

        The effects are :func:`relayd.feedback.unsubscribe.unsubscribe`'s, shared with the one-click and page
        channels (list suppression, event ``unsubscribed``, queued mail dropped); returned here is that event
        (none when the recipient had already unsubscribed), or the ``unattributed`` event for a bad token.
        Raises StorageError when the suppression cannot be written.
        """
        now = as_utc(now)
        mid = message_id(raw)
        result = await unsubscribe(
            self.store,
            self.queue,
            self.secret,
            token,
            source=UnsubscribeSource.MAILTO,
            now=now,
            evidence={"message_id": mid} if mid else None,
        )
        if result is None:
            source = source_of(source_ip, raw)
            events = [unattributed(now, "unsubscribe", "bad token", {"message_id": mid}, source)]
            await self._commit(events)
            return events
        if result.already:
            return []
        return [
            Event(
                at=now,
                kind="unsubscribed",
                account=result.account,
                list=result.list,
                address=result.address,
                reason=Reason.UNSUBSCRIBE.value,
                queue_id=result.queue_id,
            )
        ]
