"""End to end: what comes back (DSN, ARF, one-click) changes what goes out, through a real daemon."""

from __future__ import annotations

import email
import json
import smtplib
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import PASSWORD, Relayd, Sink, message, wait_until

INBOUND = "bounces.example.test"


@pytest.fixture(scope="module")
def peers(
    tmp_path_factory: pytest.TempPathFactory, store_config: str | None
) -> Iterator[tuple[Relayd, Sink]]:
    """Runs once on SQLite and once on PostgreSQL (every inbound behaviour must hold on both backends)."""
    with Sink() as sink:
        tmp = tmp_path_factory.mktemp("feedback")
        with Relayd(tmp, routes={"example.test": sink.port}, store=store_config) as relayd:
            yield relayd, sink


def _deliver(
    relayd: Relayd, sink: Sink, rcpt: str, *, list_id: str | None = None, user: str = "acme"
) -> bytes:
    """Submit one message and return the bytes the sink received for ``rcpt``."""
    before = sum(1 for m in sink.messages if m.rcpt_tos == [rcpt])
    extra = f"List-Id: <{list_id}.acme.example.test>\r\n" if list_id else ""
    sender = "app@acme.example.test" if user == "acme" else "app@other.example.test"
    msg = message(f"for {rcpt}").replace(b"MIME-Version", extra.encode() + b"MIME-Version", 1)
    code, resp = relayd.submit(msg, to=[rcpt], sender=sender, user=user)
    assert code == 250, resp
    assert wait_until(lambda: sum(1 for m in sink.messages if m.rcpt_tos == [rcpt]) == before + 1)
    return [m for m in sink.messages if m.rcpt_tos == [rcpt]][-1].data


def _verp(sink: Sink, rcpt: str) -> str:
    return [m for m in sink.messages if m.rcpt_tos == [rcpt]][-1].mail_from


def _send_inbound(relayd: Relayd, to: str, body: bytes, sender: str = "") -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", relayd.inbound_port, timeout=30) as s:
        s.ehlo("mx.receiver.test")
        code, resp = s.docmd("MAIL", f"FROM:<{sender}>")
        assert code == 250, resp
        code, resp = s.rcpt(to)
        if code != 250:
            return code, resp
        return s.data(body)


def _dsn(rcpt: str, original: bytes, status: str = "5.1.1", diag: str = "550 5.1.1 user unknown") -> bytes:
    headers = original.split(b"\r\n\r\n", 1)[0]
    return (
        b"From: MAILER-DAEMON@mx.receiver.test\r\nTo: bounce@x\r\n"
        b"Subject: Undelivered Mail Returned to Sender\r\n"
        b"Message-ID: <dsn-" + rcpt.encode() + b"@mx.receiver.test>\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="b1"\r\n\r\n'
        b"--b1\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
        b"--b1\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.receiver.test\r\n\r\n"
        b"Final-Recipient: rfc822; "
        + rcpt.encode()
        + b"\r\nAction: failed\r\nStatus: "
        + status.encode()
        + b"\r\nDiagnostic-Code: smtp; "
        + diag.encode()
        + b"\r\n\r\n"
        b"--b1\r\nContent-Type: text/rfc822-headers\r\n\r\n" + headers + b"\r\n\r\n--b1--\r\n"
    )


def _arf(rcpt: str, original: bytes) -> bytes:
    headers = original.split(b"\r\n\r\n", 1)[0]
    return (
        b"From: fbl@isp.test\r\nTo: abuse@bounces.example.test\r\nSubject: complaint\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=feedback-report; boundary="b2"\r\n\r\n'
        b"--b2\r\nContent-Type: text/plain\r\n\r\nThis is an abuse report.\r\n"
        b"--b2\r\nContent-Type: message/feedback-report\r\n\r\n"
        b"Feedback-Type: abuse\r\nUser-Agent: isp-fbl/1.0\r\n"
        b"Version: 1\r\nOriginal-Rcpt-To: " + rcpt.encode() + b"\r\nSource-IP: 127.0.0.1\r\n\r\n"
        b"--b2\r\nContent-Type: text/rfc822-headers\r\n\r\n" + headers + b"\r\n\r\n--b2--\r\n"
    )


def _suppressions(relayd: Relayd, address: str) -> list[dict[str, object]]:
    out = relayd.cli("suppress", "list", "--json", "--address", address)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def _rcpt_reply(relayd: Relayd, rcpt: str, user: str = "acme") -> tuple[int, bytes]:
    with relayd.smtp() as s:
        s.login(user, PASSWORD)
        s.mail("app@acme.example.test" if user == "acme" else "app@other.example.test")
        return s.rcpt(rcpt)


def test_dsn_to_verp_address_suppresses_globally(peers: tuple[Relayd, Sink]) -> None:
    relayd, sink = peers
    rcpt = "gone@example.test"
    original = _deliver(relayd, sink, rcpt)
    verp = _verp(sink, rcpt)
    assert _send_inbound(relayd, verp, _dsn(rcpt, original))[0] == 250
    assert wait_until(lambda: bool(_suppressions(relayd, rcpt)))
    [entry] = _suppressions(relayd, rcpt)
    assert (entry["scope"], entry["reason"]) == ("global", "hard_bounce")
    for user in ("acme", "other"):  # global: every account
        code, resp = _rcpt_reply(relayd, rcpt, user)
        assert code == 550 and b"suppressed (hard_bounce)" in resp


def test_forged_dsn_suppresses_nobody(peers: tuple[Relayd, Sink]) -> None:
    relayd, sink = peers
    rcpt = "victim@example.test"
    original = _deliver(relayd, sink, rcpt)
    real = _verp(sink, rcpt)
    local, domain = real.split("@")
    forged_mac = local[:-4] + ("aaaa" if not local.endswith("aaaa") else "bbbb")
    # a forger has no valid token: tamper with the trace header the returned headers carry
    tampered = original.replace(b"X-Relayd-ID: ", b"X-Relayd-ID: x", 1)
    for to in (f"{forged_mac}@{domain}", f"bounce@{INBOUND}", f"bounce+{'a' * 16}-0-{'b' * 16}@{INBOUND}"):
        code, _ = _send_inbound(relayd, to, _dsn(rcpt, tampered))
        assert code in (250, 550)
    # a genuine token replayed in a DSN about another address suppresses neither address
    assert _send_inbound(relayd, real, _dsn("someone-else@example.test", original))[0] == 250
    events = relayd.cli("events", "--json", "--kind", "unattributed").stdout
    assert events.strip()
    assert _suppressions(relayd, rcpt) == []
    assert _suppressions(relayd, "someone-else@example.test") == []
    assert _rcpt_reply(relayd, rcpt)[0] == 250


def test_arf_complaint_suppresses_for_that_account_only(peers: tuple[Relayd, Sink]) -> None:
    relayd, sink = peers
    rcpt = "annoyed@example.test"
    original = _deliver(relayd, sink, rcpt)
    assert b"X-Relayd-ID: " in original
    assert _send_inbound(relayd, f"abuse@{INBOUND}", _arf(rcpt, original), sender="fbl@isp.test")[0] == 250
    assert wait_until(lambda: bool(_suppressions(relayd, rcpt)))
    [entry] = _suppressions(relayd, rcpt)
    assert (entry["scope"], entry["account"], entry["reason"]) == ("account", "acme", "complaint")
    code, resp = _rcpt_reply(relayd, rcpt, "acme")
    assert code == 550 and b"suppressed (complaint)" in resp
    assert _rcpt_reply(relayd, rcpt, "other")[0] == 250


def test_one_click_post_unsubscribes_from_that_list(peers: tuple[Relayd, Sink]) -> None:
    relayd, sink = peers
    rcpt = "reader@example.test"
    delivered = _deliver(relayd, sink, rcpt, list_id="news")
    parsed = email.message_from_bytes(delivered)
    assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    url = parsed["List-Unsubscribe"].split("<", 1)[1].split(">", 1)[0]
    assert url.startswith(f"http://127.0.0.1:{relayd.http_port}/u/")
    body = urllib.parse.urlencode({"List-Unsubscribe": "One-Click"}).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=10) as r:
        assert r.status == 200
    [entry] = _suppressions(relayd, rcpt)
    assert (entry["scope"], entry["account"], entry["list"], entry["reason"]) == (
        "list",
        "acme",
        "news",
        "unsubscribe",
    )
    # the next message on that list is dropped (every recipient dropped -> 550); another list still goes
    code, resp = relayd.submit(
        message("again").replace(b"MIME-Version", b"List-Id: <news.acme.example.test>\r\nMIME-Version", 1),
        to=[rcpt],
    )
    assert code == 550 and b"suppressed:unsubscribe" in resp
    _deliver(relayd, sink, rcpt, list_id="offers")


def test_complaints_past_the_rate_suspend_the_account(
    tmp_path: Path, sink: Sink, fresh_store_config: str | None
) -> None:
    thresholds = "[policy.thresholds]\nminimum_sent = 5\ncomplaint_suspend = 0.1\ncomplaint_warn = 0.05\n"
    with Relayd(
        tmp_path, routes={"example.test": sink.port}, extra=thresholds, store=fresh_store_config
    ) as relayd:
        delivered = {f"r{i}@example.test": _deliver(relayd, sink, f"r{i}@example.test") for i in range(8)}
        # one complaint in 8 sent is 12.5 %, past the (test) suspend rate of 10 %
        arf = _arf("r0@example.test", delivered["r0@example.test"])
        assert _send_inbound(relayd, f"abuse@{INBOUND}", arf, sender="fbl@isp.test")[0] == 250

        def refused() -> bool:
            with relayd.smtp() as s:
                s.login("acme", PASSWORD)
                code, resp = s.mail("app@acme.example.test")
                return code == 550 and b"account suspended" in resp

        assert wait_until(refused, timeout=10)
        events = [
            json.loads(line)
            for line in relayd.cli("events", "--json", "--kind", "suspended").stdout.splitlines()
        ]
        assert len(events) == 1 and events[0]["account"] == "acme"
        figures = events[0]["evidence"]
        assert figures["sent"] == 8 and figures["complaints"] == 1 and figures["threshold"] == 0.1
        assert figures["complaint_rate"] == 0.125
        show = json.loads(relayd.cli("account", "show", "acme", "--json").stdout)
        assert show["suspended"] is True and show["rates"]["complaints"] == 1
