"""Replayed and forged reports: one outcome per recipient copy, late reports act on nobody, the ledger and
the events are pruned (and tokens with them), evidence is bounded, forged reports are aggregated per source,
and the sent ledger is as durable as the queue. On a real store of each backend and a real QueueStore."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from relayd.app import retention
from relayd.config import Config, load
from relayd.core.errors import ConfigError
from relayd.core.tokens import make_token, new_queue_id
from relayd.feedback import events as evidence_rules
from relayd.feedback import reputation
from relayd.feedback.service import Feedback
from relayd.queue.store import QueueStore
from relayd.store import Event, SentRecord, SqliteStore, Store, StoreError
from relayd.store.postgresql import PostgresStore
from tests.test_feedback import SECRET, T0, arf_report, dsn_report, make_config

DAY = timedelta(days=1)


@dataclass
class Env:
    store: Store
    queue: QueueStore
    cfg: Config

    @property
    def feedback(self) -> Feedback:
        """The object under test, built as the daemon builds it, with the current ``cfg``."""
        return Feedback(self.store, self.queue, SECRET, self.cfg)

    async def sent(self, n: int, at: datetime | None = None, account: str = "acme") -> list[SentRecord]:
        """``n`` accepted recipients of one message in the ledger, as the pipeline records them."""
        qid = new_queue_id()
        when = T0 - DAY if at is None else at
        records = [SentRecord(qid, i, account, "news", f"r{i}@example.net", when) for i in range(n)]
        await self.store.record_sent(records)
        return records

    async def events(self, kind: str) -> list[Event]:
        return await self.store.events(T0 - timedelta(days=400), kind=kind, limit=10_000)


def verp(r: SentRecord) -> str:
    return make_token(SECRET, "verp", r.queue_id, r.index, r.address)


def trace(r: SentRecord) -> str:
    return make_token(SECRET, "trace", r.queue_id, r.index, r.address)


@pytest.fixture(params=["sqlite", "postgresql"])
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    store: Store
    if request.param == "sqlite":
        store = SqliteStore(tmp_path / "relayd.db")
    else:
        schema = "r_" + hashlib.sha1(str(tmp_path).encode()).hexdigest()[:16]
        store = PostgresStore(request.getfixturevalue("pg_dsn"), schema=schema)
    queue = QueueStore(tmp_path / "queue.db")
    await store.open()
    await queue.open()
    try:
        yield Env(store, queue, make_config())
    finally:
        await queue.close()
        await store.close()


# --- one outcome per recipient copy -----------------------------------------------------------------------


async def test_101_copies_of_one_valid_dsn_are_one_hard_bounce_and_suspend_nobody(env: Env) -> None:
    records = await env.sent(2000)
    victim = records[0]
    raw = dsn_report(victim.address)
    for n in range(101):
        await env.feedback.on_dsn(raw, verp(victim), T0 + n * timedelta(seconds=1))
    state = await env.store.get_account_state("acme")
    assert state is None or not state.suspended
    bounces = await env.events("hard_bounce")
    assert (
        len(bounces) == 1 and bounces[0].count == 101 and bounces[0].last_seen == T0 + timedelta(seconds=100)
    )
    assert len(await env.events("suppressed")) == 1
    figures = await reputation.rates(env.store, "acme", T0 + DAY)
    assert (figures.sent, figures.hard_bounces) == (2000, 1)


async def test_one_hard_bounce_per_copy_still_adds_up_across_copies(env: Env) -> None:
    env.cfg = make_config(minimum_sent=10, hard_bounce_suspend=0.05)
    records = await env.sent(20)
    for r in records[:2]:  # two distinct copies: 10 % of 20 sent
        await env.feedback.on_dsn(dsn_report(r.address), verp(r), T0)
    state = await env.store.get_account_state("acme")
    assert state is not None and state.suspended
    assert await env.store.count_events("hard_bounce", T0 - DAY, account="acme") == 2


async def test_a_repeated_complaint_is_one_event_with_a_count(env: Env) -> None:
    (r,) = await env.sent(1)
    raw = arf_report(r.address, relayd_id=trace(r))
    for n in range(5):
        events = await env.feedback.on_arf(raw, T0 + n * timedelta(minutes=1))
        assert [e.kind for e in events][:1] == ["complaint"]
    (complaint,) = await env.events("complaint")
    assert complaint.count == 5
    assert await env.store.count_events("complaint", T0 - DAY, account="acme") == 1
    assert await env.events("complaint_duplicate") == []


# --- late reports -----------------------------------------------------------------------------------------


async def test_report_about_a_copy_older_than_report_max_age_is_an_event_only(env: Env) -> None:
    old = T0 - timedelta(days=31)  # report_max_age: 30 days by default
    bounced, complained = await env.sent(2, at=old)
    events = await env.feedback.on_dsn(dsn_report(bounced.address), verp(bounced), T0)
    assert [(e.kind, e.reason) for e in events] == [("late_report", "dsn")]
    raw = arf_report(complained.address, relayd_id=trace(complained))
    events = await env.feedback.on_arf(raw, T0)
    assert [(e.kind, e.reason) for e in events] == [("late_report", "arf")]
    assert await env.store.count() == 0  # nobody suppressed
    assert await env.store.count_events("hard_bounce", old, account="acme") == 0
    assert await env.store.count_events("complaint", old, account="acme") == 0
    assert json.loads(events[0].evidence)["sent_at"] == old.isoformat()
    # the same copy, one day younger, is acted on
    (fresh,) = await env.sent(1, at=T0 - timedelta(days=29))
    events = await env.feedback.on_dsn(dsn_report(fresh.address), verp(fresh), T0)
    assert [e.kind for e in events] == ["hard_bounce", "suppressed"]


# --- pruning ---------------------------------------------------------------------------------------------


async def test_pruning_removes_old_ledger_rows_and_events_and_a_pruned_token_attributes_nothing(
    env: Env,
) -> None:
    (old,) = await env.sent(1, at=T0 - timedelta(days=40))
    (young,) = await env.sent(1, at=T0 - DAY)
    await env.store.record_events(
        [Event(T0 - timedelta(days=100), "delivered", "acme"), Event(T0 - DAY, "delivered", "acme")]
    )
    pruned = await retention.prune(env.store, env.cfg, T0)
    assert (pruned.sent, pruned.events) == (1, 1)
    assert await env.store.lookup_sent(old.queue_id, old.index) is None
    assert await env.store.lookup_sent(young.queue_id, young.index) == young
    assert len(await env.events("delivered")) == 1
    events = await env.feedback.on_dsn(dsn_report(old.address), verp(old), T0)
    assert [(e.kind, json.loads(e.evidence)["why"]) for e in events] == [("unattributed", "unknown message")]
    assert await env.store.count() == 0


async def test_events_are_kept_at_least_as_long_as_the_ledger() -> None:
    cfg = Config.model_validate({"inbound": {"report_max_age": "30d"}, "store": {"keep_events": "1d"}})
    seen: list[tuple[str, object]] = []

    class Recorder:
        async def prune_sent(self, before: object) -> int:
            seen.append(("sent", before))
            return 0

        async def prune_events(self, before: object) -> int:
            seen.append(("events", before))
            return 0

        async def prune(self, before: object) -> int:
            seen.append(("caps sends", before))
            return 0

        async def prune_optin(self, before: object) -> int:
            seen.append(("opt-in confirmations", before))
            return 0

        async def prune_inbox(self, before: object) -> int:
            seen.append(("inbox", before))
            return 0

        async def prune_dmarc(self, before: object) -> int:
            seen.append(("dmarc", before))
            return 0

    await retention.prune(Recorder(), cfg, T0)  # type: ignore[arg-type]
    assert seen == [
        ("sent", T0 - timedelta(days=30)),
        ("events", T0 - timedelta(days=30)),
        ("caps sends", T0 - timedelta(days=30)),  # the longest cap window
        ("opt-in confirmations", T0 - timedelta(days=1)),  # the opt-in window
        ("inbox", T0 - timedelta(days=90)),  # [inbound] keep_inbox
        ("dmarc", (T0 - timedelta(days=90)).date()),
    ]


def test_report_max_age_and_keep_events_are_validated(tmp_path: Path) -> None:
    path = tmp_path / "relayd.toml"
    path.write_text('[inbound]\nreport_max_age = "0s"\n[store]\nkeep_events = "soon"\n')
    with pytest.raises(ConfigError) as caught:
        load(path)
    problems = "\n".join(caught.value.problems)
    assert f"{path}: inbound.report_max_age: " in problems
    assert f"{path}: store.keep_events: " in problems
    path.write_text('[inbound]\nreport_max_age = "7d"\n[store]\nkeep_events = "60d"\n')
    cfg = load(path)
    assert (cfg.inbound.report_max_age, cfg.store.keep_events) == (7 * 86400, 60 * 86400)
    assert (Config().inbound.report_max_age, Config().store.keep_events) == (30 * 86400, 90 * 86400)


# --- forged reports: bounded evidence, aggregated per source ---------------------------------------------


async def test_evidence_is_clipped_per_field_and_in_total(env: Env) -> None:
    long_rcpt = "x" * 20_000 + "@example.net"
    raw = dsn_report(long_rcpt, diagnostic="smtp; 550 5.1.1 " + "mailbox unavailable " * 3000)
    (event,) = await env.feedback.on_dsn(raw, None, T0, source_ip="192.0.2.9")
    assert event.kind == "unattributed"
    assert len(event.evidence) <= evidence_rules.EVIDENCE_MAX
    evidence = json.loads(event.evidence)
    assert all(len(a) <= evidence_rules.EVIDENCE_FIELD_MAX + 3 for a in evidence["claimed"])
    (stored,) = await env.events("unattributed")
    assert len(stored.evidence) <= evidence_rules.EVIDENCE_MAX
    # many long fields, some of them escaped to six times their length by JSON, still fit
    text = evidence_rules.evidence_json(
        {f"f{i}": "\u2603" * 5000 for i in range(20)} | {"list": ["y" * 9000] * 50}
    )
    assert len(text) <= evidence_rules.EVIDENCE_MAX and json.loads(text)


async def test_unattributed_reports_from_one_source_are_one_event_per_hour(env: Env) -> None:
    forged = dsn_report("victim@example.net")
    for n in range(50):
        at = T0 + n * timedelta(seconds=10)
        await env.feedback.on_dsn(forged, None, at, source_ip="192.0.2.7")
    await env.feedback.on_dsn(forged, None, T0, source_ip="192.0.2.8")
    next_hour = T0 + timedelta(hours=1)
    await env.feedback.on_dsn(forged, None, next_hour, source_ip="192.0.2.7")
    # no address from the listener: grouped by the report's From domain
    for _ in range(3):
        await env.feedback.on_arf(arf_report("v@example.net", relayd_id=None), T0)
    events = await env.events("unattributed")
    counts = sorted((json.loads(e.evidence)["source"], e.reason, e.at, e.count) for e in events)
    assert counts == [
        ("from:provider.example", "arf", T0, 3),
        ("ip:192.0.2.7", "dsn", T0, 50),
        ("ip:192.0.2.7", "dsn", next_hour, 1),
        ("ip:192.0.2.8", "dsn", T0, 1),
    ]
    assert await env.store.count() == 0


# --- durability of the sent ledger -----------------------------------------------------------------------


async def test_sqlite_sent_ledger_is_written_with_synchronous_full(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path / "relayd.db") as store:
        record = SentRecord(new_queue_id(), 0, "acme", None, "a@example.net", T0)
        await store.record_sent([record])
        hot = store._hot_db  # the connection record_sent's group commit writes on
        assert hot is not None
        assert hot.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL, as the queue's
        assert await store.lookup_sent(record.queue_id, 0) == record


async def test_a_store_without_the_ledger_writes_events_without_fsync_and_refuses_ledger_rows(
    tmp_path: Path,
) -> None:
    """A queue shard's delivery process opens the store with ``ledger=False``: its per-attempt events are
    committed with ``synchronous=NORMAL``, and a sent-ledger row, which must be durable, is refused."""
    async with SqliteStore(tmp_path / "relayd.db", ledger=False) as store:
        hot = store._hot_db
        assert hot is not None
        assert hot.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        await store.record_event(Event(T0, "delivered", account="acme", address="a@example.net"))
        assert await store.count_events("delivered", T0 - DAY) == 1
        record = SentRecord(new_queue_id(), 0, "acme", None, "a@example.net", T0)
        with pytest.raises(StoreError, match="without the sent ledger"):
            await store.record_sent([record])
        assert await store.lookup_sent(record.queue_id, 0) is None


async def test_concurrent_records_of_one_key_are_one_event_with_their_count(env: Env) -> None:
    """Group commit may put several copies of one report in one batch (one statement on PostgreSQL)."""
    await asyncio.gather(
        *[
            env.store.record_event(
                Event(T0 + n * timedelta(seconds=1), "unattributed", reason="dsn", key="k1")
            )
            for n in range(20)
        ]
    )
    (event,) = await env.events("unattributed")
    assert (event.count, event.at, event.last_seen) == (20, T0, T0 + timedelta(seconds=19))
    assert await env.store.count_events("unattributed", T0 - DAY) == 1
