"""Policy pipeline, end to end: a real ``relayd serve`` between smtplib and an aiosmtpd sink.

What each rule blocks, and where: suppression by scope and reason (RCPT for global and account scope, DATA
for list scope), expiry, discard patterns, spam traps, the re-check at dequeue, per-list send caps and
account suspension. The daemon and the sink are shared by the module (one process start); every test uses
addresses of its own, so tests don't see each other's suppressions, caps or deliveries. The operator side is
the real command line (``relayd suppress|queue|events|account``) against the daemon's store.

The retry schedule is one hour: a recipient deferred by the sink is retried only when a test says so
(``relayd queue retry``), so "suppressed while it waited" needs no race against a timer.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from typing import Any

import pytest

from tests.harness import (
    PASSWORD,
    PASSWORD_HASH,
    Received,
    Relayd,
    Sink,
    cli_json,
    submit_each,
    wait_until,
)

ACME = "app@acme.example.test"
OTHER = "app@other.example.test"
NEWS = "<news.acme.example.test>"
PROMO = "<promo.acme.example.test>"
REASONS = ["hard_bounce", "soft_bounce_limit", "complaint", "unsubscribe", "spamtrap", "manual", "discard"]

POLICY = r"""
[policy]
discard_patterns = ["*@discard.example.test", "re:bounce-[0-9]+@example\\.test"]
spamtraps = ["trap@example.test", "*@traps.example.test"]

[policy.thresholds]
# a trap hit suspends the account by default, which would refuse every later test's mail here
spamtrap_suspend = 0
"""

ACCOUNTS = f"""
[accounts.acme]
password_hash = "{PASSWORD_HASH}"
domains = ["acme.example.test"]
imprint = "ACME Ltd, 1 Test Street"
discard_patterns = ["noreply@*"]

[accounts.acme.lists.news]
caps = {{ day = 1 }}

[accounts.acme.lists.promo]
caps = {{ day = 1 }}

[accounts.other]
password_hash = "{PASSWORD_HASH}"
domains = ["other.example.test"]
"""


# --- fixtures and helpers -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sink(store_config: str | None) -> Iterator[Sink]:  # one sink per backend run
    with Sink() as s:
        yield s


def _relayd(tmp: Path, sink: Sink, store: str | None) -> Relayd:
    return Relayd(
        tmp,
        routes={"example.test": sink.port},
        extra=POLICY,
        accounts=ACCOUNTS,
        retry_schedule='["1h"]',
        store=store,
    )


@pytest.fixture(scope="module")
def relayd(
    tmp_path_factory: pytest.TempPathFactory, sink: Sink, store_config: str | None
) -> Iterator[Relayd]:
    """The suite runs once on SQLite and once on PostgreSQL (every policy behaviour must hold on both)."""
    with _relayd(tmp_path_factory.mktemp("policy"), sink, store_config) as r:
        yield r


def make_message(
    subject: str, *, list_id: str | None = None, sender: str = ACME, body: str = "Hello there.\r\n"
) -> bytes:
    list_field = f"List-Id: {list_id}\r\n" if list_id else ""
    return (
        f"From: App <{sender}>\r\nTo: Subscriber <subscriber@example.test>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@e2e.example.test>\r\n"
        "Date: Mon, 23 Nov 2026 12:00:00 +0000\r\n"
        f"{list_field}MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}"
    ).encode()


_HEADERS = BytesHeaderParser(policy=compat32)


def received_by(sink: Sink, address: str) -> list[Received]:
    return [m for m in sink.messages if address in m.rcpt_tos]


def subjects(sink: Sink, address: str) -> list[str]:
    return sorted(str(_HEADERS.parsebytes(m.data)["Subject"]) for m in received_by(sink, address))


def wait_received(sink: Sink, address: str, n: int = 1) -> list[str]:
    """Wait until ``address`` got ``n`` messages; their subjects."""
    assert wait_until(lambda: len(received_by(sink, address)) >= n), subjects(sink, address)
    return subjects(sink, address)


def suppress(relayd: Relayd, *args: str) -> None:
    out = relayd.cli("suppress", "add", *args)
    assert out.returncode == 0, out.stdout + out.stderr


def queue_state(relayd: Relayd, queue_id: str) -> dict[str, dict[str, Any]]:
    """``relayd queue show --json``: the message's recipients by address."""
    [row] = cli_json(relayd, "queue", "show", queue_id)
    return {r["address"]: r for r in row["recipients"]}


def dropped_events(relayd: Relayd, address: str) -> list[dict[str, Any]]:
    return [e for e in cli_json(relayd, "events", "--kind", "dropped") if e["address"] == address]


def refused(address: str, reason: str) -> tuple[int, str]:
    return 550, f"5.7.1 <{address}>: suppressed ({reason})"


# --- suppression: scopes and reasons ------------------------------------------------------------------------


@pytest.mark.parametrize("reason", REASONS)
def test_rcpt_refusal_names_the_suppression_reason(relayd: Relayd, sink: Sink, reason: str) -> None:
    blocked = f"reason-{reason}@example.test"
    suppress(relayd, blocked, "--scope", "global", "--reason", reason)
    tx = submit_each(relayd, make_message(f"reason {reason}"), to=[blocked, f"ok-{reason}@example.test"])
    assert tx.rcpt[blocked] == refused(blocked, reason)
    assert tx.rcpt[f"ok-{reason}@example.test"][0] == 250
    assert tx.data is not None and tx.data[0] == 250
    assert queue_state(relayd, tx.queue_id).keys() == {f"ok-{reason}@example.test"}


def test_global_suppression_blocks_every_account(relayd: Relayd) -> None:
    blocked = "global-1@example.test"
    suppress(relayd, blocked, "--scope", "global", "--reason", "hard_bounce")
    for user, sender in (("acme", ACME), ("other", OTHER)):
        tx = submit_each(
            relayd, make_message("global", sender=sender), to=[blocked], sender=sender, user=user
        )
        assert tx.rcpt[blocked] == refused(blocked, "hard_bounce"), user
        assert tx.data is None


def test_account_suppression_blocks_only_that_account(relayd: Relayd, sink: Sink) -> None:
    blocked = "acct-1@example.test"
    suppress(relayd, blocked, "--scope", "account", "--account", "acme", "--reason", "complaint")
    tx = submit_each(relayd, make_message("account acme"), to=[blocked])
    assert tx.rcpt[blocked] == refused(blocked, "complaint")
    tx = submit_each(
        relayd, make_message("account other", sender=OTHER), to=[blocked], sender=OTHER, user="other"
    )
    assert tx.rcpt[blocked][0] == 250 and tx.data is not None and tx.data[0] == 250
    assert wait_received(sink, blocked) == ["account other"]


def test_list_suppression_drops_the_recipient_at_data_for_that_list_only(relayd: Relayd, sink: Sink) -> None:
    unsub, kept = "list-unsub@example.test", "list-kept@example.test"
    suppress(
        relayd, unsub, "--scope", "list", "--account", "acme", "--list", "news", "--reason", "unsubscribe"
    )

    # the list is named in the message, so RCPT can't know it yet: accepted there, dropped at DATA
    tx = submit_each(relayd, make_message("news issue", list_id=NEWS), to=[unsub, kept])
    assert tx.rcpt[unsub][0] == 250 and tx.rcpt[kept][0] == 250
    assert tx.data is not None and tx.data[0] == 250
    qid = tx.queue_id
    assert queue_state(relayd, qid).keys() == {kept}
    [event] = dropped_events(relayd, unsub)
    assert (event["reason"], event["list"], event["account"], event["queue_id"]) == (
        "suppressed:unsubscribe",
        "news",
        "acme",
        qid,
    )

    # another list of the account, no list at all, and the same list name of another account: delivered
    submit_each(relayd, make_message("promo issue", list_id=PROMO), to=[unsub])
    submit_each(relayd, make_message("no list"), to=[unsub])
    other_news = make_message("other news", list_id="<news.other.example.test>", sender=OTHER)
    submit_each(relayd, other_news, to=[unsub], sender=OTHER, user="other")
    assert wait_received(sink, unsub, 3) == ["no list", "other news", "promo issue"]
    assert wait_received(sink, kept) == ["news issue"]


def test_list_suppression_of_every_recipient_refuses_the_message(relayd: Relayd, sink: Sink) -> None:
    a, b = "list-all-a@example.test", "list-all-b@example.test"
    suppress(
        relayd, a, b, "--scope", "list", "--account", "acme", "--list", "news", "--reason", "unsubscribe"
    )
    tx = submit_each(relayd, make_message("news to nobody", list_id=NEWS), to=[a, b])
    assert tx.data is not None
    code, text = tx.data
    assert code == 550 and text.startswith("5.7.1 "), tx.data
    assert {e["reason"] for e in dropped_events(relayd, a) + dropped_events(relayd, b)} == {
        "suppressed:unsubscribe"
    }
    assert received_by(sink, a) == [] and received_by(sink, b) == []


def test_expired_suppression_no_longer_blocks(relayd: Relayd, sink: Sink) -> None:
    expired, current = "expired-1@example.test", "current-1@example.test"
    now = datetime.now(UTC)
    csv_file = relayd.tmp / "expiry.csv"
    with csv_file.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["address", "scope", "account", "list", "reason", "created_at", "expires_at"])
        created = (now - timedelta(days=10)).isoformat()
        for address, expires in ((expired, now - timedelta(hours=1)), (current, now + timedelta(days=1))):
            w.writerow([address, "global", "", "", "soft_bounce_limit", created, expires.isoformat()])
    out = relayd.cli("suppress", "import", str(csv_file))
    assert out.returncode == 0 and "2 row(s) imported" in out.stdout, out.stdout + out.stderr
    tx = submit_each(relayd, make_message("after expiry"), to=[expired, current])
    assert tx.rcpt[current] == refused(current, "soft_bounce_limit")
    assert tx.rcpt[expired][0] == 250 and tx.data is not None and tx.data[0] == 250
    assert wait_received(sink, expired) == ["after expiry"]


# --- discard patterns and spam traps ------------------------------------------------------------------------


@pytest.mark.parametrize("address", ["someone@discard.example.test", "bounce-42@example.test"])
def test_global_discard_pattern_refuses_at_rcpt_for_every_account(relayd: Relayd, address: str) -> None:
    for user, sender in (("acme", ACME), ("other", OTHER)):
        tx = submit_each(
            relayd, make_message("discard", sender=sender), to=[address], sender=sender, user=user
        )
        assert tx.rcpt[address] == (550, f"5.7.1 <{address}>: recipient refused by policy (discard)"), user
    assert {e["reason"] for e in dropped_events(relayd, address)} == {"discard"}


def test_account_discard_pattern_refuses_only_for_that_account(relayd: Relayd, sink: Sink) -> None:
    address = "noreply@example.test"
    tx = submit_each(relayd, make_message("discard acme"), to=[address])
    assert tx.rcpt[address] == (550, f"5.7.1 <{address}>: recipient refused by policy (discard)")
    tx = submit_each(
        relayd, make_message("discard other", sender=OTHER), to=[address], sender=OTHER, user="other"
    )
    assert tx.rcpt[address][0] == 250 and tx.data is not None and tx.data[0] == 250
    assert wait_received(sink, address) == ["discard other"]


def test_spamtrap_is_accepted_at_rcpt_but_never_delivered(relayd: Relayd, sink: Sink) -> None:
    traps, real = ["trap@example.test", "anyone@traps.example.test"], "trap-neighbour@example.test"
    tx = submit_each(relayd, make_message("to a trap"), to=[*traps, real])
    assert all(tx.rcpt[t] == (250, "2.1.5 Ok") for t in traps), tx.rcpt
    assert tx.data is not None and tx.data[0] == 250
    # the trap is not even queued: nothing could ever deliver it
    assert queue_state(relayd, tx.queue_id).keys() == {real}
    assert wait_received(sink, real) == ["to a trap"]
    # a message to traps only gets the same answer as any other, and nothing is queued
    only = submit_each(relayd, make_message("traps only"), to=traps)
    assert only.data is not None and only.data[0] == 250
    shown = relayd.cli("queue", "show", only.queue_id, "--json")
    assert shown.returncode == 1 and "no such message" in shown.stderr
    for trap in traps:
        assert trap not in sink.handler.attempts
        events = dropped_events(relayd, trap)
        assert len(events) == 2 and {e["reason"] for e in events} == {"spamtrap"}


# --- re-check at dequeue ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scope", "args"),
    [
        ("global", ["--scope", "global", "--reason", "hard_bounce"]),
        ("account", ["--scope", "account", "--account", "acme", "--reason", "complaint"]),
        ("list", ["--scope", "list", "--account", "acme", "--list", "news", "--reason", "unsubscribe"]),
    ],
)
def test_recipient_suppressed_while_queued_is_dropped_at_dequeue(
    relayd: Relayd, sink: Sink, scope: str, args: list[str]
) -> None:
    address = f"dequeue-{scope}@example.test"
    sink.handler.script[address] = ["451 4.3.0 try again later"]  # then 451 again: never accepted anyway
    tx = submit_each(relayd, make_message(f"dequeue {scope}", list_id=NEWS), to=[address])
    qid = tx.queue_id
    assert wait_until(lambda: queue_state(relayd, qid)[address]["attempts"] == 1)
    assert queue_state(relayd, qid)[address]["state"] == "queued"

    suppress(relayd, address, *args)
    assert relayd.cli("queue", "retry", qid).returncode == 0
    assert wait_until(lambda: queue_state(relayd, qid)[address]["state"] == "dropped")

    assert sink.handler.attempts[address] == 1, "the retry must not reach the receiving server"
    assert received_by(sink, address) == []
    reason = args[-1]
    [event] = dropped_events(relayd, address)
    assert (event["reason"], event["queue_id"], event["account"]) == (f"suppressed:{reason}", qid, "acme")


# --- per-list send caps -------------------------------------------------------------------------------------


def test_day_cap_drops_the_second_message_of_a_list_to_the_same_recipient(relayd: Relayd, sink: Sink) -> None:
    capped, fresh = "cap-1@example.test", "cap-2@example.test"
    first = submit_each(relayd, make_message("news one", list_id=NEWS), to=[capped])
    assert first.data is not None and first.data[0] == 250
    assert wait_received(sink, capped) == ["news one"]

    second = submit_each(relayd, make_message("news two", list_id=NEWS), to=[capped, fresh])
    assert second.data is not None and second.data[0] == 250
    assert queue_state(relayd, second.queue_id).keys() == {fresh}
    [event] = dropped_events(relayd, capped)
    assert (event["reason"], event["list"], event["queue_id"]) == ("cap", "news", second.queue_id)

    # the cap is per list: another list (capped too) and no list at all still reach the recipient
    submit_each(relayd, make_message("promo one", list_id=PROMO), to=[capped])
    submit_each(relayd, make_message("no list"), to=[capped])
    # a third news message to the capped recipient alone: every recipient dropped, so DATA is refused
    third = submit_each(relayd, make_message("news three", list_id=NEWS), to=[capped])
    assert third.data is not None and third.data[0] == 550 and third.data[1].startswith("5.7.1 ")

    assert wait_received(sink, fresh) == ["news two"]
    assert wait_received(sink, capped, 3) == ["news one", "no list", "promo one"]


# --- suspension ---------------------------------------------------------------------------------------------
# Each test has a daemon of its own: a suspended acme would refuse every other test's mail.


def _mail_from(relayd: Relayd, user: str, sender: str) -> tuple[int, str]:
    with relayd.smtp() as s:
        s.login(user, PASSWORD)
        code, resp = s.mail(sender)
        return code, resp.decode()


def _account(relayd: Relayd, action: str, expect: str) -> None:
    out = relayd.cli("account", action, "acme")
    assert out.returncode == 0 and expect in out.stdout, out.stdout + out.stderr


def test_suspended_account_is_refused_at_mail_from_until_reinstated(
    tmp_path: Path, sink: Sink, fresh_store_config: str | None
) -> None:
    with _relayd(tmp_path, sink, fresh_store_config) as relayd:
        assert _mail_from(relayd, "acme", ACME)[0] == 250
        _account(relayd, "suspend", "account acme suspended")
        # the daemon re-reads suspensions every second
        assert wait_until(lambda: _mail_from(relayd, "acme", ACME) == (550, "5.7.1 account suspended"))
        assert _mail_from(relayd, "other", OTHER)[0] == 250
        _account(relayd, "reinstate", "account acme reinstated")
        assert wait_until(lambda: _mail_from(relayd, "acme", ACME)[0] == 250)


def test_queued_mail_is_held_while_suspended_and_delivered_after_reinstatement(
    tmp_path: Path, sink: Sink, fresh_store_config: str | None
) -> None:
    address = "suspend-held@example.test"
    sink.handler.script[address] = ["451 4.3.0 try again later", "250"]
    with _relayd(tmp_path, sink, fresh_store_config) as relayd:
        tx = submit_each(relayd, make_message("queued before suspension"), to=[address])
        qid = tx.queue_id
        assert wait_until(lambda: queue_state(relayd, qid)[address]["attempts"] == 1)

        _account(relayd, "suspend", "1 queued recipient(s) held")
        assert queue_state(relayd, qid)[address]["state"] == "held"
        # a retry does not send held mail; a later delivery for another account shows that the scheduler
        # has scanned the queue since
        assert relayd.cli("queue", "retry", qid).returncode == 0
        witness = "suspend-witness@example.test"
        submit_each(relayd, make_message("witness", sender=OTHER), to=[witness], sender=OTHER, user="other")
        wait_received(sink, witness)
        assert queue_state(relayd, qid)[address]["state"] == "held"
        assert sink.handler.attempts[address] == 1 and received_by(sink, address) == []

        _account(relayd, "reinstate", "1 held recipient(s) released")
        assert wait_until(lambda: len(received_by(sink, address)) == 1, timeout=10), (
            "released mail not delivered; queue state now: "
            f"{queue_state(relayd, qid)[address]['state']} (held again by a stale suspension cache?)"
        )
        assert subjects(sink, address) == ["queued before suspension"]
        assert queue_state(relayd, qid)[address]["state"] == "delivered"
