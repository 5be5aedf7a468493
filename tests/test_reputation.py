"""Account reputation: rates over the window, warning once, suspension with its figures, reinstatement."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from relayd.core.tokens import make_token, new_queue_id
from relayd.feedback import reputation
from relayd.queue.store import QueueStore
from relayd.store import Event, SentRecord, SqliteStore, SuspendReason
from tests.test_feedback import SECRET, T0, Env, arf_report, make_config


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    store = SqliteStore(tmp_path / "relayd.db")
    queue = QueueStore(tmp_path / "queue.db")
    await store.open()
    await queue.open()
    try:
        yield Env(
            store, queue, make_config(minimum_sent=10, complaint_warn=0.05, complaint_suspend=0.1), tmp_path
        )
    finally:
        await queue.close()
        await store.close()


async def send_many(env: Env, n: int, account: str = "acme") -> list[str]:
    qid = new_queue_id()
    addresses = [f"r{i}@{account}-rcpts.example" for i in range(n)]
    await env.store.record_sent(SentRecord(qid, i, account, "news", a, T0) for i, a in enumerate(addresses))
    return [qid, *addresses]


async def complain(env: Env, qid: str, index: int, address: str, minutes: int) -> list[Event]:
    token = make_token(SECRET, "trace", qid, index, address)
    raw = arf_report(address, relayd_id=token)
    return await env.feedback.on_arf(raw, T0 + timedelta(minutes=minutes))


async def test_complaints_past_the_rate_suspend_with_figures(env: Env) -> None:
    qid, *rcpts = await send_many(env, 10)
    queued = await env.queued("waiting@example.net")
    # 1/10 = 10 %: not *above* complaint_suspend 0.1, but above complaint_warn 0.05
    await complain(env, qid, 0, rcpts[0], 1)
    state = await env.store.get_account_state("acme")
    assert state is None
    warnings = await env.events("reputation_warning")
    assert len(warnings) == 1 and warnings[0].account == "acme"
    # 2/10 = 20 % > 10 %: suspended
    await complain(env, qid, 1, rcpts[1], 2)
    state = await env.store.get_account_state("acme")
    assert state is not None and state.suspended and state.reason is SuspendReason.COMPLAINT_RATE
    suspended = await env.events("suspended")
    assert len(suspended) == 1
    figures = json.loads(suspended[0].evidence)
    assert figures["sent"] == 10 and figures["complaints"] == 2
    assert figures["complaint_rate"] == pytest.approx(0.2) and figures["threshold"] == 0.1
    assert json.loads(state.details) == figures
    row = await env.queue.show(queued)
    assert row is not None and row.recipients[0].state == "held"
    # a further complaint while suspended does not suspend twice
    await complain(env, qid, 2, rcpts[2], 3)
    assert len(await env.events("suspended")) == 1


async def test_warning_once_per_window(env: Env) -> None:
    cfg = make_config(minimum_sent=10, complaint_warn=0.05, complaint_suspend=0.5)
    env.cfg = cfg
    qid, *rcpts = await send_many(env, 20)
    for i in range(4):  # 5 %, 10 %, 15 %, 20 %: above warn from the second on, never above suspend
        await complain(env, qid, i, rcpts[i], i)
    assert len(await env.events("reputation_warning")) == 1
    assert await env.store.get_account_state("acme") is None


async def test_below_minimum_sent_is_not_judged(env: Env) -> None:
    qid, *rcpts = await send_many(env, 5)
    for i in range(5):
        await complain(env, qid, i, rcpts[i], i)
    assert await env.store.get_account_state("acme") is None
    assert await env.events("reputation_warning") == []
    r = await reputation.rates(env.store, "acme", T0 + timedelta(hours=1))
    assert (r.sent, r.complaints, r.complaint_rate) == (5, 5, 1.0)


async def test_hard_bounce_rate_suspends(env: Env) -> None:
    env.cfg = make_config(minimum_sent=10, hard_bounce_suspend=0.05)
    _qid, *rcpts = await send_many(env, 20)
    for i in range(2):  # 1/20 = 5 % is allowed, 2/20 = 10 % is not
        await env.feedback.on_delivery_failure(
            SentRecord(new_queue_id(), 0, "acme", "news", rcpts[i], T0 + timedelta(minutes=i)),
            code=550,
            enhanced="5.1.1",
            text="User unknown",
            command="RCPT",
            now=T0 + timedelta(minutes=i),
        )
        state = await env.store.get_account_state("acme")
        assert (state is not None and state.suspended) == (i == 1)
    assert state is not None and state.reason is SuspendReason.HARD_BOUNCE_RATE


async def test_any_spamtrap_hit_suspends_whatever_the_volume(env: Env) -> None:
    await env.store.record_event(Event(T0, "dropped", "acme", None, "trap@example.net", "spamtrap"))
    r = await reputation.evaluate(env.store, env.queue, env.cfg, "acme", T0)
    assert r.spamtraps == 1 and r.sent == 0
    state = await env.store.get_account_state("acme")
    assert state is not None and state.reason is SuspendReason.SPAMTRAP


async def test_old_complaints_leave_the_window(env: Env) -> None:
    qid, *rcpts = await send_many(env, 10)
    env.cfg = make_config(minimum_sent=10, complaint_warn=0.5, complaint_suspend=0.5)
    for i in range(3):
        await complain(env, qid, i, rcpts[i], i)
    r = await reputation.rates(env.store, "acme", T0 + timedelta(days=29), window=30 * 86400)
    assert (r.sent, r.complaints) == (10, 3)
    r = await reputation.rates(env.store, "acme", T0 + timedelta(days=31), window=30 * 86400)
    assert (r.sent, r.complaints) == (0, 0)


async def test_reinstatement_gives_a_clean_slate(env: Env) -> None:
    qid, *rcpts = await send_many(env, 10)
    await complain(env, qid, 0, rcpts[0], 1)
    await complain(env, qid, 1, rcpts[1], 2)
    assert (await env.store.get_account_state("acme")).suspended  # type: ignore[union-attr]
    await env.store.reinstate("acme", at=T0 + timedelta(hours=1))
    # a late complaint about the old campaign: the window starts at the reinstatement, so no re-suspension
    await complain(env, qid, 2, rcpts[2], 90)
    state = await env.store.get_account_state("acme")
    assert state is not None and not state.suspended
    r = await reputation.rates(env.store, "acme", T0 + timedelta(hours=2))
    assert r.since == T0 + timedelta(hours=1) and (r.sent, r.complaints) == (0, 1)
