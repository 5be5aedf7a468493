"""Opportunistic STARTTLS on delivery: used when the receiving server offers it (certificates not checked,
as Postfix's `smtp_tls_security_level = may`), plain SMTP when it doesn't."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as AioSMTP
from aiosmtpd.smtp import Envelope, Session

from tests.harness import Relayd, free_port, message, wait_until


class TlsRecorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, bool]] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server: AioSMTP, session: Session, envelope: Envelope) -> str:
        with self.lock:
            self.seen.append((envelope.rcpt_tos[0], session.ssl is not None))
        return "250 2.0.0 OK"


@pytest.fixture
def tls_sink(tmp_path: Path) -> Iterator[tuple[int, TlsRecorder]]:
    ca = trustme.CA()
    cert = ca.issue_cert("mx.example.test")  # a name relayd can't verify: opportunistic TLS must not care
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    handler = TlsRecorder()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, tls_context=ctx, require_starttls=False)
    controller.start()
    yield port, handler
    controller.stop()


def test_starttls_used_when_offered(tmp_path: Path, tls_sink: tuple[int, TlsRecorder]) -> None:
    port, handler = tls_sink
    with Relayd(tmp_path, routes={"example.test": port}) as relayd:
        assert relayd.submit(message("over tls"), to=["tls@example.test"])[0] == 250
        assert wait_until(lambda: len(handler.seen) == 1)
    assert handler.seen == [("tls@example.test", True)]


def test_tls_none_sends_in_plaintext(tmp_path: Path, tls_sink: tuple[int, TlsRecorder]) -> None:
    port, handler = tls_sink
    with Relayd(tmp_path, routes={"example.test": port}, extra='tls = "none"') as relayd:
        assert relayd.submit(message("plain"), to=["plain@example.test"])[0] == 250
        assert wait_until(lambda: len(handler.seen) == 1)
    assert handler.seen == [("plain@example.test", False)]
