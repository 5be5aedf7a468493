"""``relayd store export|import``: move the whole policy state between backends (SQLite -> PostgreSQL).

The format is JSON Lines, one record a line with a ``type`` (suppression, account_state, event, sent,
consent, api_key): plain text an operator can inspect, compress or split, streamed in batches so millions of
suppressions never sit in memory at once. Only the backend-neutral Store protocol is used, so any backend
exports to any other. Send-cap counters are not moved (they are rolling windows of at most 30 days and
rebuild themselves); webhook cursors are not moved (event ids are backend-local): endpoints restart at the
first event recorded after the import. API keys move as their hashes (the keys themselves are nowhere
to be had), so the tenants' keys go on working on the new backend; a key already there is skipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TextIO

from relayd.store.models import (
    ApiKey,
    ConsentRecord,
    Event,
    Reason,
    Scope,
    SentRecord,
    SuppressionEntry,
    SuspendReason,
)
from relayd.store.protocols import Store

_BATCH = 10_000


@dataclass
class TransferCounts:
    counts: dict[str, int] = field(default_factory=dict)
    errors: list[tuple[int, str]] = field(default_factory=list)

    def add(self, kind: str, n: int = 1) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + n


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _dt(value: Any) -> datetime:
    return datetime.fromisoformat(str(value))


async def export_store(store: Store, out: TextIO) -> TransferCounts:
    result = TransferCounts()

    def emit(kind: str, record: dict[str, Any]) -> None:
        out.write(json.dumps({"type": kind, **record}, separators=(",", ":")) + "\n")
        result.add(kind)

    async for batch in store.scan(batch_size=_BATCH):
        for e in batch:
            emit("suppression", e.as_json())
    for st in await store.list_account_states():
        emit(
            "account_state",
            {
                "account": st.account,
                "suspended": st.suspended,
                "reason": str(st.reason) if st.reason else None,
                "details": st.details,
                "since": _iso(st.since),
            },
        )
    after = 0
    while True:
        events = await store.events_after(after, None, _BATCH)
        if not events:
            break
        for event_id, ev in events:
            emit(
                "event",
                {
                    "at": _iso(ev.at),
                    "kind": ev.kind,
                    "account": ev.account,
                    "list": ev.list,
                    "address": ev.address,
                    "reason": ev.reason,
                    "queue_id": ev.queue_id,
                    "evidence": ev.evidence,
                    "key": ev.key,
                    "count": ev.count,
                    "last_seen": _iso(ev.last_seen),
                },
            )
            after = event_id
    async for sent in store.scan_sent(batch_size=_BATCH):
        for r in sent:
            emit(
                "sent",
                {
                    "queue_id": r.queue_id,
                    "index": r.index,
                    "account": r.account,
                    "list": r.list,
                    "address": r.address,
                    "sent_at": _iso(r.sent_at),
                },
            )
    async for consents in store.consents(batch_size=_BATCH):
        for c in consents:
            emit(
                "consent",
                {
                    "account": c.account,
                    "list": c.list,
                    "address": c.address,
                    "confirmed_at": _iso(c.confirmed_at),
                    "ip": c.ip,
                    "user_agent": c.user_agent,
                    "source": c.source,
                    "evidence": c.evidence,
                },
            )
    for key in await store.list_api_keys():
        emit(
            "api_key",
            {
                "key_id": key.key_id,
                "account": key.account,
                "key_hash": key.key_hash,
                "name": key.name,
                "created_at": _iso(key.created_at),
                "revoked_at": _iso(key.revoked_at),
            },
        )
    return result


async def import_store(store: Store, lines: Iterable[str]) -> TransferCounts:
    """Load an export; bad lines are reported by number and skipped, good ones kept (batched writes)."""
    result = TransferCounts()
    sup: list[SuppressionEntry] = []
    events: list[Event] = []
    sent: list[SentRecord] = []
    consents: list[ConsentRecord] = []

    async def flush(force: bool = False) -> None:
        if sup and (force or len(sup) >= _BATCH):
            await store.add(sup)
            result.add("suppression", len(sup))
            sup.clear()
        if events and (force or len(events) >= _BATCH):
            await store.record_events(events)
            result.add("event", len(events))
            events.clear()
        if sent and (force or len(sent) >= _BATCH):
            await store.record_sent(sent)
            result.add("sent", len(sent))
            sent.clear()
        if consents and (force or len(consents) >= _BATCH):
            await store.add_consent(consents)
            result.add("consent", len(consents))
            consents.clear()

    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            kind = rec.pop("type")
            if kind == "suppression":
                sup.append(
                    SuppressionEntry(
                        rec["address"],
                        Scope(rec["scope"]),
                        rec["account"],
                        rec["list"],
                        Reason(rec["reason"]),
                        rec["source"],
                        _dt(rec["created_at"]),
                        _dt(rec["expires_at"]) if rec["expires_at"] else None,
                    )
                )
            elif kind == "account_state":
                if rec["suspended"]:
                    await store.suspend(
                        rec["account"],
                        SuspendReason(rec["reason"] or "manual"),
                        rec["details"],
                        _dt(rec["since"]),
                    )
                result.add("account_state")
            elif kind == "event":
                last_seen = rec.pop("last_seen", None)  # absent from exports made before repeat counts
                events.append(
                    Event(_dt(rec.pop("at")), **rec, last_seen=_dt(last_seen) if last_seen else None)
                )
            elif kind == "sent":
                sent.append(
                    SentRecord(
                        rec["queue_id"],
                        rec["index"],
                        rec["account"],
                        rec["list"],
                        rec["address"],
                        _dt(rec["sent_at"]),
                    )
                )
            elif kind == "consent":
                consents.append(ConsentRecord(**{**rec, "confirmed_at": _dt(rec["confirmed_at"])}))
            elif kind == "api_key":
                revoked = rec.pop("revoked_at", None)
                key = ApiKey(
                    **{**rec, "created_at": _dt(rec["created_at"])},
                    revoked_at=_dt(revoked) if revoked else None,
                )
                if await store.get_api_key(key.key_id) != key:  # the same key again: an import run twice
                    await store.add_api_key(key)  # ValueError for another key with this id
                result.add("api_key")
            else:
                raise ValueError(f"unknown record type {kind!r}")
        except (ValueError, KeyError, TypeError) as exc:
            result.errors.append((n, str(exc)))
            continue
        await flush()
    await flush(force=True)
    return result
