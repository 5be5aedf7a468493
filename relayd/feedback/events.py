"""The events feedback records, and the bounded evidence each carries.

Why bounded: anyone can mail a report, so each stored one must cost a bounded amount of disk. Every event's
evidence is JSON of at most :data:`EVIDENCE_MAX` characters, each string in it at most
:data:`EVIDENCE_FIELD_MAX`; a report that acts on nobody is one event per (kind, source, hour) with a count
(:func:`per_source`), and a report about one recipient copy is keyed by (kind, queue id, index)
(:func:`copy_key`), so a replay is counted on the first event instead of writing another.

Nothing here reads the store or raises on what a report contains: these are pure builders.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from email.parser import BytesHeaderParser
from email.policy import compat32

from relayd.store import Event, SentRecord

log = logging.getLogger(__name__)

__all__ = [
    "EVIDENCE_FIELD_MAX",
    "EVIDENCE_MAX",
    "UNATTRIBUTED_INTERVAL",
    "clip",
    "copy_key",
    "event_about",
    "evidence_json",
    "late_event",
    "message_id",
    "per_source",
    "source_of",
    "unattributed",
]

_CLIP = 500
#: Bounds of an event's evidence (see :func:`evidence_json`): per string, and for the whole JSON text.
EVIDENCE_FIELD_MAX = 1024
EVIDENCE_MAX = 4096
_LIST_ITEMS = 8
#: Event reasons are short words; a report's Feedback-Type is whatever its sender wrote.
_REASON_MAX = 64
#: Unattributed reports from one source within this many seconds are one event with a count.
UNATTRIBUTED_INTERVAL = 3600

_HEADERS = BytesHeaderParser(policy=compat32)


def clip(value: str | None, limit: int = _CLIP) -> str | None:
    """``value`` on one line, cut to ``limit`` characters (``...`` marks a cut)."""
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
    return clip(str(value), limit)


def evidence_json(fields: dict[str, object]) -> str:
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


def message_id(raw: bytes) -> str | None:
    """The report's own Message-ID (clipped), None when it has none or its headers do not parse."""
    try:
        value = _HEADERS.parsebytes(raw[:65536]).get("Message-ID")
    except Exception:
        return None
    return clip(str(value).strip()) if value else None


def event_about(
    now: datetime,
    kind: str,
    record: SentRecord | None,
    reason: str | None,
    evidence: dict[str, object],
    *,
    key: str | None = None,
) -> Event:
    """An event about the recipient copy ``record`` (None: about nobody), its evidence bounded."""
    return Event(
        at=now,
        kind=kind,
        account=record.account if record else None,
        list=record.list if record else None,
        address=record.address if record else None,
        reason=reason[:_REASON_MAX] if reason else reason,
        queue_id=record.queue_id if record else None,
        evidence=evidence_json(evidence),
        key=key,
    )


def copy_key(kind: str, record: SentRecord) -> str:
    """One ``kind`` of outcome per recipient copy: the key that makes a repeated report one event."""
    return f"{kind}:{record.queue_id}-{record.index}"


def source_of(source_ip: str | None, raw: bytes) -> str:
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


def per_source(now: datetime, kind: str, what: str, evidence: dict[str, object], source: str) -> Event:
    """An event about a report that acts on nobody, one per (event kind, kind of report, source, hour): a
    forger mailing a thousand reports gets one row whose ``count`` says how many, and the evidence of the
    first."""
    interval = int(now.timestamp()) // UNATTRIBUTED_INTERVAL
    return Event(
        at=now,
        kind=kind,
        reason=what,
        evidence=evidence_json({**evidence, "source": source}),
        key=f"{kind}:{what}:{source}:{interval}",
    )


def unattributed(now: datetime, what: str, why: str, evidence: dict[str, object], source: str) -> Event:
    """The event of a report tied to nobody (:func:`per_source`)."""
    log.info("unattributed %s report from %s: %s", what, source, why)
    return per_source(now, "unattributed", what, {**evidence, "why": why}, source)


def late_event(now: datetime, what: str, record: SentRecord, evidence: dict[str, object]) -> Event:
    """The event of a report about a copy sent longer ago than ``[inbound] report_max_age``: kept for the
    operator, acting on nobody."""
    log.info(
        "%s: account=%s rcpt=<%s> %s report about a copy sent %s: kept, not acted on",
        record.queue_id,
        record.account,
        record.address,
        what,
        record.sent_at.isoformat(),
    )
    evidence = {**evidence, "sent_at": record.sent_at.isoformat()}
    return event_about(
        now, "late_report", record, what, evidence, key=copy_key(f"late_report:{what}", record)
    )
