"""Session limits: idle and DATA timeouts, connections per IP and in total, recipients per message."""

from __future__ import annotations

import base64
import socket
import time
from pathlib import Path

from tests.harness import PASSWORD, Relayd, Sink


def _read(sock: socket.socket, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    buf = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return buf
        buf += chunk
        if buf.endswith(b"\r\n") and buf.split(b"\r\n")[-2][3:4] == b" ":
            return buf


def test_idle_client_gets_421_after_command_timeout(tmp_path: Path, sink: Sink) -> None:
    extra = 'command_timeout = "1s"\ndata_timeout = "2s"'
    with Relayd(tmp_path, routes={"example.test": sink.port}, submission_extra=extra) as relayd:
        with socket.create_connection(("127.0.0.1", relayd.port)) as sock:
            assert _read(sock).startswith(b"220")
            t0 = time.monotonic()
            assert _read(sock).startswith(b"421 4.4.2")
            assert sock.recv(10) == b""  # and then closed
            assert time.monotonic() - t0 < 5
        # a client that stalls inside DATA is cut off by data_timeout, and nothing is queued
        with relayd.smtp() as s:
            s.login("acme", PASSWORD)
            s.mail("app@acme.example.test")
            s.rcpt("bob@example.test")
            s.putcmd("DATA")
            assert s.getreply()[0] == 354
            for _ in range(5):  # keep sending inside the command timeout, never finish
                s.send(b"Subject: slow\r\n")
                time.sleep(0.5)
            code, resp = s.getreply()
            assert (code, resp[:5]) == (421, b"4.4.2")
        assert relayd.cli("queue", "list").stdout == ""


def test_connections_per_ip_limit(tmp_path: Path, sink: Sink) -> None:
    extra = "max_connections_per_ip = 2"
    with Relayd(tmp_path, routes={"example.test": sink.port}, submission_extra=extra) as relayd:
        a = socket.create_connection(("127.0.0.1", relayd.port))
        b = socket.create_connection(("127.0.0.1", relayd.port))
        try:
            assert _read(a).startswith(b"220") and _read(b).startswith(b"220")
            with socket.create_connection(("127.0.0.1", relayd.port)) as c:
                assert _read(c).startswith(b"421 4.7.0")
        finally:
            a.close()
            b.close()
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", relayd.port)) as d:
            assert _read(d).startswith(b"220")  # slots are given back


def test_total_connection_limit(tmp_path: Path, sink: Sink) -> None:
    extra = "max_connections = 1"
    with (
        Relayd(tmp_path, routes={"example.test": sink.port}, submission_extra=extra) as relayd,
        socket.create_connection(("127.0.0.1", relayd.port)) as a,
    ):
        assert _read(a).startswith(b"220")
        with socket.create_connection(("127.0.0.1", relayd.port)) as b:
            assert _read(b).startswith(b"421 4.7.0")


def test_too_many_recipients_get_452(tmp_path: Path, sink: Sink) -> None:
    with (
        Relayd(tmp_path, routes={"example.test": sink.port}, submission_extra="max_recipients = 3") as relayd,
        relayd.smtp() as s,
    ):
        s.login("acme", PASSWORD)
        s.mail("app@acme.example.test")
        code, resp = s.rcpt("not-an-address")
        assert (code, resp[:5]) == (501, b"5.1.3")
        for i in range(3):
            assert s.rcpt(f"r{i}@example.test")[0] == 250
        code, resp = s.rcpt("r4@example.test")
        assert (code, resp[:5]) == (452, b"4.5.3")


def test_sessions_per_account_limit(tmp_path: Path, sink: Sink) -> None:
    extra = "max_sessions_per_account = 1"
    with Relayd(tmp_path, routes={"example.test": sink.port}, submission_extra=extra) as relayd:
        with relayd.smtp() as first:
            first.login("acme", PASSWORD)
            with relayd.smtp() as second:
                second.ehlo("x")
                blob = base64.b64encode(f"\0acme\0{PASSWORD}".encode()).decode()
                code, resp = second.docmd("AUTH", "PLAIN " + blob)
                assert (code, resp[:5]) == (454, b"4.7.0")
        with relayd.smtp() as third:
            third.login("acme", PASSWORD)  # the first session ended, its slot is free
