"""The queue tools (postqueue, postsuper, postcat, qshape for relayd) against a running daemon.

The queue holds deferred mail to two destinations: ``slow.test`` and ``far.test``, each routed to a real
aiosmtpd sink that answers ``451`` for the scripted recipients until told to accept.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from relayd.queue.store import NewMessage, QueueStore, State
from tests.harness import PASSWORD_HASH, Relayd, Sink, cli_json, message, submit_each, wait_until
from tests.test_webhooks import SECRET, Receiver

LATER = ["451 4.7.1 try again later"]
X, Y, Z = "x@slow.test", "y@far.test", "z@slow.test"
OTHER_SENDER = "app@other.example.test"


def _refuse(sink: Sink, *addresses: str) -> None:
    with sink.handler.lock:
        for a in addresses:
            sink.handler.script[a] = list(LATER)


def _accept(sink: Sink, *addresses: str) -> None:
    with sink.handler.lock:
        for a in addresses:
            sink.handler.script.pop(a, None)


def _tries(sink: Sink, address: str) -> int:
    with sink.handler.lock:
        return sink.handler.attempts.get(address, 0)


def _delivered_to(sink: Sink, address: str) -> bool:
    return any(address in m.rcpt_tos for m in sink.messages)


def _rows(relayd: Relayd, *args: str) -> list[dict[str, Any]]:
    return cli_json(relayd, "queue", "list", *args)


def _by_rcpt(relayd: Relayd, *args: str) -> dict[str, dict[str, Any]]:
    return {r["recipient"]: r for r in _rows(relayd, *args)}


def _submit(relayd: Relayd, to: list[str], *, user: str = "acme", subject: str = "hello") -> str:
    sender = OTHER_SENDER if user == "other" else "app@acme.example.test"
    tx = submit_each(relayd, message(subject, sender=sender), to=to, sender=sender, user=user)
    return tx.queue_id


def _all_deferred(relayd: Relayd, n: int) -> bool:
    rows = _rows(relayd)
    return len(rows) == n and all(r["state"] == "deferred" for r in rows)


@dataclass
class Deferred:
    relayd: Relayd
    slow: Sink
    far: Sink
    acme_id: str  # to X and Y
    other_id: str  # to Z, account "other"


def _start(tmp: Path, slow: Sink, far: Sink, **config: Any) -> Relayd:
    return Relayd(
        tmp, routes={"slow.test": slow.port, "far.test": far.port}, retry_schedule='["1h"]', **config
    ).start()


def _fill(relayd: Relayd, slow: Sink, far: Sink) -> tuple[str, str]:
    """Two messages, three recipients, all deferred (the schedule waits an hour before the next try)."""
    _refuse(slow, X, Z)
    _refuse(far, Y)
    acme_id = _submit(relayd, [X, Y])
    other_id = _submit(relayd, [Z], user="other")
    assert wait_until(lambda: _all_deferred(relayd, 3)), _rows(relayd)
    return acme_id, other_id


@pytest.fixture(scope="module")
def deferred(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deferred]:
    """A daemon whose queue only the read-only tests below look at."""
    with Sink() as slow, Sink() as far:
        relayd = _start(tmp_path_factory.mktemp("queue-tools"), slow, far)
        try:
            acme_id, other_id = _fill(relayd, slow, far)
            yield Deferred(relayd, slow, far, acme_id, other_id)
        finally:
            relayd.kill()


# --- list ------------------------------------------------------------------------------------------------


def test_list_shows_one_row_per_recipient_with_destination_age_attempts_state_and_last_reply(
    deferred: Deferred,
) -> None:
    rows = _by_rcpt(deferred.relayd)
    assert set(rows) == {X, Y, Z}
    x = rows[X]
    assert x["queue_id"] == deferred.acme_id and rows[Z]["queue_id"] == deferred.other_id
    assert x["destination"] == f"127.0.0.1:{deferred.slow.port}"  # the configured route
    assert rows[Y]["destination"] == f"127.0.0.1:{deferred.far.port}"
    assert x["domain"] == "slow.test" and x["account"] == "acme" and x["sender"] == "app@acme.example.test"
    assert x["state"] == "deferred" and x["attempts"] == 1 and x["held_by"] is None
    assert "451 4.7.1 try again later" in x["last_reply"]
    assert isinstance(x["age"], int) and x["age"] >= 0 and x["next_attempt"] and x["created_at"]
    text = deferred.relayd.cli("queue", "list")
    assert text.returncode == 0
    [row_x] = [line for line in text.stdout.splitlines() if f"<{X}>" in line]
    assert deferred.acme_id in row_x and "deferred" in row_x and "451" in row_x


def test_list_filters_by_state_domain_account_sender_and_age_and_they_combine(deferred: Deferred) -> None:
    r = deferred.relayd
    assert set(_by_rcpt(r, "--state", "deferred")) == {X, Y, Z}
    assert _rows(r, "--state", "active") == [] and _rows(r, "--state", "held") == []
    assert _rows(r, "--state", "done") == []
    assert set(_by_rcpt(r, "--state", "queued")) == {X, Y, Z}  # the state names of earlier releases
    assert set(_by_rcpt(r, "--domain", "slow.test")) == {X, Z}
    assert set(_by_rcpt(r, "--account", "other")) == {Z}
    assert set(_by_rcpt(r, "--sender", OTHER_SENDER)) == {Z}
    assert set(_by_rcpt(r, "--domain", "slow.test", "--account", "acme")) == {X}
    assert _rows(r, "--domain", "far.test", "--account", "other") == []
    assert _rows(r, "--older-than", "1h") == []
    time.sleep(1.1)  # every message is now more than a second old
    assert set(_by_rcpt(r, "--older-than", "1s", "--domain", "far.test")) == {Y}


def test_summary_counts_deferred_recipients_per_destination_domain_table_and_json(deferred: Deferred) -> None:
    docs = cli_json(deferred.relayd, "queue", "summary")
    by = {(d["queue"], d["domain"]): d for d in docs}
    assert by[("deferred", None)]["total"] == 3
    assert by[("deferred", "slow.test")]["total"] == 2 and by[("deferred", "far.test")]["total"] == 1
    assert by[("pending", None)]["total"] == 3
    assert by[("deferred", "slow.test")]["buckets"]["5"] == 2  # minutes old: the youngest bucket
    assert list(by[("deferred", "slow.test")]["buckets"]) == [
        *["5", "10", "20", "40", "80", "160", "320", "640", "1280"],
        "1280+",
    ]
    deferred_rows = [d for d in docs if d["queue"] == "deferred" and d["domain"]]
    assert [d["domain"] for d in deferred_rows] == ["slow.test", "far.test"]  # largest first
    text = deferred.relayd.cli("queue", "summary")
    assert text.returncode == 0
    lines = text.stdout.splitlines()
    assert lines[0].startswith("deferred recipients")
    assert lines[1].split()[:3] == ["T", "5", "10"] and lines[1].split()[-1] == "1280+"
    assert lines[2].split()[:3] == ["TOTAL", "3", "3"]
    assert lines[3].split()[:3] == ["slow.test", "2", "2"] and lines[4].split()[:3] == ["far.test", "1", "1"]


# --- cat -------------------------------------------------------------------------------------------------


def test_cat_prints_the_copy_a_recipient_gets_and_headers_prints_only_the_header(deferred: Deferred) -> None:
    out = deferred.relayd.cli("queue", "cat", deferred.acme_id, "--recipient", Y)
    assert out.returncode == 0, out.stderr
    head, _, body = out.stdout.partition("\n\n")
    assert head.startswith("Received: ") and "Subject: hello" in head
    # the same rendering as delivery: this recipient's unsubscribe link and trace token, and a signature
    # only if a key is configured (none here)
    assert "List-Unsubscribe: <http" in head and "X-Relayd-ID: " in head
    assert "Hello there." in body and "ACME Ltd, 1 Test Street" in body  # footer with the imprint
    assert "the copy for <y@far.test>" in out.stderr
    headers = deferred.relayd.cli("queue", "cat", deferred.acme_id, "--headers")
    assert headers.returncode == 0
    assert headers.stdout.rstrip("\n") == headers.stdout.partition("\n\n")[0].rstrip("\n")
    assert "Subject: hello" in headers.stdout and "Hello there." not in headers.stdout


# --- usage and unknown ids -----------------------------------------------------------------------------


def test_unknown_queue_id_exits_1_naming_it(deferred: Deferred) -> None:
    r = deferred.relayd
    for args in (("hold", "NOSUCHID"), ("release", "NOSUCHID"), ("retry", "NOSUCHID"), ("drop", "NOSUCHID")):
        out = r.cli("queue", *args)
        assert out.returncode == 1 and "NOSUCHID: no such message" in out.stderr, (args, out)
    assert r.cli("queue", "cat", "NOSUCHID").returncode == 1
    assert set(_by_rcpt(r, "--state", "deferred")) == {X, Y, Z}  # an unknown id never means "all"


def test_hold_release_drop_without_a_selector_exit_2_and_change_nothing(deferred: Deferred) -> None:
    for action in ("hold", "release", "drop"):
        out = deferred.relayd.cli("queue", action)
        assert out.returncode == 2 and f"relayd queue {action}: name what to {action}" in out.stderr
    assert set(_by_rcpt(deferred.relayd, "--state", "deferred")) == {X, Y, Z}


# --- actions against a daemon of their own ---------------------------------------------------------------


def test_hold_by_domain_survives_a_restart_and_release_delivers(
    tmp_path: Path, sink: Sink, sink2: Sink
) -> None:
    relayd = _start(tmp_path, sink, sink2)
    try:
        _fill(relayd, sink, sink2)
        out = relayd.cli("queue", "hold", "--domain", "slow.test")
        assert out.returncode == 0 and "2 recipient(s) held" in out.stdout
        assert relayd.stop() == 0
        _accept(sink, X, Z)
        _accept(sink2, Y)
        relayd.start()
        held = _by_rcpt(relayd, "--state", "held")
        assert set(held) == {X, Z} and held[X]["held_by"] == "operator"
        # every other recipient is made due: far.test is delivered, the held ones are left alone
        assert relayd.cli("queue", "retry").returncode == 0
        assert wait_until(lambda: _delivered_to(sink2, Y))
        assert wait_until(lambda: _by_rcpt(relayd, "--state", "done").get(Y, {}).get("state") == "delivered")
        assert _tries(sink, X) == 1 and _tries(sink, Z) == 1 and sink.messages == []
        assert set(_by_rcpt(relayd, "--state", "held")) == {X, Z}
        out = relayd.cli("queue", "release", "--domain", "slow.test")
        assert out.returncode == 0 and "2 recipient(s) released" in out.stdout
        assert wait_until(lambda: _delivered_to(sink, X) and _delivered_to(sink, Z))
        assert wait_until(lambda: _rows(relayd) == [])
    finally:
        relayd.kill()


def test_retry_by_domain_makes_only_that_domain_due_at_once(tmp_path: Path, sink: Sink, sink2: Sink) -> None:
    relayd = _start(tmp_path, sink, sink2)  # the retry schedule says: next attempt in an hour
    try:
        _fill(relayd, sink, sink2)
        _accept(sink, X, Z)
        _accept(sink2, Y)
        out = relayd.cli("queue", "retry", "--domain", "far.test")
        assert out.returncode == 0 and "1 recipient(s) due now" in out.stdout
        assert wait_until(lambda: _delivered_to(sink2, Y))  # within seconds, not the hour of the schedule
        assert _tries(sink2, Y) == 2
        rows = _by_rcpt(relayd)
        assert set(rows) == {X, Z} and {r["state"] for r in rows.values()} == {"deferred"}
        assert _tries(sink, X) == 1 and _tries(sink, Z) == 1
    finally:
        relayd.kill()


def test_drop_by_recipient_removes_just_that_recipient(tmp_path: Path, sink: Sink, sink2: Sink) -> None:
    relayd = _start(tmp_path, sink, sink2)
    try:
        acme_id, _ = _fill(relayd, sink, sink2)
        out = relayd.cli("queue", "drop", "--recipient", X)
        assert out.returncode == 0 and "1 recipient(s) dropped" in out.stdout
        assert set(_by_rcpt(relayd)) == {Y, Z}
        done = _by_rcpt(relayd, "--state", "dropped")
        assert set(done) == {X} and done[X]["queue_id"] == acme_id
        [shown] = cli_json(relayd, "queue", "show", acme_id)
        states = {r["address"]: r["state"] for r in shown["recipients"]}
        assert states == {X: "dropped", Y: "queued"}
    finally:
        relayd.kill()


def test_release_leaves_suspension_holds_and_reinstate_leaves_operator_holds(
    tmp_path: Path, sink: Sink, sink2: Sink
) -> None:
    relayd = _start(tmp_path, sink, sink2)
    try:
        _refuse(sink, X)
        _refuse(sink2, Y)
        to_x = _submit(relayd, [X])
        _submit(relayd, [Y])
        assert wait_until(lambda: _all_deferred(relayd, 2))
        assert relayd.cli("queue", "hold", to_x).returncode == 0
        assert relayd.cli("account", "suspend", "acme").returncode == 0
        held = _by_rcpt(relayd, "--state", "held")
        assert {a: r["held_by"] for a, r in held.items()} == {X: "operator", Y: "suspension"}
        out = relayd.cli("queue", "release", "--domain", "far.test")
        assert out.returncode == 0 and "0 recipient(s) released" in out.stdout
        assert "relayd account reinstate acme" in out.stderr
        assert relayd.cli("account", "reinstate", "acme").returncode == 0
        assert set(_by_rcpt(relayd, "--state", "held")) == {X}  # the operator's hold stays
        # the suspension's hold is released and due at once: tried again now, not after the hour
        assert wait_until(lambda: _tries(sink2, Y) == 2)
    finally:
        relayd.kill()


async def test_each_action_is_an_event_by_cli_and_a_webhook(tmp_path: Path, sink: Sink, sink2: Sink) -> None:
    receiver = await Receiver().start()
    secret_file = tmp_path / "acme-hook.secret"
    secret_file.write_bytes(SECRET + b"\n")
    secret_file.chmod(0o600)
    hooked = '["held", "released", "retried", "dropped"]'
    accounts = f"""
[accounts.acme]
password_hash = "{PASSWORD_HASH}"
domains = ["acme.example.test"]
webhooks = [{{ url = "{receiver.url}", secret_file = "{secret_file}", events = {hooked} }}]

[accounts.other]
password_hash = "{PASSWORD_HASH}"
domains = ["other.example.test"]
"""
    relayd = await asyncio.to_thread(_start, tmp_path, sink, sink2, accounts=accounts)
    try:
        acme_id, _ = await asyncio.to_thread(_fill, relayd, sink, sink2)
        for args in (
            ("retry", "--domain", "slow.test"),  # x (acme) and z (other): an event for each account
            ("hold", acme_id),
            ("release", "--account", "acme"),
            ("drop", "--recipient", X),
        ):
            out = await asyncio.to_thread(relayd.cli, "queue", *args)
            assert out.returncode == 0, out.stderr
        await receiver.wait_for(lambda: len(receiver.events) >= 4, timeout=30)
        events = await asyncio.to_thread(cli_json, relayd, "events", "--since", "1h")
    finally:
        relayd.kill()
        await receiver.stop()
    mine = [e for e in events if e["kind"].startswith("queue_")]
    assert sorted((e["kind"], e["account"]) for e in mine) == [
        ("queue_drop", "acme"),
        ("queue_hold", "acme"),
        ("queue_release", "acme"),
        ("queue_retry", "acme"),
        ("queue_retry", "other"),
    ]
    for e in mine:
        assert e["evidence"]["who"] == "cli" and e["reason"] == "operator", e
        assert e["evidence"]["recipients"] == (2 if e["kind"] in ("queue_hold", "queue_release") else 1), e
    by_kind = {e["kind"]: e for e in mine if e["account"] == "acme"}
    assert by_kind["queue_hold"]["queue_id"] == acme_id and by_kind["queue_drop"]["address"] == X
    assert by_kind["queue_retry"]["evidence"]["selection"] == {"domain": "slow.test"}
    assert [e["event"] for e in receiver.events] == ["retried", "held", "released", "dropped"]
    assert [e["kind"] for e in receiver.events] == [
        "queue_retry",
        "queue_hold",
        "queue_release",
        "queue_drop",
    ]
    assert {e["account"] for e in receiver.events} == {"acme"} and receiver.bad_signatures == 0


# --- the hold and an attempt in flight -----------------------------------------------------------------


async def _hold(store: QueueStore, by: str) -> None:
    if by == "suspension":
        assert await store.hold_account("acme") == 2
        return
    from relayd.queue.store import Action, Selection

    held = await store.operate(Action.HOLD, Selection(queue_ids=("Q1",)))
    assert [a.address for a in held if a.changed] == ["d@x.test", "f@x.test"]


async def _release(store: QueueStore, by: str) -> int:
    if by == "suspension":
        return await store.release_account("acme")
    from relayd.queue.store import Action, Selection

    return sum(a.changed for a in await store.operate(Action.RELEASE, Selection(queue_ids=("Q1",))))


@pytest.mark.parametrize("by", ["suspension", "operator"])
async def test_a_recipient_held_while_its_attempt_is_in_flight_takes_the_attempts_outcome(
    tmp_path: Path, by: str
) -> None:
    """The scheduler read both recipients as queued and is delivering them when the hold lands: the
    delivery is recorded (not lost under the hold, which the release would send a second time); the
    deferral is recorded too, and that recipient stays held until the release."""
    store = QueueStore(tmp_path / "queue.db")
    await store.open()
    try:
        await store.enqueue(NewMessage("Q1", "acme", "a@acme.example.test", ("d@x.test", "f@x.test"), b"x"))
        [d, f] = await store.due(time.time() + 1, 10)  # both in flight from here on
        await _hold(store, by)
        await store.finish("Q1", d.index, State.DELIVERED, "250 ok", 1)
        await store.defer("Q1", f.index, time.time() + 3600, "451 later", 1)
        row = await store.show("Q1")
        assert row is not None
        got = {r.address: (r.state, r.attempts, r.last_reply) for r in row.recipients}
        assert got == {"d@x.test": ("delivered", 1, "250 ok"), "f@x.test": ("held", 1, "451 later")}
        assert await _release(store, by) == 1  # only f: d has gone out already
    finally:
        await store.close()
