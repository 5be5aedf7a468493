"""The Feedback object on its own, without a daemon or a listener: built on a real SqliteStore and QueueStore
in a temporary directory, fed corpus reports rewritten to one of our recipients and delivery outcomes as
the scheduler reports them."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from relayd.config import Config
from relayd.core import metrics
from relayd.core.errors import PermanentFailure, TemporaryFailure
from relayd.core.models import DeliveryOutcome, DueRecipient
from relayd.core.tokens import make_token, new_queue_id
from relayd.feedback.service import Feedback
from relayd.mail.dkim import Signer
from relayd.policy.reloaded import Reloaded
from relayd.queue.store import NewMessage, QueueStore
from relayd.store import Event, Reason, Scope, SentRecord, SqliteStore
from tests.corpus import CORPUS

SECRET = b"feedback-units-secret-0123456789abcdef"
T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


def config(soft_bounce_limit: int = 3) -> Config:
    return Config.model_validate(
        {
            "server": {"hostname": "relayd.test"},
            "inbound": {"domains": ["bounces.example.test"], "listen": ["127.0.0.1:0"]},
            "policy": {"soft_bounce_limit": soft_bounce_limit, "soft_bounce_window": "30d"},
            "accounts": {
                "acme": {
                    "networks": ["127.0.0.1/32"],
                    "domains": ["acme.example.test"],
                    "lists": {"news": {}},
                },
                "other": {"networks": ["127.0.0.2/32"], "domains": ["other.example.test"]},
            },
        }
    )


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[tuple[SqliteStore, QueueStore]]:
    store = SqliteStore(tmp_path / "relayd.db")
    queue = QueueStore(tmp_path / "queue.db")
    await store.open()
    await queue.open()
    try:
        yield store, queue
    finally:
        await queue.close()
        await store.close()


@pytest.fixture
def feedback(parts: tuple[SqliteStore, QueueStore]) -> Feedback:
    store, queue = parts
    return Feedback(store, queue, SECRET, config())


async def sent(
    store: SqliteStore, address: str, account: str = "acme", list_name: str | None = "news"
) -> SentRecord:
    """One accepted recipient in the sent ledger, as the submission pipeline records it."""
    record = SentRecord(new_queue_id(), 0, account, list_name, address, T0 - timedelta(hours=1))
    await store.record_sent([record])
    return record


def token(record: SentRecord, purpose: str) -> str:
    return make_token(SECRET, purpose, record.queue_id, record.index, record.address)


def sample(name: str, old: str, new: str) -> bytes:
    """A corpus report with every spelling of its recipient replaced by ours."""
    raw = (CORPUS / name).read_bytes()
    return re.sub(re.escape(old).encode(), new.encode(), raw, flags=re.IGNORECASE)


async def suppressions(store: SqliteStore, address: str) -> list[tuple[Scope, str | None, Reason]]:
    return [(e.scope, e.account, e.reason) for e in await store.list_entries(address=address)]


async def all_events(store: SqliteStore) -> list[Event]:
    return await store.events(T0 - timedelta(days=30), limit=1000)


async def test_hard_dsn_for_a_message_we_sent_suppresses_the_address(
    feedback: Feedback, parts: tuple[SqliteStore, QueueStore]
) -> None:
    store, _queue = parts
    record = await sent(store, "gone@example.co.jp")
    raw = sample("dsn/lhost-postfix-04.eml", "kijitora@example.co.jp", record.address)
    events = await feedback.on_dsn(raw, token(record, "verp"), T0)
    assert [(e.kind, e.reason) for e in events] == [
        ("hard_bounce", "userunknown"),
        ("suppressed", "hard_bounce"),
    ]
    assert {e.queue_id for e in events} == {record.queue_id}
    assert await suppressions(store, record.address) == [(Scope.GLOBAL, None, Reason.HARD_BOUNCE)]
    assert [e.kind for e in await all_events(store)] == ["hard_bounce", "suppressed"]


async def test_soft_dsn_is_counted_and_suppresses_nobody_below_the_limit(
    feedback: Feedback, parts: tuple[SqliteStore, QueueStore]
) -> None:
    store, _queue = parts
    record = await sent(store, "full@example.com")
    raw = sample("dsn/lhost-exim-07.eml", "shiba@example.com", record.address)
    events = await feedback.on_dsn(raw, token(record, "verp"), T0)
    assert [(e.kind, e.reason) for e in events] == [("soft_bounce", "mailboxfull")]
    assert await suppressions(store, record.address) == []
    assert await store.count_events("soft_bounce", T0 - timedelta(days=1), address=record.address) == 1


async def test_reload_reaches_the_soft_bounce_limit(
    feedback: Feedback, parts: tuple[SqliteStore, QueueStore]
) -> None:
    store, _queue = parts
    feedback.reload(Reloaded(config(soft_bounce_limit=1), Signer([]), None, None))
    record = await sent(store, "full@example.com")
    raw = sample("dsn/lhost-exim-07.eml", "shiba@example.com", record.address)
    events = await feedback.on_dsn(raw, token(record, "verp"), T0)
    assert [(e.kind, e.reason) for e in events] == [
        ("soft_bounce", "mailboxfull"),
        ("suppressed", "soft_bounce_limit"),
    ]
    assert await suppressions(store, record.address) == [(Scope.GLOBAL, None, Reason.SOFT_BOUNCE_LIMIT)]


async def test_dsn_we_cannot_attribute_is_only_an_event(
    feedback: Feedback, parts: tuple[SqliteStore, QueueStore]
) -> None:
    store, _queue = parts
    record = await sent(store, "someone@example.co.jp")
    raw = sample("dsn/lhost-postfix-04.eml", "kijitora@example.co.jp", record.address)
    events = await feedback.on_dsn(raw, None, T0, source_ip="192.0.2.5")  # no token anywhere in it
    assert [(e.kind, e.reason, e.account, e.address) for e in events] == [("unattributed", "dsn", None, None)]
    assert await store.count() == 0
    assert [e.kind for e in await all_events(store)] == ["unattributed"]


async def test_bounced_delivery_suppresses_like_a_dsn(
    feedback: Feedback, parts: tuple[SqliteStore, QueueStore]
) -> None:
    store, _queue = parts
    item = DueRecipient(
        new_queue_id(), 0, "nobody@example.net", 1, "acme", "news@acme.example.test", 0.0, "news"
    )
    error = PermanentFailure(
        "550 5.1.1 user unknown", 550, "5.1.1", command="RCPT", text="<nobody@example.net>: User unknown"
    )
    label = {"outcome": "bounced", "domain": metrics.domain_label("example.net")}
    before = metrics.REGISTRY.get_sample_value("relayd_deliveries_total", label) or 0.0
    await feedback.record_delivery(item, DeliveryOutcome.BOUNCED, "550 5.1.1 user unknown", 0.2, error)
    assert metrics.REGISTRY.get_sample_value("relayd_deliveries_total", label) == before + 1
    events = await all_events(store)
    assert sorted((e.kind, e.reason) for e in events) == [
        ("bounced", None),
        ("hard_bounce", "userunknown"),
        ("suppressed", "hard_bounce"),
    ]
    assert {(e.account, e.list, e.address, e.queue_id) for e in events} == {
        ("acme", "news", item.address, item.queue_id)
    }
    assert await suppressions(store, item.address) == [(Scope.GLOBAL, None, Reason.HARD_BOUNCE)]


async def test_deferred_and_dropped_deliveries_act_on_nobody(
    feedback: Feedback, parts: tuple[SqliteStore, QueueStore]
) -> None:
    store, _queue = parts
    item = DueRecipient(new_queue_id(), 0, "later@example.net", 1, "acme", "news@acme.example.test", 0.0)
    error = TemporaryFailure("451 4.3.0 try later", 451, "4.3.0", command="RCPT", text="try later")
    await feedback.record_delivery(item, DeliveryOutcome.DEFERRED, "451 4.3.0 try later", 0.1, error)
    await feedback.record_delivery(item, DeliveryOutcome.DROPPED, "", 0.0, None)  # its event is the check's
    assert [e.kind for e in await all_events(store)] == ["deferred"]
    assert await store.count() == 0


async def test_arf_complaint_suppresses_for_the_account_and_drops_its_queued_mail(
    feedback: Feedback, parts: tuple[SqliteStore, QueueStore]
) -> None:
    store, queue = parts
    record = await sent(store, "kijitora@y.example.com")
    mine, theirs = new_queue_id(), new_queue_id()
    for qid, account, list_name in ((mine, "acme", "news"), (theirs, "other", None)):
        body = b"Subject: x\r\n\r\nx\r\n"
        sender = f"app@{account}.example.test"
        await queue.enqueue(NewMessage(qid, account, sender, (record.address,), body, list_name))
    raw = (CORPUS / "arf/arf-14.eml").read_bytes()
    raw = raw.replace(
        b"Feedback-ID: 2\n", f"Feedback-ID: 2\nX-Relayd-ID: {token(record, 'trace')}\n".encode()
    )
    events = await feedback.on_arf(raw, T0)
    assert [(e.kind, e.account) for e in events] == [("complaint", "acme"), ("suppressed", "acme")]
    assert await suppressions(store, record.address) == [(Scope.ACCOUNT, "acme", Reason.COMPLAINT)]
    assert set(await store.check([record.address], "acme", None, T0)) == {record.address}
    assert await store.check([record.address], "other", None, T0) == {}  # another account may still send
    dropped, kept = await queue.show(mine), await queue.show(theirs)
    assert dropped is not None and dropped.recipients[0].state == "dropped"
    assert kept is not None and kept.recipients[0].state == "queued"
