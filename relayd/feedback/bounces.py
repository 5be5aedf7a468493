"""Bounces: a delivery report (RFC 3464 DSN, or what an MTA wrote instead) or our own final delivery failure,
turned into events and suppressions.

The taxonomy is sisimai v5's reasons (DESIGN.md "Reasons and scopes"):

=====================================  ==============================================================
hard bounce (userunknown, ...; 5xx)    event ``hard_bounce`` + global suppression ``hard_bounce``
soft bounce                            event ``soft_bounce``; the ``soft_bounce_limit``-th within
                                       ``soft_bounce_window`` adds global suppression ``soft_bounce_limit``
other permanent failure (blocked, ...) event ``bounce`` with its reason; suppresses nobody
delayed / delivered / auto-reply       event ``delayed`` / ``delivered`` / ``autoreply`` only
=====================================  ==============================================================

A soft bounce is a failure that says something about the mailbox *for now* (mailbox full, quota, expired
retries, any 4xx not caused by us); a permanent failure caused by the sender, the content or the moment
(blocked, spamdetected, policyviolation, ...) suppresses nobody, because suppressing every Gmail address
after one blocklisting would be a disaster of our own making. Those still count against the account through
the events. Every suppression also gets an event ``suppressed``; a hard bounce re-judges the account's
reputation.

A DSN is acted on only for the bounced recipients whose address (or Original-Recipient) *is* the address
its token was minted for (:mod:`relayd.feedback.attribution`), so a token replayed into a forged DSN can at
most suppress the address it was minted for.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta

from relayd.feedback.attribution import Attribution, Miss, attribute, dsn_candidates, same_address
from relayd.feedback.effects import Effects
from relayd.feedback.events import (
    clip,
    copy_key,
    event_about,
    late_event,
    message_id,
    source_of,
    unattributed,
)
from relayd.reports import dsn
from relayd.reports.dsn import BouncedRecipient, DsnReport
from relayd.store import Event, Reason, Scope, SentRecord, SuppressionEntry, as_utc

log = logging.getLogger(__name__)

__all__ = ["MAILBOX_SOFT", "SENDER_SIDE", "BounceHandling", "bounce_kind"]

#: Failures caused by the sender, the content or the moment: never a reason to stop mailing the address.
SENDER_SIDE = frozenset(
    {
        "blocked",
        "badreputation",
        "requireptr",
        "authfailure",
        "spamdetected",
        "virusdetected",
        "policyviolation",
        "rejected",
        "filtered",
        "toomanyconn",
        "speeding",
        "securityerror",
        "failedstarttls",
        "contenterror",
        "notcompliantrfc",
        "syntaxerror",
        "norelaying",
        "mesgtoobig",
        "feedback",
        "suppressed",
        "onhold",
    }
)
#: The mailbox is unusable for now, whatever the reply class: the classic soft bounce (KlickTipp,
#: seeds/003: "when the recipient's mailbox is full"), even when the remote says 552 5.2.2.
MAILBOX_SOFT = frozenset({"mailboxfull", "suspend", "systemfull", "exceedlimit", "expired"})
_DELIVERED_ACTIONS = frozenset({"delivered", "relayed", "expanded"})


def _permanent(status: str | None, reply_code: str | None) -> bool:
    if status:
        return status.strip().startswith("5")
    return bool(reply_code) and str(reply_code).strip().startswith("5")


def bounce_kind(action: str, reason: str, *, hard: bool, permanent: bool) -> str:
    """The event kind of one recipient's bounce outcome (the table in the module docstring)."""
    action = (action or "failed").lower()
    if action == "delayed":
        return "delayed"
    if action in _DELIVERED_ACTIONS or reason == "delivered":
        return "delivered"
    if reason == "vacation":
        return "autoreply"
    if hard:
        return "hard_bounce"
    if reason in MAILBOX_SOFT or (not permanent and reason not in SENDER_SIDE):
        return "soft_bounce"
    return "bounce"


def _dsn_evidence(
    report: DsnReport, rcpt: BouncedRecipient | None, how: Attribution | None
) -> dict[str, object]:
    out: dict[str, object] = {
        "report": "dsn",
        "message_id": clip(report.message_id),
        "original_message_id": clip(report.original_message_id),
        "reporting_mta": clip(report.reporting_mta),
    }
    if rcpt is not None:
        out |= {
            "action": rcpt.action,
            "status": rcpt.status,
            "reply_code": rcpt.reply_code,
            "diagnostic": clip(rcpt.diagnostic),
            "remote_mta": clip(rcpt.remote_mta),
            "parser": rcpt.source,
        }
    if how is not None:
        out |= {"token": how.purpose, "found_in": how.where}
    return out


class BounceHandling(Effects):
    """Delivery reports and our own final delivery failures (see the module docstring)."""

    async def on_dsn(
        self,
        raw: bytes,
        verp_token: str | None,
        now: datetime,
        *,
        report: DsnReport | None = None,
        source_ip: str | None = None,
    ) -> list[Event]:
        """Classify a delivery report, attribute it, apply its effects; return the events recorded.

        ``verp_token`` is the token of the ``bounce+<token>@`` envelope recipient, None when the report came
        to another address. ``report`` may be passed when the caller has already classified ``raw``.
        ``source_ip`` is the connecting client's address: unattributed reports are aggregated per source.

        One outcome per recipient copy: a report whose outcome (hard bounce, soft bounce ...) of that copy
        is already recorded is counted on that event and acts no more (a replayed DSN must not suspend
        anyone); a report about a copy sent longer ago than ``[inbound] report_max_age`` is an event
        ``late_report``. Raises StorageError (nothing recorded; answer 451).
        """
        now = as_utc(now)
        if report is None:
            report = await asyncio.to_thread(dsn.classify, raw)
        miss = Miss()
        how = await attribute(self.store, self.secret, dsn_candidates(report, raw, verp_token), miss)
        if not report.is_dsn:
            if how is None:
                source = source_of(source_ip, raw)
                events = [unattributed(now, "mail", miss.why(), {"message_id": message_id(raw)}, source)]
            else:
                # an auto-reply or a provider notice sent to our return path: noted, never acted on
                key = copy_key("autoreply", how.record)
                evidence = _dsn_evidence(report, None, how)
                events = [event_about(now, "autoreply", how.record, None, evidence, key=key)]
            await self._commit(events)
            return events
        claimed = [r.address for r in report.recipients][:5]
        if how is None:
            evidence = {**_dsn_evidence(report, None, None), "claimed": claimed}
            events = [unattributed(now, "dsn", miss.why(), evidence, source_of(source_ip, raw))]
            await self._commit(events)
            return events
        record = how.record
        matching = [
            r
            for r in report.recipients
            if same_address(r.address, record.address) or same_address(r.original_recipient, record.address)
        ]
        if not matching:
            # a valid token, but the report is about somebody else: a replayed token, or forwarding we
            # cannot prove; acting on it would let one token suppress any address
            why = "recipient mismatch"
            evidence = {**_dsn_evidence(report, None, how), "claimed": claimed}
            events = [unattributed(now, "dsn", why, evidence, source_of(source_ip, raw))]
            await self._commit(events)
            return events
        rcpt = matching[0]  # one recipient per VERP address; a report repeating it must not count twice
        if self._late(record, now):
            events = [late_event(now, "dsn", record, _dsn_evidence(report, rcpt, how))]
            await self._commit(events)
            return events
        permanent = _permanent(rcpt.status, rcpt.reply_code)
        kind = bounce_kind(rcpt.action, rcpt.reason, hard=rcpt.hard, permanent=permanent)
        again = event_about(
            now, kind, record, rcpt.reason, _dsn_evidence(report, rcpt, how), key=copy_key(kind, record)
        )
        if await self._repeat(again):
            return [again]
        events = await self._bounce_effects(
            record,
            action=rcpt.action,
            reason=rcpt.reason,
            hard=rcpt.hard,
            permanent=permanent,
            source=f"dsn:{record.queue_id}-{record.index}",
            evidence=_dsn_evidence(report, rcpt, how),
            now=now,
        )
        await self._commit(events)
        if any(e.kind == "hard_bounce" for e in events):
            await self._reevaluate(record.account, now)
        return events

    async def on_delivery_failure(
        self,
        record: SentRecord,
        *,
        code: int,
        enhanced: str | None,
        text: str,
        command: str | None,
        now: datetime,
    ) -> list[Event]:
        """Our own delivery attempt of the copy ``record`` failed for good (a 5xx at RCPT/DATA, or retries
        expired) with the reply ``code``, ``enhanced`` status, ``text`` to ``command``: the same effects as
        a DSN, already attributed (``record.sent_at`` is not read). Call it once per final failure, not per
        4xx retry, or every deferral would count as a soft bounce. Raises StorageError (the caller logs it;
        the failure is final anyway)."""
        now = as_utc(now)
        reason, hard = dsn.classify_reply(code, enhanced, text, command)
        evidence: dict[str, object] = {
            "report": "smtp",
            "reply_code": str(code),
            "status": enhanced,
            "diagnostic": clip(f"{code} {enhanced or ''} {text}".replace("  ", " ")),
            "command": command,
        }
        events = await self._bounce_effects(
            record,
            action="failed",
            reason=reason,
            hard=hard,
            permanent=code >= 500,
            source=f"smtp:{record.queue_id}-{record.index}",
            evidence=evidence,
            now=now,
        )
        await self._commit(events)
        if any(e.kind == "hard_bounce" for e in events):
            await self._reevaluate(record.account, now)
        return events

    async def _bounce_effects(
        self,
        record: SentRecord,
        *,
        action: str,
        reason: str,
        hard: bool,
        permanent: bool,
        source: str,
        evidence: dict[str, object],
        now: datetime,
    ) -> list[Event]:
        """Suppress as the bounce warrants (durably, before returning) and return the events to record.

        The outcome event is keyed by (kind, queue id, index): recorded again, it counts once."""
        address = record.address
        kind = bounce_kind(action, reason, hard=hard, permanent=permanent)
        key = copy_key(kind, record)
        if kind in ("delayed", "delivered", "autoreply"):
            return [event_about(now, kind, record, reason, evidence, key=key)]
        if kind == "hard_bounce":
            events = [event_about(now, kind, record, reason, evidence, key=key)]
            events += await self._suppress_global(record, Reason.HARD_BOUNCE, source, evidence, now)
            log.info(
                "%s: account=%s rcpt=<%s> hard bounce (%s)", record.queue_id, record.account, address, reason
            )
            return events
        if kind == "soft_bounce":
            policy = self.cfg.policy
            window = timedelta(seconds=policy.soft_bounce_window)
            earlier = await self.store.count_events("soft_bounce", now - window, address=address)
            count = earlier + 1
            events = [event_about(now, kind, record, reason, {**evidence, "soft_bounces": count}, key=key)]
            log.info(
                "%s: account=%s rcpt=<%s> soft bounce %d/%d (%s)",
                record.queue_id,
                record.account,
                address,
                count,
                policy.soft_bounce_limit,
                reason,
            )
            if count >= policy.soft_bounce_limit:
                events += await self._suppress_global(
                    record, Reason.SOFT_BOUNCE_LIMIT, source, {**evidence, "soft_bounces": count}, now
                )
            return events
        log.info(
            "%s: account=%s rcpt=<%s> bounced (%s), not suppressed",
            record.queue_id,
            record.account,
            address,
            reason,
        )
        return [event_about(now, kind, record, reason, evidence, key=key)]

    async def _suppress_global(
        self,
        record: SentRecord,
        reason: Reason,
        source: str,
        evidence: dict[str, object],
        now: datetime,
    ) -> list[Event]:
        """Global suppression, unless a global entry already blocks the address (keep the first reason: a
        manual or hard-bounce entry must not be overwritten by a later, weaker one)."""
        existing = await self.store.check([record.address], record.account, None, now)
        entry = existing.get(record.address)
        if entry is not None and entry.scope is Scope.GLOBAL:
            return []
        await self.store.add(
            [SuppressionEntry(record.address, Scope.GLOBAL, None, None, reason, source, now)]
        )
        log.info("%s: rcpt=<%s> suppressed globally (%s)", record.queue_id, record.address, reason.value)
        return [event_about(now, "suppressed", record, reason.value, {**evidence, "scope": "global"})]
