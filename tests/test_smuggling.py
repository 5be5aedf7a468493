"""SMTP smuggling (SEC Consult, 2023): no payload ends one message and starts a second one.

Raw bytes on a socket, not smtplib, so nothing normalises line endings on the way. Each payload sits between
the body of a message and a complete second transaction; the only acceptable outcomes are one message (the
whole thing, smuggled text included, as a single body) or a refusal, and the smuggled recipient never
receives anything. The same payloads run against relayd in both ``bare_newline`` modes: ``normalize`` turns
some refusals into one message, never into two.
"""

from __future__ import annotations

import base64
import socket
import time
from pathlib import Path

import pytest

from tests.harness import PASSWORD, Relayd, Sink, wait_until

PAYLOADS = {
    "lf-dot-lf": b"\n.\n",
    "lf-dot-crlf": b"\n.\r\n",
    "cr-dot-cr": b"\r.\r",
    "crlf-dot-cr": b"\r\n.\r",
    "cr-dot-crlf": b"\r.\r\n",
    "crlf-dot-lf": b"\r\n.\n",
    "lf-dot-cr": b"\n.\r",
    "crlf-nul-dot-crlf": b"\r\n\x00.\r\n",
    "crlf-dot-space-crlf": b"\r\n. \r\n",
}

SMUGGLED = (
    b"MAIL FROM:<app@acme.example.test>\r\nRCPT TO:<smuggled@example.test>\r\nDATA\r\n"
    b"Subject: smuggled\r\n\r\nI was smuggled\r\n"
)


def _replies(sock: socket.socket, until: bytes, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    buf = b""
    deadline = time.monotonic() + timeout
    while until not in buf and time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf


@pytest.fixture(scope="module", params=["normalize", "reject"])
def peers(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """relayd with ``[submission] bare_newline`` set to the param, delivering to a sink."""
    with Sink() as sink:
        tmp = tmp_path_factory.mktemp("smuggling")
        mode = f'bare_newline = "{request.param}"'
        with Relayd(tmp, routes={"example.test": sink.port}, submission_extra=mode) as relayd:
            yield relayd, sink


@pytest.mark.parametrize("payload", PAYLOADS.values(), ids=PAYLOADS.keys())
def test_payload_never_yields_two_messages(peers: tuple[Relayd, Sink], payload: bytes) -> None:
    relayd, sink = peers
    before = sink.handler.count()
    marker = f"case-{time.time_ns()}".encode()
    auth = base64.b64encode(f"\0acme\0{PASSWORD}".encode())
    with socket.create_connection(("127.0.0.1", relayd.port)) as sock:
        assert _replies(sock, b"\r\n").startswith(b"220")
        sock.sendall(b"EHLO client.test\r\n")
        _replies(sock, b"250 ")
        sock.sendall(b"AUTH PLAIN " + auth + b"\r\n")
        assert _replies(sock, b"\r\n").startswith(b"235")
        sock.sendall(b"MAIL FROM:<app@acme.example.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n")
        assert b"354" in _replies(sock, b"354")
        head = b"From: <app@acme.example.test>\r\nSubject: " + marker + b"\r\n\r\n"
        sock.sendall(head + b"first body" + payload + SMUGGLED + b"\r\n.\r\n")
        first = _replies(sock, b"\r\n")
        sock.sendall(b"QUIT\r\n")
        rest = _replies(sock, b"221")
    final = first.split(b"\r\n")[0]
    # exactly one answer to the one DATA: 250 (one message) or 554 (refused), then QUIT's 221
    assert final[:3] in (b"250", b"554"), first
    assert [line[:3] for line in rest.split(b"\r\n") if line] == [b"221"], rest
    if final.startswith(b"554"):
        assert final[:9] in (b"554 5.5.2", b"554 5.6.0")  # bare CR/LF, or NUL (crlf-nul-dot-crlf)
        time.sleep(0.5)
        assert sink.handler.count() == before
    else:
        assert wait_until(lambda: sink.handler.count() == before + 1)
        got = [m for m in sink.messages if marker in m.data]
        assert len(got) == 1 and got[0].rcpt_tos == ["victim@example.test"]
        assert b"I was smuggled" in got[0].data  # the smuggled text is body, not a second message
    time.sleep(0.3)
    assert all(m.rcpt_tos != ["smuggled@example.test"] for m in sink.messages)


@pytest.mark.parametrize("peers", ["reject"], indirect=True)  # normalize: tests/test_bare_newline.py
def test_bare_lf_inside_data_is_refused(peers: tuple[Relayd, Sink]) -> None:
    relayd, _ = peers
    with relayd.smtp() as s:
        s.login("acme", PASSWORD)
        s.mail("app@acme.example.test")
        s.rcpt("bob@example.test")
        s.putcmd("DATA")
        assert s.getreply()[0] == 354
        s.send(b"Subject: x\r\n\r\nline with bare\nLF\r\n.\r\n")
        code, resp = s.getreply()
        assert (code, resp[:5]) == (554, b"5.5.2")
        assert s.noop()[0] == 250  # the session goes on


def test_oversized_message_refused_after_reading_it_all(tmp_path: Path, sink: Sink) -> None:
    with Relayd(
        tmp_path, routes={"example.test": sink.port}, submission_extra='max_message_size = "10KB"'
    ) as r:
        with r.smtp() as s:
            s.login("acme", PASSWORD)
            assert "size" in s.esmtp_features and s.esmtp_features["size"] == "10000"
            code, _ = s.mail("app@acme.example.test", ["SIZE=20000"])
            assert code == 552
            s.rset()
            s.mail("app@acme.example.test")
            s.rcpt("bob@example.test")
            code, resp = s.data(b"Subject: big\r\n\r\n" + (b"y" * 70 + b"\r\n") * 200)
            assert code == 552 and resp.startswith(b"5.3.4")
            assert s.noop()[0] == 250
        time.sleep(0.3)
    assert sink.handler.count() == 0
