"""What comes back changes what goes out: bounces, complaints and mailto unsubscribes turned into effects.

The inbound listener (and the delivery scheduler, for our own synchronous failures) hands reports here; the
pure parsers (:func:`relayd.reports.dsn.classify`, :func:`relayd.reports.arf.parse`) have already been
written to never
raise. This module does the two things they must not: **attribution** (which message, account, list and
recipient a report is about) and **effects** (suppression, events, dropping queued mail, reputation).

Attribution trusts only our own HMAC'd tokens (:mod:`relayd.core.tokens`), never what a report *says*:

1. a token is found: the VERP return path ``bounce+<token>@`` the report was sent to, an ``X-Relayd-ID``
   (purpose "trace") or VERP address in the returned original headers, or, for a human-forwarded
   complaint, any of those or the unsubscribe token anywhere in the forwarded content;
2. its (queue id, index) is looked up in the sent ledger;
3. its MAC is verified against the *ledger's* address for its purpose.

A token passing all three vouches for one (account, list, address). A DSN is then acted on only for the
bounced recipients whose address (or Original-Recipient) *is* that address, so a token replayed into a
forged DSN can at most suppress the address it was minted for. Anything else (no token, unknown message,
bad MAC, recipient mismatch, not a report at all) is recorded as one event ``unattributed`` with no
account or address and nothing else happens: a forged report can never suppress anyone or hurt an
account's rates.

Effects (DESIGN.md "Reasons and scopes"), each recorded as an event whose ``evidence`` is JSON naming the
report (Message-ID, status, diagnostic, remote MTA, which token attributed it):

=====================================  ==============================================================
hard bounce (userunknown, ...; 5xx)    event ``hard_bounce`` + global suppression ``hard_bounce``
soft bounce                            event ``soft_bounce``; the ``soft_bounce_limit``-th within
                                       ``soft_bounce_window`` adds global suppression ``soft_bounce_limit``
other permanent failure (blocked, ...) event ``bounce`` with its reason; suppresses nobody
delayed / delivered / auto-reply       event ``delayed`` / ``delivered`` / ``autoreply`` only
complaint (ARF abuse, fraud, ...)      event ``complaint`` + account suppression ``complaint`` + queued
                                       mail of the recipient for that account dropped
ARF not-spam, auth-failure, dmarc      event ``feedback`` only
mailto unsubscribe                     :func:`relayd.feedback.unsubscribe.unsubscribe`: event ``unsubscribed``
                                       + list suppression (account scope when the message had no list)
                                       + queued mail for it dropped
=====================================  ==============================================================

**Replays and age.** A report acts once per recipient copy: each outcome event is keyed by (kind, queue id,
index), and a report whose outcome of that copy is already recorded only adds to that event's ``count``
(so a DSN replayed a hundred times is one hard bounce in the account's rates, and suppresses once). A
report about a copy sent longer ago than ``[inbound] report_max_age`` is an event ``late_report`` and
nothing else. Unattributed reports are one event per (kind, source, hour) with a count, and every
event's evidence is bounded (:data:`EVIDENCE_FIELD_MAX` per string, :data:`EVIDENCE_MAX` in all), so
forged reports cost a bounded amount of disk.

Every suppression also gets an event ``suppressed``. A soft bounce is a failure that says something about
the mailbox *for now* (mailbox full, quota, expired retries, any 4xx not caused by us); a permanent failure
caused by the sender, the content or the moment (blocked, spamdetected, policyviolation, ...) suppresses
nobody, because suppressing every Gmail address after one blocklisting would be a disaster of our own
making. Those still count against the account through the events.

After a complaint or hard bounce the account's reputation is re-evaluated
(:func:`relayd.feedback.reputation.evaluate`).

Failure: store/queue errors raise :class:`~relayd.core.errors.StorageError` *before* the events are recorded,
so the listener's ``451`` makes the remote MTA retry and the retry does the same idempotent writes again.
A reputation evaluation that fails after the events are committed is logged, not raised.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.parser import BytesHeaderParser
from email.policy import compat32

from relayd.config import Config
from relayd.core import metrics
from relayd.core.address import AddressError, normalize
from relayd.core.errors import StorageError
from relayd.core.tokens import parse_token, verify_token
from relayd.feedback import reputation
from relayd.feedback.reputation import QueueControl
from relayd.feedback.unsubscribe import UnsubscribeSource
from relayd.feedback.unsubscribe import unsubscribe as web_unsubscribe
from relayd.queue.store import QueueStore
from relayd.reports import arf, dsn
from relayd.reports.dsn import BouncedRecipient, DsnReport
from relayd.reports.dsn.message import parse_message
from relayd.store.base import Event, Reason, Scope, SentRecord, Store, SuppressionEntry, as_utc

log = logging.getLogger(__name__)

__all__ = [
    "Attribution",
    "QueueControl",
    "attribute",
    "on_arf",
    "on_delivery_failure",
    "on_dsn",
    "on_unclassified",
    "on_unsubscribe_mail",
    "tokens_in",
]

# -- tokens in report content ------------------------------------------------------------------------------

_TOKEN = rb"[a-z2-7]{16}-[0-9]{1,6}-[a-z2-7]{16}"
#: ``X-Relayd-ID:`` header, also when a human's mail client quoted it (``> X-Relayd-ID: ...``) or folded it.
#: The quote prefix never spans a line break: ``^[>\s]*`` would run over every following blank line from
#: every line start (quadratic in a run of newlines); it finds the same tokens.
_TRACE_RE = re.compile(rb"^[> \t\r\f\v]*X-Relayd-ID:[ \t]*(?:\r?\n[ \t]+)?(" + _TOKEN + rb")", re.I | re.M)
_VERP_RE = re.compile(rb"bounce\+(" + _TOKEN + rb")@", re.I)
#: the unsubscribe link (``/u/<token>``) and mailto (``unsubscribe+<token>@``) in the footer of every mail
_UNSUB_RE = re.compile(rb"(?:unsubscribe\+|/u/)(" + _TOKEN + rb")", re.I)

#: How many distinct tokens one report may make us look up: a report stuffed with tokens (or junk shaped
#: like them) costs at most this many ledger reads.
MAX_CANDIDATES = 8
#: How much decoded content of a forwarded complaint is searched for tokens.
_SCAN_LIMIT = 2_000_000
_CLIP = 500
#: Bounds of an event's evidence (see :func:`_json`): per string, and for the whole JSON text.
EVIDENCE_FIELD_MAX = 1024
EVIDENCE_MAX = 4096
_LIST_ITEMS = 8
#: Event reasons are short words; a report's Feedback-Type is whatever its sender wrote.
_REASON_MAX = 64
#: Unattributed reports from one source within this many seconds are one event with a count.
UNATTRIBUTED_INTERVAL = 3600

_HEADERS = BytesHeaderParser(policy=compat32)

# -- bounce taxonomy (sisimai v5 reasons, DESIGN.md) ---------------------------------------------------------

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
#: ARF feedback types that are a recipient's complaint (RFC 5965 §7.3); auth-failure (RFC 6591), not-spam
#: and dmarc reports are feedback about authentication or filtering, not about consent.
COMPLAINT_TYPES = frozenset({"abuse", "fraud", "virus", "other", "complaint"})


# -- attribution ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Candidate:
    purpose: str  # "verp" | "trace" | "unsub"
    token: str
    where: str  # "envelope" | "original-headers" | "content"


@dataclass(frozen=True, slots=True)
class Attribution:
    """A report tied to one accepted recipient by a verified token."""

    record: SentRecord
    purpose: str
    where: str


@dataclass(slots=True)
class _Miss:
    """Why no candidate attributed the report (for the ``unattributed`` event)."""

    tried: int = 0
    unknown: int = 0
    bad_mac: int = 0
    seen: set[tuple[str, str]] = field(default_factory=set)

    def why(self) -> str:
        if self.bad_mac:
            return "bad token"
        if self.unknown:
            return "unknown message"
        return "no token"


def tokens_in(data: bytes | None, where: str, *, unsub: bool = False) -> list[Candidate]:
    """Our tokens in ``data``: trace headers, then VERP addresses, then (``unsub``) unsubscribe links."""
    if not data:
        return []
    found = [Candidate("trace", m.group(1).decode().lower(), where) for m in _TRACE_RE.finditer(data)]
    found += [Candidate("verp", m.group(1).decode().lower(), where) for m in _VERP_RE.finditer(data)]
    if unsub:
        found += [Candidate("unsub", m.group(1).decode().lower(), where) for m in _UNSUB_RE.finditer(data)]
    return found


async def attribute(
    store: Store, secret: bytes, candidates: Iterable[Candidate], miss: _Miss | None = None
) -> Attribution | None:
    """The first candidate whose token is in the ledger and verifies against the ledger's address."""
    miss = miss if miss is not None else _Miss()
    for cand in candidates:
        if (cand.purpose, cand.token) in miss.seen:
            continue
        if miss.tried >= MAX_CANDIDATES:
            break
        miss.seen.add((cand.purpose, cand.token))
        ref = parse_token(cand.token)
        if ref is None:
            continue
        miss.tried += 1
        record = await store.lookup_sent(ref.queue_id, ref.index)
        if record is None:
            miss.unknown += 1
            continue
        if verify_token(secret, cand.purpose, cand.token, record.address) is None:
            miss.bad_mac += 1
            log.info("report token for %s-%d has a bad MAC (%s)", ref.queue_id, ref.index, cand.where)
            continue
        return Attribution(record, cand.purpose, cand.where)
    return None


def _same_address(a: str | None, b: str) -> bool:
    if not a:
        return False
    return _norm(a) == _norm(b)


def _norm(address: str) -> str:
    try:
        return normalize(address.strip().strip("<>"))
    except AddressError:
        return address.strip().strip("<>").lower()


# -- evidence and events -------------------------------------------------------------------------------------


def _clip(value: str | None, limit: int = _CLIP) -> str | None:
    if value is None:
        return None
    value = " ".join(value[: limit * 4].split())  # cut before splitting: the input may be megabytes
    return value if len(value) <= limit else value[:limit] + "..."


def _bounded(value: object, limit: int) -> object:
    """``value`` with every string in it clipped to ``limit`` characters and lists to a few items."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, list | tuple):
        return [_bounded(v, limit) for v in value[:_LIST_ITEMS]]
    if isinstance(value, dict):
        return {str(k)[:64]: _bounded(v, limit) for k, v in list(value.items())[:_LIST_ITEMS]}
    return _clip(str(value), limit)


def _json(fields: dict[str, object]) -> str:
    """Evidence as JSON of at most ``EVIDENCE_MAX`` characters, whatever a report put in its fields.

    Anyone can mail a report, so each stored one must cost a bounded amount of disk: every string is
    clipped to ``EVIDENCE_FIELD_MAX`` characters, and while the whole is still too long (many fields, or
    text that JSON escapes to six times its length) the clip is halved."""
    present = {k: v for k, v in fields.items() if v is not None}
    limit = EVIDENCE_FIELD_MAX
    while True:
        text = json.dumps({k: _bounded(v, limit) for k, v in present.items()}, sort_keys=True)
        if len(text) <= EVIDENCE_MAX:
            return text
        if limit <= 8:
            return json.dumps({"clipped": len(text)})
        limit //= 2


def _message_id(raw: bytes) -> str | None:
    try:
        value = _HEADERS.parsebytes(raw[:65536]).get("Message-ID")
    except Exception:
        return None
    return _clip(str(value).strip()) if value else None


def _event(
    now: datetime,
    kind: str,
    record: SentRecord | None,
    reason: str | None,
    evidence: dict[str, object],
    *,
    key: str | None = None,
) -> Event:
    return Event(
        at=now,
        kind=kind,
        account=record.account if record else None,
        list=record.list if record else None,
        address=record.address if record else None,
        reason=reason[:_REASON_MAX] if reason else reason,
        queue_id=record.queue_id if record else None,
        evidence=_json(evidence),
        key=key,
    )


def _copy_key(kind: str, record: SentRecord) -> str:
    """One ``kind`` of outcome per recipient copy: the key that makes a repeated report one event."""
    return f"{kind}:{record.queue_id}-{record.index}"


def _source(source_ip: str | None, raw: bytes) -> str:
    """Who sent an unattributed report, for aggregating them: the connecting address when the listener
    gave it, else the domain of the report's From (which its sender chooses, so a weaker grouping)."""
    if source_ip:
        return "ip:" + source_ip[:64]
    try:
        sender = _HEADERS.parsebytes(raw[:65536]).get("From")
    except Exception:
        sender = None
    domain = str(sender or "").rpartition("@")[2].strip().strip(">").lower()
    return "from:" + (" ".join(domain.split())[:255] or "-")


def _per_source(now: datetime, kind: str, what: str, evidence: dict[str, object], source: str) -> Event:
    """An event about a report that acts on nobody, one per (event kind, kind of report, source, hour): a
    forger mailing a thousand reports gets one row whose ``count`` says how many, and the evidence of the
    first."""
    interval = int(now.timestamp()) // UNATTRIBUTED_INTERVAL
    return Event(
        at=now,
        kind=kind,
        reason=what,
        evidence=_json({**evidence, "source": source}),
        key=f"{kind}:{what}:{source}:{interval}",
    )


def _unattributed(now: datetime, what: str, why: str, evidence: dict[str, object], source: str) -> Event:
    """The event of a report tied to nobody (:func:`_per_source`)."""
    log.info("unattributed %s report from %s: %s", what, source, why)
    return _per_source(now, "unattributed", what, {**evidence, "why": why}, source)


def _late(cfg: Config, record: SentRecord, now: datetime) -> bool:
    """Whether the copy a report is about was sent longer ago than ``[inbound] report_max_age``: a report
    that old proves little (a replayed token, a provider's backlog) and must not act any more."""
    return now - record.sent_at > timedelta(seconds=cfg.inbound.report_max_age)


def _late_event(now: datetime, what: str, record: SentRecord, evidence: dict[str, object]) -> Event:
    log.info(
        "%s: account=%s rcpt=<%s> %s report about a copy sent %s: kept, not acted on",
        record.queue_id,
        record.account,
        record.address,
        what,
        record.sent_at.isoformat(),
    )
    evidence = {**evidence, "sent_at": record.sent_at.isoformat()}
    return _event(now, "late_report", record, what, evidence, key=_copy_key(f"late_report:{what}", record))


async def _repeat(store: Store, event: Event) -> bool:
    """Whether ``event``'s key was recorded before; if so, count this report on it (no effects, no
    metrics: the first report had them)."""
    assert event.key is not None
    earlier = await store.event_by_key(event.key)
    if earlier is None:
        return False
    await store.record_events([event])
    log.info(
        "%s: account=%s rcpt=<%s> %s reported again (%d times): counted once",
        event.queue_id,
        event.account,
        event.address,
        event.kind,
        earlier.count + 1,
    )
    return True


async def _commit(store: Store, events: Sequence[Event]) -> None:
    if events:
        await store.record_events(events)
        metrics.observe_events(events)


async def _reevaluate(store: Store, queue: QueueControl, cfg: Config, account: str, now: datetime) -> None:
    """Reputation after a complaint or hard bounce; its failure must not make the remote resend a report
    whose events are already committed (they would be counted twice)."""
    try:
        await reputation.evaluate(store, queue, cfg, account, now)
    except StorageError as exc:
        log.error("account %s: reputation evaluation failed: %s", account, exc)


# -- bounces ------------------------------------------------------------------------------------------------


def _permanent(status: str | None, reply_code: str | None) -> bool:
    if status:
        return status.strip().startswith("5")
    return bool(reply_code) and str(reply_code).strip().startswith("5")


def _bounce_kind(action: str, reason: str, *, hard: bool, permanent: bool) -> str:
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


async def _bounce_effects(
    store: Store,
    cfg: Config,
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
    kind = _bounce_kind(action, reason, hard=hard, permanent=permanent)
    key = _copy_key(kind, record)
    if kind in ("delayed", "delivered", "autoreply"):
        return [_event(now, kind, record, reason, evidence, key=key)]
    if kind == "hard_bounce":
        events = [_event(now, kind, record, reason, evidence, key=key)]
        events += await _suppress_global(store, record, Reason.HARD_BOUNCE, source, evidence, now)
        log.info(
            "%s: account=%s rcpt=<%s> hard bounce (%s)", record.queue_id, record.account, address, reason
        )
        return events
    if kind == "soft_bounce":
        window = timedelta(seconds=cfg.policy.soft_bounce_window)
        earlier = await store.count_events("soft_bounce", now - window, address=address)
        count = earlier + 1
        events = [_event(now, kind, record, reason, {**evidence, "soft_bounces": count}, key=key)]
        log.info(
            "%s: account=%s rcpt=<%s> soft bounce %d/%d (%s)",
            record.queue_id,
            record.account,
            address,
            count,
            cfg.policy.soft_bounce_limit,
            reason,
        )
        if count >= cfg.policy.soft_bounce_limit:
            events += await _suppress_global(
                store, record, Reason.SOFT_BOUNCE_LIMIT, source, {**evidence, "soft_bounces": count}, now
            )
        return events
    log.info(
        "%s: account=%s rcpt=<%s> bounced (%s), not suppressed",
        record.queue_id,
        record.account,
        address,
        reason,
    )
    return [_event(now, kind, record, reason, evidence, key=key)]


async def _suppress_global(
    store: Store,
    record: SentRecord,
    reason: Reason,
    source: str,
    evidence: dict[str, object],
    now: datetime,
) -> list[Event]:
    """Global suppression, unless a global entry already blocks the address (keep the first reason: a
    manual or hard-bounce entry must not be overwritten by a later, weaker one)."""
    existing = await store.check([record.address], record.account, None, now)
    entry = existing.get(record.address)
    if entry is not None and entry.scope is Scope.GLOBAL:
        return []
    await store.add([SuppressionEntry(record.address, Scope.GLOBAL, None, None, reason, source, now)])
    log.info("%s: rcpt=<%s> suppressed globally (%s)", record.queue_id, record.address, reason.value)
    return [_event(now, "suppressed", record, reason.value, {**evidence, "scope": "global"})]


def _dsn_evidence(
    report: DsnReport, rcpt: BouncedRecipient | None, how: Attribution | None
) -> dict[str, object]:
    out: dict[str, object] = {
        "report": "dsn",
        "message_id": _clip(report.message_id),
        "original_message_id": _clip(report.original_message_id),
        "reporting_mta": _clip(report.reporting_mta),
    }
    if rcpt is not None:
        out |= {
            "action": rcpt.action,
            "status": rcpt.status,
            "reply_code": rcpt.reply_code,
            "diagnostic": _clip(rcpt.diagnostic),
            "remote_mta": _clip(rcpt.remote_mta),
            "parser": rcpt.source,
        }
    if how is not None:
        out |= {"token": how.purpose, "found_in": how.where}
    return out


def _dsn_candidates(report: DsnReport, raw: bytes, verp_token: str | None) -> Iterator[Candidate]:
    """Envelope VERP token first; then tokens in the returned original (some MTAs bounce to the From,
    not to the return path); then, for bounces that paste the original into text, the whole message."""
    if verp_token:
        yield Candidate("verp", verp_token.lower(), "envelope")
    yield from tokens_in(report.original_headers, "original-headers")
    yield from tokens_in(raw[:_SCAN_LIMIT], "content")


async def on_dsn(
    store: Store,
    queue: QueueControl,
    secret: bytes,
    cfg: Config,
    raw: bytes,
    verp_token: str | None,
    now: datetime,
    *,
    report: DsnReport | None = None,
    source_ip: str | None = None,
) -> list[Event]:
    """Classify a delivery report, attribute it, apply its effects; return the events recorded.

    ``verp_token`` is the token of the ``bounce+<token>@`` envelope recipient, None when the report came to
    another address. ``report`` may be passed when the caller has already classified ``raw``.
    ``source_ip`` is the connecting client's address: unattributed reports are aggregated per source.

    One outcome per recipient copy: a report whose outcome (hard bounce, soft bounce ...) of that copy is
    already recorded is counted on that event and acts no more (a replayed DSN must not suspend anyone);
    a report about a copy sent longer ago than ``[inbound] report_max_age`` is an event ``late_report``.
    Raises StorageError (nothing recorded; answer 451).
    """
    now = as_utc(now)
    if report is None:
        report = await asyncio.to_thread(dsn.classify, raw)
    miss = _Miss()
    how = await attribute(store, secret, _dsn_candidates(report, raw, verp_token), miss)
    if not report.is_dsn:
        if how is None:
            source = _source(source_ip, raw)
            events = [_unattributed(now, "mail", miss.why(), {"message_id": _message_id(raw)}, source)]
        else:
            # an auto-reply or a provider notice sent to our return path: noted, never acted on
            key = _copy_key("autoreply", how.record)
            events = [_event(now, "autoreply", how.record, None, _dsn_evidence(report, None, how), key=key)]
        await _commit(store, events)
        return events
    claimed = [r.address for r in report.recipients][:5]
    if how is None:
        evidence = {**_dsn_evidence(report, None, None), "claimed": claimed}
        events = [_unattributed(now, "dsn", miss.why(), evidence, _source(source_ip, raw))]
        await _commit(store, events)
        return events
    record = how.record
    matching = [
        r
        for r in report.recipients
        if _same_address(r.address, record.address) or _same_address(r.original_recipient, record.address)
    ]
    if not matching:
        # a valid token, but the report is about somebody else: a replayed token, or forwarding we cannot
        # prove; acting on it would let one token suppress any address
        why = "recipient mismatch"
        evidence = {**_dsn_evidence(report, None, how), "claimed": claimed}
        events = [_unattributed(now, "dsn", why, evidence, _source(source_ip, raw))]
        await _commit(store, events)
        return events
    rcpt = matching[0]  # one recipient per VERP address; a report repeating it must not count twice
    if _late(cfg, record, now):
        events = [_late_event(now, "dsn", record, _dsn_evidence(report, rcpt, how))]
        await _commit(store, events)
        return events
    permanent = _permanent(rcpt.status, rcpt.reply_code)
    kind = _bounce_kind(rcpt.action, rcpt.reason, hard=rcpt.hard, permanent=permanent)
    again = _event(
        now, kind, record, rcpt.reason, _dsn_evidence(report, rcpt, how), key=_copy_key(kind, record)
    )
    if await _repeat(store, again):
        return [again]
    events = await _bounce_effects(
        store,
        cfg,
        record,
        action=rcpt.action,
        reason=rcpt.reason,
        hard=rcpt.hard,
        permanent=permanent,
        source=f"dsn:{record.queue_id}-{record.index}",
        evidence=_dsn_evidence(report, rcpt, how),
        now=now,
    )
    await _commit(store, events)
    if any(e.kind == "hard_bounce" for e in events):
        await _reevaluate(store, queue, cfg, record.account, now)
    return events


async def on_delivery_failure(
    store: Store,
    queue: QueueControl,
    cfg: Config,
    *,
    queue_id: str,
    index: int,
    account: str,
    list_name: str | None,
    address: str,
    code: int,
    enhanced: str | None,
    text: str,
    command: str | None,
    now: datetime,
) -> list[Event]:
    """Our own delivery attempt failed for good (a 5xx at RCPT/DATA, or retries expired): the same effects
    as a DSN, already attributed. Call it once per final failure, not per 4xx retry, or every deferral
    would count as a soft bounce. Raises StorageError (the caller logs it; the failure is final anyway)."""
    now = as_utc(now)
    reason, hard = dsn.classify_reply(code, enhanced, text, command)
    record = SentRecord(queue_id, index, account, list_name, address, now)
    evidence: dict[str, object] = {
        "report": "smtp",
        "reply_code": str(code),
        "status": enhanced,
        "diagnostic": _clip(f"{code} {enhanced or ''} {text}".replace("  ", " ")),
        "command": command,
    }
    events = await _bounce_effects(
        store,
        cfg,
        record,
        action="failed",
        reason=reason,
        hard=hard,
        permanent=code >= 500,
        source=f"smtp:{queue_id}-{index}",
        evidence=evidence,
        now=now,
    )
    await _commit(store, events)
    if any(e.kind == "hard_bounce" for e in events):
        await _reevaluate(store, queue, cfg, account, now)
    return events


# -- complaints ---------------------------------------------------------------------------------------------


def _content_candidates(raw: bytes) -> Iterator[Candidate]:
    """Tokens anywhere in a forwarded message: every part decoded (base64, quoted-printable), because a
    human's mail client re-encodes what it forwards."""
    yield from tokens_in(raw[:_SCAN_LIMIT], "content", unsub=True)
    msg = parse_message(raw)
    if msg is None:
        return
    budget = _SCAN_LIMIT
    for n, part in enumerate(msg.walk()):
        if n > 200 or budget <= 0:
            return
        if part.is_multipart():
            continue
        try:
            payload = part.get_payload(decode=True)
        except Exception:
            continue
        if isinstance(payload, bytes) and payload:
            chunk = payload[:budget]
            budget -= len(chunk)
            yield from tokens_in(chunk, "content", unsub=True)


async def on_arf(
    store: Store,
    queue: QueueControl,
    secret: bytes,
    cfg: Config,
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

    A message to abuse@ that turns out to be a bounce is handed to :func:`on_dsn`; ``bounce`` is its DSN
    reading when the caller has one (the inbound listener parses each report once, in its parser child).
    ``source_ip``, repeats and late reports: as for :func:`on_dsn` (one complaint event per copy).
    Raises StorageError.
    """
    now = as_utc(now)
    if report is None:
        report = await asyncio.to_thread(arf.parse, raw)
    if not report.is_arf:
        if bounce is None:
            bounce = await asyncio.to_thread(dsn.classify, raw)
        if bounce.is_dsn:
            return await on_dsn(
                store, queue, secret, cfg, raw, verp_token, now, report=bounce, source_ip=source_ip
            )

    def candidates() -> Iterator[Candidate]:
        if verp_token:
            yield Candidate("verp", verp_token.lower(), "envelope")
        if report.relayd_id:
            yield Candidate("trace", report.relayd_id.lower(), "original-headers")
        yield from tokens_in(report.original_headers, "original-headers")
        yield from _content_candidates(raw)

    miss = _Miss()
    how = await attribute(store, secret, candidates(), miss)
    evidence: dict[str, object] = {
        "report": report.format or "forwarded",
        "message_id": _message_id(raw),
        "feedback_type": report.feedback_type,
        "user_agent": _clip(report.user_agent),
        "source_ip": report.source_ip,
        "reported_domain": report.reported_domain,
        "arrival_date": _clip(report.arrival_date),
        "original_message_id": _clip(report.original_message_id),
    }
    if how is None:
        what = "arf" if report.is_arf else "mail"
        events = [_unattributed(now, what, miss.why(), evidence, _source(source_ip, raw))]
        await _commit(store, events)
        return events
    record = how.record
    evidence |= {"token": how.purpose, "found_in": how.where}
    if report.original_rcpt and not _same_address(report.original_rcpt, record.address):
        evidence["original_rcpt"] = report.original_rcpt  # forwarded mailbox; the token decides
    if _late(cfg, record, now):
        events = [_late_event(now, "arf", record, evidence)]
        await _commit(store, events)
        return events
    feedback_type = report.feedback_type if report.is_arf else "forwarded"
    if report.is_arf and (feedback_type or "abuse") not in COMPLAINT_TYPES:
        events = [_event(now, "feedback", record, feedback_type, evidence, key=_copy_key("feedback", record))]
        await _commit(store, events)
        return events
    again = _event(now, "complaint", record, feedback_type, evidence, key=_copy_key("complaint", record))
    if await _repeat(store, again):
        return [again]
    earlier = await store.count_events(
        "complaint", record.sent_at, account=record.account, address=record.address
    )
    if earlier:
        # feedback loops resend, and one person may report several copies: one complaint per recipient
        key = _copy_key("complaint_duplicate", record)
        events = [_event(now, "complaint_duplicate", record, feedback_type, evidence, key=key)]
        await _commit(store, events)
        return events
    await store.add(
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
    dropped = await queue.drop_matching(record.account, None, record.address, "complaint")
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
        _event(
            now,
            "suppressed",
            record,
            Reason.COMPLAINT.value,
            {**evidence, "scope": "account", "dropped": dropped},
        ),
    ]
    await _commit(store, events)
    await _reevaluate(store, queue, cfg, record.account, now)
    return events


async def on_unclassified(
    store: Store, raw: bytes, role: str, why: str, now: datetime, *, source_ip: str | None = None
) -> list[Event]:
    """A report that could not be parsed in time (or whose parser died on it): an ``unclassified`` event
    with no account or address, kept for the operator, acting on nobody. Like an unattributed report, it
    must not suppress anyone or count against an account: nothing about it was read. One event per (role,
    source, hour), counted, as for unattributed reports: whoever can make the parser time out once can do
    it a thousand times. Raises StorageError.
    """
    now = as_utc(now)
    log.warning("unclassified %s report (%d bytes): %s", role, len(raw), why)
    evidence: dict[str, object] = {"report": "unclassified", "why": why, "size": len(raw)}
    event = _per_source(now, "unclassified", role, evidence, _source(source_ip, raw))
    await _commit(store, [event])
    return [event]


# -- unsubscribes -------------------------------------------------------------------------------------------


async def on_unsubscribe_mail(
    store: Store,
    queue: QueueStore | None,
    secret: bytes,
    cfg: Config,
    raw: bytes,
    token: str,
    now: datetime,
    *,
    source_ip: str | None = None,
) -> list[Event]:
    """Mail to ``unsubscribe+<token>@`` (the List-Unsubscribe mailto, RFC 2369): the token (purpose "unsub")
    alone decides; whoever sends the mail proves nothing and needs to. Bad tokens are aggregated per
    ``source_ip`` (the connecting client) like other unattributed reports.

    The effects are :func:`relayd.feedback.unsubscribe.unsubscribe`'s, shared with the one-click and page
    channels (list suppression, event ``unsubscribed``, queued mail dropped); returned here is that event
    (none when the recipient had already unsubscribed), or the ``unattributed`` event for a bad token.
    Raises StorageError when the suppression cannot be written.
    """
    now = as_utc(now)
    message_id = _message_id(raw)
    result = await web_unsubscribe(
        store,
        queue,
        secret,
        token,
        source=UnsubscribeSource.MAILTO,
        now=now,
        evidence={"message_id": message_id} if message_id else None,
    )
    if result is None:
        source = _source(source_ip, raw)
        events = [_unattributed(now, "unsubscribe", "bad token", {"message_id": message_id}, source)]
        await _commit(store, events)
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
