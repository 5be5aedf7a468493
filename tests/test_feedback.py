"""Attribution and effects of bounces, complaints and mailto unsubscribes (relayd.feedback.service.Feedback),
on a real SqliteStore and QueueStore. Report bodies are corpus samples with their recipient rewritten to
ours, or RFC 3464/5965 reports built here when a test needs one exact field."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from relayd.config import Config
from relayd.core.tokens import make_token, new_queue_id, verp_token
from relayd.feedback.service import Feedback
from relayd.queue.store import NewMessage, QueueStore
from relayd.store import Event, Reason, Scope, SentRecord, SqliteStore, SuppressionEntry
from tests.corpus import CORPUS

SECRET = b"feedback-test-secret-0123456789abcdef"
INBOUND = "bounces.example.test"
T0 = datetime(2026, 2, 1, 12, 0, tzinfo=UTC)


def make_config(**thresholds: float) -> Config:
    return Config.model_validate(
        {
            "server": {"hostname": "relayd.test"},
            "inbound": {"domains": [INBOUND], "listen": ["127.0.0.1:0"]},
            "policy": {"soft_bounce_limit": 3, "soft_bounce_window": "30d", "thresholds": thresholds},
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


@dataclass
class Env:
    store: SqliteStore
    queue: QueueStore
    cfg: Config
    tmp: Path

    @property
    def feedback(self) -> Feedback:
        """The object under test, built as the daemon builds it, with the current ``cfg``."""
        return Feedback(self.store, self.queue, SECRET, self.cfg)

    async def sent(
        self, address: str, account: str = "acme", list_name: str | None = "news", at: datetime = T0
    ) -> Msg:
        """Record one accepted recipient in the ledger, as the pipeline does, and return its tokens."""
        qid = new_queue_id()
        await self.store.record_sent([SentRecord(qid, 0, account, list_name, address, at)])
        return Msg(qid, 0, account, list_name, address)

    async def queued(self, address: str, account: str = "acme", list_name: str | None = "news") -> str:
        qid = new_queue_id()
        await self.queue.enqueue(
            NewMessage(
                qid, account, f"app@{account}.example.test", (address,), b"Subject: x\r\n\r\nx\r\n", list_name
            )
        )
        return qid

    async def events(self, kind: str | None = None) -> list[Event]:
        return await self.store.events(T0 - timedelta(days=400), kind=kind, limit=10_000)

    async def suppressed(self, address: str) -> list[tuple[Scope, str | None, str | None, Reason]]:
        return [
            (e.scope, e.account, e.list, e.reason) for e in await self.store.list_entries(address=address)
        ]


@dataclass(frozen=True)
class Msg:
    queue_id: str
    index: int
    account: str
    list_name: str | None
    address: str

    def token(self, purpose: str) -> str:
        return make_token(SECRET, purpose, self.queue_id, self.index, self.address)

    @property
    def verp(self) -> str:
        return f"bounce+{self.token('verp')}@{INBOUND}"


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    store = SqliteStore(tmp_path / "relayd.db")
    queue = QueueStore(tmp_path / "queue.db")
    await store.open()
    await queue.open()
    try:
        yield Env(store, queue, make_config(), tmp_path)
    finally:
        await queue.close()
        await store.close()


# --- report builders --------------------------------------------------------------------------------------


def corpus(name: str, old: str, new: str) -> bytes:
    """A corpus sample with every spelling of its recipient replaced by ours."""
    raw = (CORPUS / name).read_bytes()
    return re.sub(re.escape(old).encode(), new.encode(), raw, flags=re.IGNORECASE)


def dsn_report(
    rcpt: str,
    *,
    status: str = "5.1.1",
    diagnostic: str = "smtp; 550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown",
    action: str = "failed",
    original_headers: str = "",
    to: str = "bounce@example.invalid",
) -> bytes:
    """An RFC 3464 report as Postfix writes it."""
    diag = diagnostic.format(rcpt=rcpt)
    return (
        f"From: MAILER-DAEMON@mx.remote.example (Mail Delivery System)\r\n"
        f"To: {to}\r\n"
        f"Subject: Undelivered Mail Returned to Sender\r\n"
        f"Message-ID: <dsn-{abs(hash((rcpt, status, action)))}@mx.remote.example>\r\n"
        f"MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="BB"\r\n'
        f"\r\n--BB\r\nContent-Type: text/plain\r\n\r\nI'm sorry to have to inform you...\r\n"
        f"\r\n--BB\r\nContent-Type: message/delivery-status\r\n\r\n"
        f"Reporting-MTA: dns; mx.remote.example\r\nArrival-Date: Sun, 1 Feb 2026 12:00:00 +0000\r\n\r\n"
        f"Final-Recipient: rfc822; {rcpt}\r\nOriginal-Recipient: rfc822;{rcpt}\r\nAction: {action}\r\n"
        f"Status: {status}\r\nRemote-MTA: dns; mx2.remote.example\r\nDiagnostic-Code: {diag}\r\n"
        f"\r\n--BB\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: News <news@acme.example.test>\r\nTo: {rcpt}\r\nSubject: Our news\r\n{original_headers}"
        f"\r\n--BB--\r\n"
    ).encode()


def arf_report(rcpt: str | None, *, relayd_id: str | None, feedback_type: str = "abuse") -> bytes:
    """An RFC 5965 report from a mailbox provider's feedback loop."""
    rcpt_line = f"Original-Rcpt-To: {rcpt}\r\n" if rcpt else ""
    trace = f"X-Relayd-ID: {relayd_id}\r\n" if relayd_id else ""
    return (
        "From: fbl@provider.example\r\nTo: fbl@bounces.example.test\r\nSubject: FW: Our news\r\n"
        "Message-ID: <arf-1@provider.example>\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="AA"\r\n\r\n'
        "--AA\r\nContent-Type: text/plain\r\n\r\nThis is an email abuse report.\r\n\r\n"
        "--AA\r\nContent-Type: message/feedback-report\r\n\r\n"
        f"Feedback-Type: {feedback_type}\r\nUser-Agent: ProviderFBL/1.0\r\nVersion: 1\r\n"
        f"Original-Mail-From: <bounce@bounces.example.test>\r\n{rcpt_line}"
        "Source-IP: 192.0.2.10\r\nReported-Domain: acme.example.test\r\n\r\n"
        "--AA\r\nContent-Type: message/rfc822\r\n\r\n"
        f"From: News <news@acme.example.test>\r\nTo: {rcpt or 'redacted@provider.example'}\r\n"
        f"Subject: Our news\r\nMessage-ID: <orig-1@acme.example.test>\r\n{trace}\r\nHello\r\n\r\n--AA--\r\n"
    ).encode()


# --- DSN: attribution -------------------------------------------------------------------------------------


async def test_hard_bounce_to_verp_address_suppresses_exactly_that_address(env: Env) -> None:
    m = await env.sent("kijitora@example.co.jp")
    other = await env.sent("bystander@example.co.jp")
    raw = corpus("dsn/lhost-postfix-04.eml", "kijitora@example.co.jp", m.address)
    events = await env.feedback.on_dsn(raw, verp_token(m.verp), T0)
    assert [e.kind for e in events] == ["hard_bounce", "suppressed"]
    hb = events[0]
    assert (hb.account, hb.list, hb.address, hb.reason, hb.queue_id) == (
        "acme",
        "news",
        m.address,
        "userunknown",
        m.queue_id,
    )
    evidence = json.loads(hb.evidence)
    assert (
        evidence["status"] == "5.1.1" and evidence["token"] == "verp" and evidence["found_in"] == "envelope"
    )
    assert "diagnostic" in evidence and evidence["report"] == "dsn"
    assert await env.suppressed(m.address) == [(Scope.GLOBAL, None, None, Reason.HARD_BOUNCE)]
    assert await env.suppressed(other.address) == []
    assert set(await env.store.check([m.address], "other", None, T0)) == {m.address}  # global: every account


@pytest.mark.parametrize(
    "how",
    ["no-token", "bad-mac", "token-for-another-address", "unknown-queue-id", "wrong-purpose"],
)
async def test_forged_dsn_suppresses_nobody_and_is_unattributed(env: Env, how: str) -> None:
    victim = "victim@example.net"
    await env.sent(victim)
    mine = await env.sent("attacker@example.net")
    raw = dsn_report(victim)
    token: str | None
    if how == "no-token":
        token = None
    elif how == "bad-mac":
        real = await env.sent("victim2@example.net")
        token = real.token("verp")[:-4] + "aaaa"
        raw = dsn_report(real.address)
    elif how == "token-for-another-address":
        token = mine.token("verp")  # a genuine token, replayed in a DSN about someone else
    elif how == "unknown-queue-id":
        token = make_token(SECRET, "verp", new_queue_id(), 0, victim)
    else:
        real = await env.sent("victim3@example.net")
        token = real.token("unsub")
        raw = dsn_report(real.address)
    events = await env.feedback.on_dsn(raw, token, T0)
    assert [e.kind for e in events] == ["unattributed"]
    assert events[0].account is None and events[0].address is None and events[0].reason == "dsn"
    assert await env.store.count() == 0
    assert [e.kind for e in await env.events()] == ["unattributed"]


async def test_dsn_without_envelope_token_attributed_by_trace_header_in_original(env: Env) -> None:
    m = await env.sent("user@example.org")
    raw = dsn_report(m.address, original_headers=f"X-Relayd-ID: {m.token('trace')}\r\n")
    events = await env.feedback.on_dsn(raw, None, T0)
    assert [e.kind for e in events] == ["hard_bounce", "suppressed"]
    assert json.loads(events[0].evidence)["token"] == "trace"


async def test_dsn_without_envelope_token_attributed_by_verp_return_path_in_original(env: Env) -> None:
    m = await env.sent("user@example.org")
    raw = dsn_report(m.address, original_headers=f"Return-Path: <{m.verp}>\r\n")
    events = await env.feedback.on_dsn(raw, None, T0)
    assert [e.kind for e in events][:1] == ["hard_bounce"]


async def test_dsn_about_address_we_never_mailed(env: Env) -> None:
    raw = corpus("dsn/lhost-sendmail-14.eml", "kijitora@example.com", "never@example.com")
    token = make_token(SECRET, "verp", new_queue_id(), 0, "never@example.com")
    events = await env.feedback.on_dsn(raw, token, T0)
    assert [(e.kind, json.loads(e.evidence)["why"]) for e in events] == [("unattributed", "unknown message")]
    assert await env.store.count() == 0


# --- DSN: effects -----------------------------------------------------------------------------------------


async def test_soft_bounces_reach_the_limit(env: Env) -> None:
    address = "shiba@example.com"
    kinds = []
    for day in range(3):
        m = await env.sent(address, at=T0 + timedelta(days=day))
        raw = corpus("dsn/lhost-exim-07.eml", "shiba@example.com", address)
        events = await env.feedback.on_dsn(raw, m.token("verp"), T0 + timedelta(days=day, hours=1))
        kinds.append([(e.kind, e.reason) for e in events])
        if day < 2:
            assert await env.suppressed(address) == []
    assert kinds[0] == [("soft_bounce", "mailboxfull")]
    assert kinds[2] == [("soft_bounce", "mailboxfull"), ("suppressed", "soft_bounce_limit")]
    assert await env.suppressed(address) == [(Scope.GLOBAL, None, None, Reason.SOFT_BOUNCE_LIMIT)]


async def test_soft_bounces_outside_the_window_do_not_add_up(env: Env) -> None:
    address = "slow@example.com"
    for day in (0, 40, 80):  # window 30 d: never 3 within it
        m = await env.sent(address, at=T0 + timedelta(days=day))
        raw = dsn_report(address, status="4.2.2", diagnostic="smtp; 452 4.2.2 Mailbox full")
        await env.feedback.on_dsn(raw, m.token("verp"), T0 + timedelta(days=day))
    assert await env.suppressed(address) == []
    assert len(await env.events("soft_bounce")) == 3


@pytest.mark.parametrize(
    ("sample", "old", "reason"),
    [
        ("dsn/lhost-postfix-58.eml", "neko-1718501322@gmail.com", "badreputation"),
        ("dsn/lhost-exim-55.eml", "kijitora@example.com", "spamdetected"),
        ("dsn/lhost-postfix-66.eml", "kijitora@aol.example.jp", "policyviolation"),
    ],
    ids=["badreputation", "spamdetected", "policyviolation"],
)
async def test_permanent_failure_about_the_sender_suppresses_nobody(
    env: Env, sample: str, old: str, reason: str
) -> None:
    m = await env.sent("rcpt@example.net")
    raw = corpus(sample, old, m.address)
    events = await env.feedback.on_dsn(raw, m.token("verp"), T0)
    assert [(e.kind, e.reason) for e in events] == [("bounce", reason)]
    assert events[0].account == "acme"
    assert await env.store.count() == 0


async def test_delayed_and_delivered_are_events_only(env: Env) -> None:
    m = await env.sent("later@example.net")
    delayed = dsn_report(m.address, status="4.4.1", action="delayed", diagnostic="smtp; 421 try later")
    events = await env.feedback.on_dsn(delayed, m.token("verp"), T0)
    assert [e.kind for e in events] == ["delayed"]
    delivered = dsn_report(m.address, status="2.0.0", action="delivered", diagnostic="smtp; 250 ok")
    events = await env.feedback.on_dsn(delivered, m.token("verp"), T0)
    assert [e.kind for e in events] == ["delivered"]
    assert await env.store.count() == 0


async def test_auto_reply_to_return_path_is_noted_not_acted_on(env: Env) -> None:
    m = await env.sent("holiday@example.net")
    raw = (CORPUS / "other/rfc3834-01.eml").read_bytes()
    events = await env.feedback.on_dsn(raw, m.token("verp"), T0)
    assert [e.kind for e in events] == ["autoreply"]
    assert await env.store.count() == 0


async def test_own_synchronous_5xx_suppresses_like_a_dsn(env: Env) -> None:
    qid = new_queue_id()
    events = await env.feedback.on_delivery_failure(
        SentRecord(qid, 0, "acme", "news", "gone@example.net", T0),
        code=550,
        enhanced="5.1.1",
        text="<gone@example.net>: Recipient address rejected: User unknown in virtual mailbox table",
        command="RCPT",
        now=T0,
    )
    assert [(e.kind, e.reason) for e in events] == [
        ("hard_bounce", "userunknown"),
        ("suppressed", "hard_bounce"),
    ]
    events = await env.feedback.on_delivery_failure(
        SentRecord(qid, 0, "acme", "news", "blocked@example.net", T0),
        code=554,
        enhanced="5.7.1",
        text="Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org",
        command="RCPT",
        now=T0,
    )
    assert [e.kind for e in events] == ["bounce"]
    assert await env.suppressed("blocked@example.net") == []


async def test_hard_bounce_keeps_an_existing_global_entry(env: Env) -> None:
    m = await env.sent("manual@example.net")
    await env.store.add(
        [SuppressionEntry(m.address, Scope.GLOBAL, None, None, Reason.MANUAL, "operator", T0)]
    )
    events = await env.feedback.on_dsn(dsn_report(m.address), m.token("verp"), T0)
    assert [e.kind for e in events] == ["hard_bounce"]
    assert await env.suppressed(m.address) == [(Scope.GLOBAL, None, None, Reason.MANUAL)]


# --- complaints -------------------------------------------------------------------------------------------


async def test_arf_with_our_trace_id_suppresses_for_the_account_and_drops_queued(env: Env) -> None:
    m = await env.sent("complainer@example.com")
    qid = await env.queued(m.address)
    other_account = await env.queued(m.address, account="other", list_name=None)
    events = await env.feedback.on_arf(arf_report(m.address, relayd_id=m.token("trace")), T0)
    assert [(e.kind, e.reason) for e in events] == [("complaint", "abuse"), ("suppressed", "complaint")]
    assert json.loads(events[0].evidence)["source_ip"] == "192.0.2.10"
    assert await env.suppressed(m.address) == [(Scope.ACCOUNT, "acme", None, Reason.COMPLAINT)]
    row = await env.queue.show(qid)
    assert row is not None and row.recipients[0].state == "dropped"
    kept = await env.queue.show(other_account)
    assert kept is not None and kept.recipients[0].state == "queued"  # another account's mail is theirs


async def test_corpus_arf_rewritten_to_us_is_attributed(env: Env) -> None:
    m = await env.sent("kijitora@y.example.com")
    raw = (CORPUS / "arf/arf-14.eml").read_bytes()
    raw = raw.replace(b"Feedback-ID: 2\n", f"Feedback-ID: 2\nX-Relayd-ID: {m.token('trace')}\n".encode())
    events = await env.feedback.on_arf(raw, T0)
    assert [e.kind for e in events] == ["complaint", "suppressed"]


@pytest.mark.parametrize("how", ["no-token", "bad-mac", "other-address"])
async def test_arf_without_valid_token_does_nothing(env: Env, how: str) -> None:
    m = await env.sent("someone@example.com")
    token = {
        "no-token": None,
        "bad-mac": m.token("trace")[:-2] + "zz",
        "other-address": make_token(SECRET, "trace", m.queue_id, 0, "else@example.com"),
    }[how]
    events = await env.feedback.on_arf(arf_report(m.address, relayd_id=token), T0)
    assert [(e.kind, e.reason) for e in events] == [("unattributed", "arf")]
    assert await env.store.count() == 0


async def test_duplicate_complaint_counts_once(env: Env) -> None:
    m = await env.sent("twice@example.com")
    raw = arf_report(m.address, relayd_id=m.token("trace"))
    await env.feedback.on_arf(raw, T0)
    events = await env.feedback.on_arf(raw, T0 + timedelta(minutes=5))
    assert [e.kind for e in events] == ["complaint"]  # the same report again: counted on its event
    assert [e.count for e in await env.events("complaint")] == [2]
    other_copy = await env.sent(m.address)  # another message to the same person, reported too
    raw = arf_report(m.address, relayd_id=other_copy.token("trace"))
    events = await env.feedback.on_arf(raw, T0 + timedelta(minutes=6))
    assert [e.kind for e in events] == ["complaint_duplicate"]
    assert await env.store.count_events("complaint", T0 - timedelta(days=1), account="acme") == 1


async def test_auth_failure_report_is_feedback_not_a_complaint(env: Env) -> None:
    m = await env.sent("auth@example.com")
    raw = arf_report(m.address, relayd_id=m.token("trace"), feedback_type="auth-failure")
    events = await env.feedback.on_arf(raw, T0)
    assert [(e.kind, e.reason) for e in events] == [("feedback", "auth-failure")]
    assert await env.store.count() == 0


def forwarded_complaint(body_token_line: str) -> bytes:
    """A human forwarding our mail to abuse@ with their mail client: quoted-printable, quoted headers."""
    return (
        "From: Angry Person <angry@example.org>\r\nTo: abuse@bounces.example.test\r\n"
        "Subject: Fwd: Our news -- I never signed up for this!\r\nMessage-ID: <fwd-1@example.org>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        "Stop sending me this.\r\n\r\n-------- Forwarded Message --------\r\n"
        "Subject: Our news\r\nFrom: News <news@acme.example.test>\r\n\r\n"
        f"Hello!\r\n{body_token_line}\r\n"
    ).encode()


async def test_plain_forwarded_complaint_with_our_unsubscribe_link_is_attributed(env: Env) -> None:
    m = await env.sent("angry@example.org")
    raw = forwarded_complaint(f"Unsubscribe: http://127.0.0.1:8025/u/{m.token('unsub')}")
    events = await env.feedback.on_arf(raw, T0)
    assert [(e.kind, e.reason) for e in events] == [("complaint", "forwarded"), ("suppressed", "complaint")]
    assert await env.suppressed(m.address) == [(Scope.ACCOUNT, "acme", None, Reason.COMPLAINT)]


async def test_plain_forwarded_complaint_without_token_is_unattributed(env: Env) -> None:
    await env.sent("angry@example.org")
    events = await env.feedback.on_arf(forwarded_complaint("Bye"), T0)
    assert [e.kind for e in events] == ["unattributed"]
    assert await env.store.count() == 0


# --- unsubscribe by mail ----------------------------------------------------------------------------------


async def test_mailto_unsubscribe_suppresses_the_list_and_drops_queued(env: Env) -> None:
    m = await env.sent("reader@example.com")
    in_list = await env.queued(m.address)
    other_list = await env.queued(m.address, list_name="promo")
    raw = b"From: reader@example.com\r\nSubject: unsubscribe\r\n\r\n"
    events = await env.feedback.on_unsubscribe_mail(raw, m.token("unsub"), T0)
    assert [(e.kind, e.reason) for e in events] == [("unsubscribed", "unsubscribe")]
    again = await env.feedback.on_unsubscribe_mail(raw, m.token("unsub"), T0)
    assert again == []  # already unsubscribed: kept as it was
    assert await env.suppressed(m.address) == [(Scope.LIST, "acme", "news", Reason.UNSUBSCRIBE)]
    a, b = await env.queue.show(in_list), await env.queue.show(other_list)
    assert a is not None and a.recipients[0].state == "dropped"
    assert b is not None and b.recipients[0].state == "queued"


async def test_mailto_unsubscribe_without_list_is_account_scope(env: Env) -> None:
    m = await env.sent("reader@example.com", list_name=None)
    await env.feedback.on_unsubscribe_mail(b"\r\n", m.token("unsub"), T0)
    assert await env.suppressed(m.address) == [(Scope.ACCOUNT, "acme", None, Reason.UNSUBSCRIBE)]


async def test_mailto_unsubscribe_with_a_verp_token_is_refused(env: Env) -> None:
    m = await env.sent("reader@example.com")
    events = await env.feedback.on_unsubscribe_mail(b"\r\n", m.token("verp"), T0)
    assert [e.kind for e in events] == ["unattributed"]
    assert await env.store.count() == 0


# --- hostile input ----------------------------------------------------------------------------------------


def _junk_reports(address: str, trace: str) -> dict[str, bytes]:
    big = b"A" * 76 + b"\r\n"
    return {
        "truncated-mime": dsn_report(address)[:400],
        "binary-junk": bytes(range(256)) * 64,
        "empty": b"",
        "5mb-attachment": dsn_report(address).replace(
            b"--BB--",
            b"--BB\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + big * (5_000_000 // len(big))
            + b"--BB--",
        ),
        "token-stuffed": b"Subject: x\r\n\r\n"
        # every one-character change of the real token (never the real one: that would be a valid report)
        + b"".join(
            f"X-Relayd-ID: {trace[:-1]}{c}\n".encode()
            for c in "abcdefghijklmnopqrstuvwxyz234567"
            if c != trace[-1]
        ),
        "nul-and-8bit": b"From: \x00\xff\xfe\r\n"
        b'Content-Type: multipart/report; boundary="\x00"\r\n\r\n\xc3\x28',
    }


@pytest.mark.parametrize(
    "name", ["truncated-mime", "binary-junk", "empty", "5mb-attachment", "token-stuffed", "nul-and-8bit"]
)
async def test_malformed_reports_never_raise_and_never_suppress(env: Env, name: str) -> None:
    m = await env.sent("target@example.com")
    raw = _junk_reports("other@example.com", m.token("trace"))[name]
    await env.feedback.on_dsn(raw, None, T0)
    await env.feedback.on_arf(raw, T0)
    await env.feedback.on_unsubscribe_mail(raw, "x" * 16 + "-0-" + "y" * 16, T0)
    assert await env.store.count() == 0
    assert {e.kind for e in await env.events()} <= {"unattributed"}
