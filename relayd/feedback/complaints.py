"""Complaints: an ARF report (RFC 5965, Hotmail JMRP) or a human's forward, turned into an account
suppression.

=====================================  ==============================================================
complaint (ARF abuse, fraud, ...)      event ``complaint`` + account suppression ``complaint`` + queued
                                       mail of the recipient for that account dropped
ARF not-spam, auth-failure, dmarc      event ``feedback`` only
=====================================  ==============================================================

A complaint suppresses the recipient for the account that sent, not globally: the person objected to that
sender. One complaint per recipient counts: feedback loops resend, and one person may report several
copies (later ones are ``complaint_duplicate``). After a complaint the account's reputation is re-judged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from datetime import datetime

from relayd.feedback.attribution import (
    Candidate,
    Miss,
    attribute,
    content_candidates,
    same_address,
    tokens_in,
)
from relayd.feedback.bounces import BounceHandling
from relayd.feedback.events import (
    clip,
    copy_key,
    event_about,
    late_event,
    message_id,
    source_of,
    unattributed,
)
from relayd.reports import arf, dsn
from relayd.reports.dsn import DsnReport
from relayd.store import Event, Reason, Scope, SuppressionEntry, as_utc

log = logging.getLogger(__name__)

__all__ = ["COMPLAINT_TYPES", "ComplaintHandling"]

#: ARF feedback types that are a recipient's complaint (RFC 5965 §7.3); auth-failure (RFC 6591), not-spam
#: and dmarc reports are feedback about authentication or filtering, not about consent.
COMPLAINT_TYPES = frozenset({"abuse", "fraud", "virus", "other", "complaint"})


class ComplaintHandling(BounceHandling):
    """Complaints; a bounce that arrives where complaints do is handed on to :meth:`on_dsn`."""

    async def on_arf(
        self,
        raw: bytes,
        now: datetime,
        *,
        verp_token: str | None = None,
        report: arf.ArfReport | None = None,
        bounce: DsnReport | None = None,
        source_ip: str | None = None,
    ) -> list[Event]:
        """A complaint (RFC 5965 ARF, Hotmail JMRP, or a human's forward) to abuse@/fbl@/postmaster@ or to a
        VERP address: attribute it and suppress the recipient for the account. Returns the events recorded.

        A message to abuse@ that turns out to be a bounce is handed to :meth:`on_dsn`; ``bounce`` is its
        DSN reading when the caller has one (the inbound listener parses each report once, in its parser
        child). ``source_ip``, repeats and late reports: as for :meth:`on_dsn` (one complaint event per
        copy). Raises StorageError.
        """
        now = as_utc(now)
        if report is None:
            report = await asyncio.to_thread(arf.parse, raw)
        if not report.is_arf:
            if bounce is None:
                bounce = await asyncio.to_thread(dsn.classify, raw)
            if bounce.is_dsn:
                return await self.on_dsn(raw, verp_token, now, report=bounce, source_ip=source_ip)

        def candidates() -> Iterator[Candidate]:
            if verp_token:
                yield Candidate("verp", verp_token.lower(), "envelope")
            if report.relayd_id:
                yield Candidate("trace", report.relayd_id.lower(), "original-headers")
            yield from tokens_in(report.original_headers, "original-headers")
            yield from content_candidates(raw)

        miss = Miss()
        how = await attribute(self.store, self.secret, candidates(), miss)
        evidence: dict[str, object] = {
            "report": report.format or "forwarded",
            "message_id": message_id(raw),
            "feedback_type": report.feedback_type,
            "user_agent": clip(report.user_agent),
            "source_ip": report.source_ip,
            "reported_domain": report.reported_domain,
            "arrival_date": clip(report.arrival_date),
            "original_message_id": clip(report.original_message_id),
        }
        if how is None:
            what = "arf" if report.is_arf else "mail"
            events = [unattributed(now, what, miss.why(), evidence, source_of(source_ip, raw))]
            await self._commit(events)
            return events
        record = how.record
        evidence |= {"token": how.purpose, "found_in": how.where}
        if report.original_rcpt and not same_address(report.original_rcpt, record.address):
            evidence["original_rcpt"] = report.original_rcpt  # forwarded mailbox; the token decides
        if self._late(record, now):
            events = [late_event(now, "arf", record, evidence)]
            await self._commit(events)
            return events
        feedback_type = report.feedback_type if report.is_arf else "forwarded"
        if report.is_arf and (feedback_type or "abuse") not in COMPLAINT_TYPES:
            key = copy_key("feedback", record)
            events = [event_about(now, "feedback", record, feedback_type, evidence, key=key)]
            await self._commit(events)
            return events
        key = copy_key("complaint", record)
        again = event_about(now, "complaint", record, feedback_type, evidence, key=key)
        if await self._repeat(again):
            return [again]
        earlier = await self.store.count_events(
            "complaint", record.sent_at, account=record.account, address=record.address
        )
        if earlier:
            # feedback loops resend, and one person may report several copies: one complaint per recipient
            key = copy_key("complaint_duplicate", record)
            events = [event_about(now, "complaint_duplicate", record, feedback_type, evidence, key=key)]
            await self._commit(events)
            return events
        await self.store.add(
            [
                SuppressionEntry(
                    record.address,
                    Scope.ACCOUNT,
                    record.account,
                    None,
                    Reason.COMPLAINT,
                    f"arf:{record.queue_id}-{record.index}",
                    now,
                )
            ]
        )
        dropped = await self.queue.drop_matching(record.account, None, record.address, "complaint")
        log.info(
            "%s: account=%s rcpt=<%s> complaint (%s): suppressed for the account, %d queued dropped",
            record.queue_id,
            record.account,
            record.address,
            feedback_type,
            dropped,
        )
        events = [
            again,
            event_about(
                now,
                "suppressed",
                record,
                Reason.COMPLAINT.value,
                {**evidence, "scope": "account", "dropped": dropped},
            ),
        ]
        await self._commit(events)
        await self._reevaluate(record.account, now)
        return events
