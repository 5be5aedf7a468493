"""Hostile clients: slowloris, password guessing, abuse inputs, report floods.

Raw sockets throughout, so nothing on the client side normalises or limits what we send. Each abuse gets a
clear reply and relayd keeps serving a legitimate client; memory figures are in ``bench/hostile.py``.
"""

from __future__ import annotations

import contextlib
import http.client
import resource
import secrets
import smtplib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import PASSWORD, Relayd, Sink, message, wait_until
from tests.rawsmtp import auth_plain, closed, connect, ehlo, nested_mime, replies

SOURCES = [f"127.0.0.{i}" for i in range(3, 23)]  # 20 attacking addresses; the good client is 127.0.0.2
GOOD = "127.0.0.2"


def submit_from(relayd: Relayd, source: str, *, user: str = "acme", password: str = PASSWORD) -> str:
    """One authenticated submission from ``source``; the DATA reply."""
    with smtplib.SMTP("127.0.0.1", relayd.port, timeout=10, source_address=(source, 0)) as s:
        s.login(user, password)
        assert s.mail(f"app@{user}.example.test")[0] == 250
        assert s.rcpt("bob@example.test")[0] == 250
        code, text = s.data(message(sender=f"app@{user}.example.test"))
        return f"{code} {text.decode()}"


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Relayd, Sink]]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))  # relayd inherits it
    extra = (
        "max_connections = 3000\nmax_connections_per_ip = 100\nmax_recipients = 100\nmax_errors = 20\n"
        'command_timeout = "60s"\nauth_failure_delay = "0.05s"\nauth_max_failures = 5\n'
        "auth_account_max_failures = 8\n"
    )
    with Sink() as sink:
        relayd = Relayd(
            tmp_path_factory.mktemp("hostile"),
            routes={"example.test": sink.port},
            submission_extra=extra,
        )
        with relayd:
            yield relayd, sink


# --- slowloris --------------------------------------------------------------------------------------------


def test_2000_idle_and_slow_connections_do_not_stop_a_real_client(peers: tuple[Relayd, Sink]) -> None:
    relayd, _ = peers
    held: list[socket.socket] = []
    try:
        for source in SOURCES:
            batch = [connect(relayd.port, source) for _ in range(100)]
            for i, sock in enumerate(batch):
                assert replies(sock)[0].startswith("220 ")
                if i % 2:
                    sock.sendall(b"EHL")  # slow: a command that never ends
            held.extend(batch)
        assert len(held) == 2000
        with connect(relayd.port, SOURCES[0]) as extra:  # the 101st from one address
            assert replies(extra)[0].startswith("421 4.7.0")
            assert closed(extra)
        t0 = time.monotonic()
        reply = submit_from(relayd, GOOD)
        elapsed = time.monotonic() - t0
        assert reply.startswith("250 2.0.0"), reply
        assert elapsed < 1.0, f"legitimate client needed {elapsed:.2f}s"
        print(f"\n2000 connections held; legitimate client got its 250 in {elapsed * 1000:.0f} ms")
    finally:
        for sock in held:
            sock.close()
    # the slots come back
    assert wait_until(lambda: submit_from(relayd, SOURCES[0]).startswith("250"), timeout=10)


# --- protocol abuse ---------------------------------------------------------------------------------------


def test_pipelined_flood_is_answered_in_order_and_bounded(peers: tuple[Relayd, Sink]) -> None:
    relayd, _ = peers
    with connect(relayd.port) as sock:
        ehlo(sock)
        sock.sendall(b"NOOP\r\n" * 1000)
        got = replies(sock, 1000)
        assert len(got) == 1000 and all(r.startswith("250") for r in got)
        # 1,000 commands that are each an error: the session ends at max_errors with a 421
        sock.sendall(b"MAIL FROM:<app@acme.example.test>\r\n" * 1000)
        got = replies(sock, 1000)
        assert got[:20] == [got[0]] * 20 and got[0].startswith("530 5.7.0"), got[:3]
        assert got[20].startswith("421 4.7.0") and len(got) == 21
        assert closed(sock)


def test_10000_rcpt_get_452_then_the_session_is_closed(peers: tuple[Relayd, Sink]) -> None:
    relayd, _ = peers
    with connect(relayd.port) as sock:
        ehlo(sock)
        sock.sendall(auth_plain("acme", PASSWORD))
        assert replies(sock)[0].startswith("235")
        sock.sendall(b"MAIL FROM:<app@acme.example.test>\r\n")
        assert replies(sock)[0].startswith("250")
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # we may be cut off mid-write
            sock.sendall(b"".join(b"RCPT TO:<r%d@example.test>\r\n" % i for i in range(10_000)))
        got = replies(sock, 10_000, timeout=20)
        assert len(got) == 121, (len(got), got[-3:])
        assert [r[:3] for r in got[:100]] == ["250"] * 100
        assert all(r.startswith("452 4.5.3") for r in got[100:120]), got[100:103]
        assert got[120].startswith("421 4.7.0") and len(got) == 121
        assert closed(sock)


def test_1mb_command_line_gets_500_and_the_session_goes_on(peers: tuple[Relayd, Sink]) -> None:
    relayd, _ = peers
    with connect(relayd.port) as sock:
        ehlo(sock)
        sock.sendall(b"NOOP " + b"x" * 1_000_000 + b"\r\n")
        assert replies(sock)[0].startswith("500 5.5.2")
        sock.sendall(b"NOOP\r\n")
        assert replies(sock)[0].startswith("250")


def _data_reply(relayd: Relayd, msg: bytes) -> str:
    with relayd.smtp() as s:
        s.login("acme", PASSWORD)
        s.mail("app@acme.example.test")
        s.rcpt("bob@example.test")
        code, text = s.data(msg)
        assert s.noop()[0] == 250  # the session survives the refusal
        return f"{code} {text.decode()}"


def test_header_bombs_are_refused(peers: tuple[Relayd, Sink]) -> None:
    relayd, _ = peers
    fields = b"".join(b"X-Bomb-%d: %d\r\n" % (i, i) for i in range(10_000))
    assert _data_reply(relayd, fields + message()).startswith("554 5.6.0")
    long_line = b"X-Long: " + b"a" * 1_000_000 + b"\r\n"
    assert _data_reply(relayd, long_line + message()).startswith("554 5.6.0")
    folded = b"X-Folded: a\r\n" + b" b\r\n" * 100_000  # one field, 300 KB of continuation lines
    assert _data_reply(relayd, folded + message()).startswith("554 5.6.0")


def test_deeply_nested_mime_is_handled_or_refused_permanently(peers: tuple[Relayd, Sink]) -> None:
    relayd, _ = peers
    assert _data_reply(relayd, nested_mime(100)).startswith("250 2.0.0")
    # deep enough to exhaust the stdlib parser's recursion: a permanent refusal, never a 451 loop
    assert _data_reply(relayd, nested_mime(1000)).startswith("554 5.6.0")


# --- password guessing ------------------------------------------------------------------------------------


def test_auth_failures_are_slowed_then_refused_per_client(peers: tuple[Relayd, Sink]) -> None:
    relayd, _ = peers
    attacker = "127.0.0.40"
    wrong = "guess-" + secrets.token_hex(4)
    with connect(relayd.port, attacker) as sock:
        ehlo(sock)
        delays = []
        for _ in range(4):
            t0 = time.monotonic()
            sock.sendall(auth_plain("nosuch", wrong))
            assert replies(sock)[0].startswith("535 5.7.8")
            delays.append(time.monotonic() - t0)
        assert delays[3] > delays[0] and delays[3] >= 0.35  # 0.05, 0.1, 0.2, 0.4 s
        sock.sendall(auth_plain("nosuch", wrong))
        assert replies(sock)[0].startswith("421 4.7.0 Too many failed authentications")
        assert closed(sock)
    # that client may not even try the right password now ...
    with connect(relayd.port, attacker) as sock:
        ehlo(sock)
        sock.sendall(auth_plain("acme", PASSWORD))
        assert replies(sock)[0].startswith("421 4.7.0")
        assert closed(sock)
    # ... while everyone else logs in as usual
    assert submit_from(relayd, "127.0.0.41").startswith("250")
    log = relayd.log_text()
    assert "AUTH PLAIN failed for 'nosuch' (client failures=5, disconnecting)" in log
    assert wrong not in log


def test_account_lockout_spares_the_accounts_known_clients(peers: tuple[Relayd, Sink]) -> None:
    relayd, _ = peers
    known = "127.0.0.50"
    assert submit_from(relayd, known, user="other", password=PASSWORD).startswith("250")
    wrong = "guess-" + secrets.token_hex(4)
    for i in range(4):  # 8 failures from 4 addresses: no address reaches its own limit
        with connect(relayd.port, f"127.0.0.{60 + i}") as sock:
            ehlo(sock)
            for _ in range(2):
                sock.sendall(auth_plain("other", wrong))
                assert replies(sock)[0].startswith("535")
    # the account is locked for a new address, even with the right password ...
    with connect(relayd.port, "127.0.0.70") as sock:
        ehlo(sock)
        sock.sendall(auth_plain("other", PASSWORD))
        assert replies(sock)[0].startswith("535 5.7.8")
    # ... but not for the address it has always been used from, nor for other accounts
    assert submit_from(relayd, known, user="other", password=PASSWORD).startswith("250")
    assert submit_from(relayd, "127.0.0.71").startswith("250")
    log = relayd.log_text()
    assert "for 'other' refused: account locked after repeated failures" in log
    assert wrong not in log and PASSWORD not in log


# --- inbound and web floods -------------------------------------------------------------------------------


def forged_token() -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    qid = "".join(secrets.choice(alphabet) for _ in range(16))
    mac = "".join(secrets.choice(alphabet) for _ in range(16))
    return f"{qid}-0-{mac}"


FORGED_DSN = (
    b"From: MAILER-DAEMON@mx.example.test\r\nTo: bounce@bounces.example.test\r\nSubject: failure\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=R\r\n\r\n"
    b"--R\r\nContent-Type: text/plain\r\n\r\nfailed\r\n--R\r\nContent-Type: message/delivery-status\r\n\r\n"
    b"Reporting-MTA: dns; mx.example.test\r\n\r\nFinal-Recipient: rfc822; victim@example.test\r\n"
    b"Action: failed\r\nStatus: 5.1.1\r\n\r\n--R--\r\n"
)


def test_forged_report_floods_are_rate_limited_and_change_nothing(tmp_path: Path, sink: Sink) -> None:
    relayd = Relayd(tmp_path, routes={"example.test": sink.port})
    text = relayd.config.read_text()
    text = text.replace(
        'domains = ["bounces.example.test"]', 'domains = ["bounces.example.test"]\nrate_per_ip = "100/m"'
    )
    text = text.replace('public_url = "http', 'rate_per_ip = "100/m"\npublic_url = "http')
    relayd.config.write_text(text)
    with relayd:
        # SMTP: forged DSNs to well-shaped VERP addresses, 500 per address from 4 addresses; one command at a
        # time, since the inbound listener offers no PIPELINING (and refuses a client that talks ahead)
        t0 = time.monotonic()
        answered = {"250": 0, "421": 0}
        for source in SOURCES[:4]:
            with connect(relayd.inbound_port, source) as sock:
                ehlo(sock)
                for _ in range(500):
                    sock.sendall(b"MAIL FROM:<>\r\n")
                    got = replies(sock)
                    if got[0].startswith("421"):
                        answered["421"] += 1
                        break
                    sock.sendall(b"RCPT TO:<bounce+%s@bounces.example.test>\r\n" % forged_token().encode())
                    assert replies(sock)[0].startswith("250")
                    sock.sendall(b"DATA\r\n")
                    assert replies(sock)[0].startswith("354")
                    sock.sendall(FORGED_DSN + b".\r\n")
                    got = replies(sock)
                    answered[got[0][:3]] = answered.get(got[0][:3], 0) + 1
            # the refused client can come back later, a real MTA does; nothing was lost meanwhile
        smtp_seconds = time.monotonic() - t0
        # 100 per address (plus what the bucket refills meanwhile), then 421
        assert 400 <= answered["250"] <= 420 and answered["421"] == 4, answered
        # HTTP: one-click POSTs with forged tokens
        t0 = time.monotonic()
        statuses: dict[int, int] = {}
        conn = http.client.HTTPConnection("127.0.0.1", relayd.http_port, timeout=10)
        for _ in range(2000):
            conn.request("POST", f"/u/{forged_token()}", body=b"List-Unsubscribe=One-Click")
            resp = conn.getresponse()
            resp.read()
            statuses[resp.status] = statuses.get(resp.status, 0) + 1
        conn.close()
        http_seconds = time.monotonic() - t0
        assert 100 <= statuses.get(400, 0) <= 120 and statuses.get(400, 0) + statuses.get(429, 0) == 2000
        conn = http.client.HTTPConnection("127.0.0.1", relayd.http_port, timeout=10)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200  # monitoring is never limited
        conn.close()
        assert relayd.cli("suppress", "list").stdout.strip() == ""
        print(
            f"\nforged DSNs: {answered['250']} processed + 4 refused in {smtp_seconds:.2f}s"
            f" ({answered['250'] / smtp_seconds:.0f}/s); forged one-click POSTs: 2000 in {http_seconds:.2f}s"
            f" ({2000 / http_seconds:.0f}/s), {statuses.get(429, 0)} got 429"
        )


def test_rate_limit_keys_and_buckets() -> None:
    from relayd.edge.ratelimit import AuthGuard, RateLimiter, source_key

    assert source_key("2001:db8:1:2:3:4:5:6") == source_key("2001:db8:1:2::9") == "2001:db8:1:2::/64"
    assert source_key("::ffff:192.0.2.1") == "192.0.2.1"
    now = [0.0]
    limiter = RateLimiter(3, 60.0, max_keys=2, clock=lambda: now[0])
    assert [limiter.allow("a") for _ in range(4)] == [True, True, True, False]
    now[0] = 20.0  # one token back after a third of the period
    assert limiter.allow("a") and not limiter.allow("a")
    limiter.allow("b")
    limiter.allow("c")  # evicts "a", the least recently used: memory stays bounded
    assert len(limiter) == 2
    guard = AuthGuard(max_failures=3, account_max_failures=5, window=600, delay=1, clock=lambda: now[0])
    assert [guard.failed("192.0.2.1", "x").delay for _ in range(3)] == [1, 2, 4]
    assert guard.client_locked("192.0.2.1")
    now[0] += 601
    assert not guard.client_locked("192.0.2.1")


def test_config_keys_parse() -> None:
    from relayd.config import Config

    cfg = Config.model_validate(
        {"inbound": {"rate_per_ip": "unlimited"}, "http": {"rate_per_ip": "10/s"}, "submission": {}}
    )
    assert cfg.inbound.rate_per_ip.events == 0
    assert (cfg.http.rate_per_ip.events, cfg.http.rate_per_ip.per) == (10, 1.0)
    assert cfg.submission.auth_max_failures == 5 and cfg.submission.max_errors == 20
    with pytest.raises(ValueError, match="expected a rate"):
        Config.model_validate({"http": {"rate_per_ip": "lots"}})
