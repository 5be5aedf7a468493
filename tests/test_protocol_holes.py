"""Protocol holes a hostile peer could use: listener limits, the DATA budget, AUTH mechanisms, lockstep on
the inbound listener, NUL in DATA, who may read /metrics, and how long a failed STARTTLS turns TLS off.

Real sockets on 127.0.0.1 throughout: raw bytes where a client library would smooth over what is sent,
smtplib and swaks where a real client must keep working, and a real aiosmtpd server for the delivery side.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import logging
import shutil
import smtplib
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as AioSMTP
from aiosmtpd.smtp import Envelope, Session

from relayd.config import load
from relayd.core import metrics
from relayd.core.errors import ConfigError
from relayd.edge.smtp.limits import ConnectionLimits
from relayd.edge.smtp.protocol import StrictSMTP
from tests.harness import PASSWORD, Relayd, Sink, free_port, message, wait_for_port, wait_until

POSTMASTER = b"postmaster@bounces.example.test"
REPORT = (
    b"From: MAILER-DAEMON@mx.example.test\r\nTo: postmaster@bounces.example.test\r\nSubject: failure\r\n\r\n"
    b"This is not a delivery status notification.\r\n"
)


# --- raw-socket helpers -------------------------------------------------------------------------------------


def connect(port: int, source: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
    sock.settimeout(timeout)
    return sock


class Reader:
    """Complete replies from a raw socket, each as its list of lines (a multi-line reply is one entry)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.lines: list[str] = []

    def line(self, timeout: float = 10.0) -> str | None:
        """The next reply line, or None when the server closed the connection first."""
        self.sock.settimeout(timeout)
        while b"\r\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line.decode("utf-8", "replace")

    def reply(self, timeout: float = 10.0) -> list[str]:
        """Every line of the next reply ([] if the connection closed first)."""
        lines: list[str] = []
        while (line := self.line(timeout)) is not None:
            lines.append(line)
            if line[3:4] != "-":
                break
        return lines

    def last(self, timeout: float = 10.0) -> str:
        """The final line of the next reply ("" if the connection closed first)."""
        lines = self.reply(timeout)
        return lines[-1] if lines else ""

    def closed(self, timeout: float = 10.0) -> bool:
        """True when the server closes the connection (after anything still in flight)."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        return True


def command(r: Reader, line: bytes) -> str:
    r.sock.sendall(line + b"\r\n")
    return r.last()


def auth_plain() -> bytes:
    return b"AUTH PLAIN " + base64.b64encode(f"\0acme\0{PASSWORD}".encode())


def submission_session(port: int) -> Reader:
    r = Reader(connect(port))
    assert r.last().startswith("220 ")
    assert command(r, b"EHLO client.test").startswith("250 ")
    assert command(r, auth_plain()).startswith("235")
    return r


def inbound_session(port: int, source: str = "127.0.0.1") -> Reader:
    r = Reader(connect(port, source))
    assert r.last().startswith("220 ")
    assert command(r, b"EHLO mx.remote.test").startswith("250 ")
    return r


def listening(relayd: Relayd) -> None:
    """Wait for the inbound and HTTP listeners too: the harness waits for the submission port only, and the
    daemon binds the others after it."""
    wait_for_port(relayd.inbound_port)
    wait_for_port(relayd.http_port)


def set_inbound(relayd: Relayd, lines: str) -> None:
    """Add ``lines`` to the daemon's ``[inbound]`` section (before it starts)."""
    text = relayd.config.read_text()
    anchor = 'domains = ["bounces.example.test"]'
    assert anchor in text
    relayd.config.write_text(text.replace(anchor, f"{anchor}\n{lines}", 1))


def set_http(relayd: Relayd, lines: str) -> None:
    text = relayd.config.read_text()
    anchor = 'public_url = "http'
    assert anchor in text
    relayd.config.write_text(text.replace(anchor, f"{lines}\n{anchor}", 1))


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Relayd, Sink]]:
    with Sink() as sink:
        relayd = Relayd(tmp_path_factory.mktemp("holes"), routes={"example.test": sink.port})
        with relayd:
            listening(relayd)
            yield relayd, sink


# --- 1. the inbound listener's own limits -------------------------------------------------------------------


def test_inbound_limit_defaults_are_well_below_submissions(tmp_path: Path) -> None:
    path = tmp_path / "relayd.toml"
    path.write_text('[inbound]\ndomains = ["bounces.example.test"]\n')
    cfg = load(path)
    assert cfg.inbound.max_connections * 4 <= cfg.submission.max_connections
    assert cfg.inbound.max_connections_per_ip * 4 <= cfg.submission.max_connections_per_ip
    assert cfg.inbound.max_message_size <= cfg.submission.max_message_size


def test_inbound_connections_have_limits_of_their_own(tmp_path: Path, sink: Sink) -> None:
    relayd = Relayd(tmp_path, routes={"example.test": sink.port})
    set_inbound(relayd, 'max_connections = 3\nmax_connections_per_ip = 2\ngreet_wait = "0s"')
    held: list[socket.socket] = []
    with relayd:
        listening(relayd)
        try:
            for source in ("127.0.0.1", "127.0.0.1", "127.0.0.3"):
                held.append(connect(relayd.inbound_port, source))
                assert Reader(held[-1]).last().startswith("220 ")
            with connect(relayd.inbound_port, "127.0.0.1") as third_from_one_ip:
                r = Reader(third_from_one_ip)
                assert r.last().startswith("421 4.7.0") and r.closed()
            with connect(relayd.inbound_port, "127.0.0.4") as fourth_in_all:
                r = Reader(fourth_in_all)
                assert r.last().startswith("421 4.7.0") and r.closed()
            # submission keeps its own, larger limits meanwhile
            for _ in range(4):
                held.append(connect(relayd.port, "127.0.0.1"))
                assert Reader(held[-1]).last().startswith("220 ")
        finally:
            for sock in held:
                sock.close()


# --- 2. the process's DATA budget ---------------------------------------------------------------------------


def test_data_over_the_process_budget_gets_452_and_the_retry_is_accepted(tmp_path: Path, sink: Sink) -> None:
    """An inbound session holds 60 KB of DATA; a submission of 50 KB would pass the 100 KB budget of the
    process (shared by both listeners): read to its end, then 452 4.3.1. Once the first is done, the same
    client's retry is accepted."""
    relayd = Relayd(
        tmp_path,
        routes={"example.test": sink.port},
        server_extra='max_data_in_flight = "100KB"',
        submission_extra='max_message_size = "100KB"',
    )
    set_inbound(relayd, 'max_message_size = "100KB"\ngreet_wait = "0s"')
    line = b"x" * 98 + b"\r\n"
    with relayd:
        listening(relayd)
        holder = inbound_session(relayd.inbound_port)
        sender = submission_session(relayd.port)
        try:
            assert command(holder, b"MAIL FROM:<>").startswith("250")
            assert command(holder, b"RCPT TO:<" + POSTMASTER + b">").startswith("250")
            assert command(holder, b"DATA").startswith("354")
            holder.sock.sendall(REPORT + line * 600)  # 60 KB, not ended yet

            body = message("budget").replace(b"Hello there.\r\n", line * 500)  # 50 KB
            for attempt in (1, 2):
                assert command(sender, b"MAIL FROM:<app@acme.example.test>").startswith("250")
                assert command(sender, b"RCPT TO:<bob@example.test>").startswith("250")
                assert command(sender, b"DATA").startswith("354")
                reply = command(sender, body + b".")
                if attempt == 1:
                    assert reply.startswith("452 4.3.1"), reply
                    assert command(holder, b".").startswith("250")  # the first message ends
                else:
                    assert reply.startswith("250 2.0.0"), reply
            assert command(sender, b"QUIT").startswith("221")
        finally:
            holder.sock.close()
            sender.sock.close()
        assert wait_until(lambda: sink.handler.count() == 1)


def _budget_server(budget_bytes: int) -> tuple[Any, ConnectionLimits, Any]:
    """Handler, limits and protocol factory of an in-process StrictSMTP whose DATA hook accepts, raises or
    hangs by Subject (so every way a DATA can end is exercised)."""
    from relayd.edge.smtp.limits import DataBudget

    class Hooks:
        def __init__(self) -> None:
            # a hanging hook runs to its end even when its client goes (the message may be committed),
            # holding its session and socket: the test lets it end, or the socket outlives the test
            self.release = asyncio.Event()
            self.sessions: list[StrictSMTP] = []

        async def handle_DATA(self, server: StrictSMTP, session: Session, envelope: Envelope) -> str:
            content = envelope.content
            assert isinstance(content, bytes)
            if b"Subject: raise" in content:
                raise RuntimeError("a bug in a DATA hook")
            if b"Subject: hang" in content:
                await self.release.wait()  # the client goes away meanwhile
                if b"Subject: hang, then raise" in content:
                    raise RuntimeError("a bug in a DATA hook whose client is gone")
            return "250 2.0.0 Ok"

        async def handle_exception(self, error: Exception) -> str:
            return "451 4.3.0 Internal error, try again later"

    limits = ConnectionLimits(1000, 1000, DataBudget(budget_bytes))
    hooks = Hooks()

    def factory() -> StrictSMTP:
        smtp = StrictSMTP(
            hooks,
            limits=limits,
            data_timeout=30,
            hostname="budget.test",
            data_size_limit=1_000_000,
            decode_data=False,
            auth_require_tls=True,
        )
        hooks.sessions.append(smtp)
        return smtp

    return hooks, limits, factory


async def test_a_hook_whose_client_went_ends_its_session_without_a_reply_even_when_it_fails(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hooks, limits, factory = _budget_server(10_000_000)
    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    try:
        _reader, writer = await _open_data(server.sockets[0].getsockname()[1])
        writer.write(b"Subject: hang, then raise\r\n\r\nx\r\n.\r\n")
        assert limits.data is not None
        while limits.data.held == 0:  # in the hook
            await asyncio.sleep(0.01)
        writer.close()
        session = hooks.sessions[-1]
        deadline = time.monotonic() + 20
        while not session.client_gone and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert session.client_gone and limits.open == 1
        with caplog.at_level(logging.ERROR, logger="relayd.edge.smtp.protocol"):
            hooks.release.set()
            await _settle(limits)
        assert (limits.open, limits.data.held) == (0, 0)
        assert "failed after the client hung up" in caplog.text
    finally:
        hooks.release.set()
        server.close()
        await server.wait_closed()


async def _open_data(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A session that has had its 354."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert (await reader.readline()).startswith(b"220")
    for cmd, expect in (
        (b"HELO c.test", b"250"),
        (b"MAIL FROM:<a@b.test>", b"250"),
        (b"RCPT TO:<c@d.test>", b"250"),
        (b"DATA", b"354"),
    ):
        writer.write(cmd + b"\r\n")
        assert (await reader.readline()).startswith(expect)
    return reader, writer


async def _settle(limits: ConnectionLimits, *, held: int = 0) -> None:
    """Wait (bounded) until no connection is open and the budget holds ``held`` bytes."""
    assert limits.data is not None
    deadline = time.monotonic() + 20
    while (limits.open or limits.data.held != held) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), as a client that crashes or a firewall does."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


async def test_data_budget_is_given_back_however_data_ends() -> None:
    hooks, limits, factory = _budget_server(10_000_000)
    budget = limits.data
    assert budget is not None
    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    chunk = b"Subject: partial\r\n\r\n" + b"y" * 998 + b"\r\n"
    writers: list[asyncio.StreamWriter] = []
    try:
        # 60 sessions stop inside DATA with 20 KB sent: 30 close, 30 reset
        for _ in range(60):
            reader, writer = await _open_data(port)
            writer.write(chunk * 20)
            await writer.drain()
            writers.append(writer)
        deadline = time.monotonic() + 20
        while budget.held < 60 * 20 * 1000 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert budget.held >= 60 * 20 * 1000  # every session's bytes are counted while it holds them
        for i, writer in enumerate(writers):
            if i % 2:
                _reset(writer)
            else:
                writer.close()
        await _settle(limits)
        assert (limits.open, budget.held) == (0, 0)
        # sessions whose DATA ends in a refusal, in our exception, and in a hook the client does not wait for
        for body, reply in (
            (b"Subject: bare\nLF\r\n", b"554"),
            (b"Subject: raise\r\n\r\nx\r\n", b"451"),
            (b"Subject: hang\r\n\r\nx\r\n", None),
        ):
            reader, writer = await _open_data(port)
            writer.write(body + b".\r\n")
            if reply is None:
                while budget.held == 0:  # the message is in the hook now, holding its bytes
                    await asyncio.sleep(0.01)
                _reset(writer)
                session = hooks.sessions[-1]
                deadline = time.monotonic() + 20
                while not session.client_gone and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                # the client is gone; the hook finishes its message first, holding its bytes and its
                # connection's place until it ends, and the session ends then, with no reply
                assert session.client_gone
                assert (limits.open, budget.held) == (1, len(body))
                hooks.release.set()
            else:
                assert (await reader.readline())[:3] == reply
                writer.close()
            await _settle(limits)
            assert (limits.open, budget.held) == (0, 0)
        # and a whole message still goes through, leaving nothing held
        reader, writer = await _open_data(port)
        writer.write(b"Subject: ok\r\n\r\nfine\r\n.\r\n")
        assert (await reader.readline()).startswith(b"250")
        writer.close()
        assert budget.held == 0
    finally:
        hooks.release.set()
        await _settle(limits)
        server.close()
        await server.wait_closed()


def test_budget_smaller_than_a_message_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "relayd.toml"
    path.write_text('[server]\nmax_data_in_flight = "1MB"\n[submission]\nmax_message_size = "25MB"\n')
    with pytest.raises(ConfigError) as exc:
        load(path)
    problems = exc.value.problems
    assert all(p.startswith(f"{path}: server.max_data_in_flight: ") for p in problems), problems
    assert ["submission.max_message_size" in problems[0], "inbound.max_message_size" in problems[1]] == [
        True
    ] * 2


def test_new_limit_keys_are_checked_with_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "relayd.toml"
    path.write_text(
        '[server]\nmax_data_in_flight = "lots"\n'
        '[inbound]\nmax_connections = 0\nmax_connections_per_ip = 0\ngreet_wait = "2m"\n'
        '[http]\nmetrics_allow = ["10.0.0.0/33"]\n'
    )
    with pytest.raises(ConfigError) as exc:
        load(path)
    keys = [p.split(": ")[1] for p in exc.value.problems]
    assert keys == [
        "server.max_data_in_flight",
        "inbound.max_connections",
        "inbound.max_connections_per_ip",
        "inbound.greet_wait",
        "http.metrics_allow[0]",
    ]
    assert all(p.startswith(f"{path}: ") for p in exc.value.problems)


# --- 3. AUTH mechanisms -------------------------------------------------------------------------------------


def _ehlo_auth_lines(port: int) -> list[str]:
    r = Reader(connect(port))
    with r.sock:
        assert r.last().startswith("220 ")
        r.sock.sendall(b"EHLO client.test\r\n")
        return [line[4:] for line in r.reply() if line[4:].upper().startswith("AUTH")]


def test_ehlo_lists_exactly_the_configured_auth_mechanisms(
    peers: tuple[Relayd, Sink], tmp_path: Path
) -> None:
    relayd, sink = peers
    assert _ehlo_auth_lines(relayd.port) == ["AUTH LOGIN PLAIN"]
    accounts = '[accounts.acme]\nnetworks = ["127.0.0.0/8"]\ndomains = ["acme.example.test"]\n'
    routes = {"example.test": sink.port}
    with Relayd(
        tmp_path, routes=routes, submission_extra="auth_required = false", accounts=accounts
    ) as no_auth:
        assert _ehlo_auth_lines(no_auth.port) == []


def test_unknown_auth_mechanism_gets_504_and_counts_as_an_error(peers: tuple[Relayd, Sink]) -> None:
    relayd, _ = peers
    r = Reader(connect(relayd.port))
    with r.sock:
        assert r.last().startswith("220 ")
        assert command(r, b"EHLO client.test").startswith("250 ")
        assert command(r, b"AUTH guard x").startswith("504 5.5.4")
        r.sock.sendall(b"AUTH NOPE\r\n" * 30)
        got = [r.last() for _ in range(20)]
        # max_errors is 20: the 20th error is followed by 421 and the end of the session
        assert all(g.startswith("504 5.5.4") for g in got[:19]), got
        assert got[19].startswith("421 4.7.0"), got
        assert r.closed()
    with smtplib.SMTP("127.0.0.1", relayd.port, timeout=10) as s:
        assert s.login("acme", PASSWORD)[0] == 235  # a bad mechanism name locks nothing


# --- 4. lockstep on the inbound listener ------------------------------------------------------------------


def test_inbound_does_not_offer_pipelining_and_refuses_a_client_that_talks_ahead(
    peers: tuple[Relayd, Sink],
) -> None:
    relayd, _ = peers
    r = Reader(connect(relayd.inbound_port))
    with r.sock:
        assert r.last().startswith("220 ")
        r.sock.sendall(b"EHLO mx.remote.test\r\n")
        ehlo = r.reply()
        assert ehlo[-1].startswith("250 ") and not any("PIPELINING" in line for line in ehlo)
        r.sock.sendall(b"MAIL FROM:<>\r\nRCPT TO:<" + POSTMASTER + b">\r\nDATA\r\n")
        assert r.last().startswith("554 5.5.0")
        assert r.closed()


def test_inbound_refuses_a_client_that_talks_before_the_greeting_ends(peers: tuple[Relayd, Sink]) -> None:
    relayd, _ = peers
    # speaks at once, before reading anything
    r = Reader(connect(relayd.inbound_port))
    with r.sock:
        r.sock.sendall(b"EHLO bot.test\r\n")
        assert r.last().startswith("554 5.5.0")
        assert r.closed()
    # speaks after the first greeting line, which says the greeting is not over yet
    r = Reader(connect(relayd.inbound_port))
    with r.sock:
        first = r.line()
        assert first is not None and first.startswith("220-"), first
        r.sock.sendall(b"EHLO bot.test\r\n")
        assert r.last().startswith("554 5.5.0")
        assert r.closed()


def test_real_clients_that_wait_for_replies_are_served_on_inbound(peers: tuple[Relayd, Sink]) -> None:
    relayd, _ = peers
    with smtplib.SMTP("127.0.0.1", relayd.inbound_port, timeout=30) as s:
        s.ehlo("mx.remote.test")
        assert s.mail("")[0] == 250
        assert s.rcpt(POSTMASTER.decode())[0] == 250
        assert s.data(REPORT)[0] == 250
    swaks = shutil.which("swaks")
    assert swaks is not None, "swaks is part of the test tools"
    args = ["--server", f"127.0.0.1:{relayd.inbound_port}", "--from", "<>", "--to", POSTMASTER.decode()]
    args += ["--helo", "mx.remote.test", "--data", REPORT.decode(), "--timeout", "30"]
    out = subprocess.run(
        [swaks, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert " -> MAIL FROM:<>\n" in out.stdout and "\n<-  250 2.0.0" in out.stdout, out.stdout


# --- 5. NUL in DATA -----------------------------------------------------------------------------------------


def test_nul_in_data_is_refused_on_submission_and_inbound(peers: tuple[Relayd, Sink]) -> None:
    relayd, sink = peers
    before = sink.handler.count()
    sender = submission_session(relayd.port)
    with sender.sock:
        assert command(sender, b"MAIL FROM:<app@acme.example.test>").startswith("250")
        assert command(sender, b"RCPT TO:<nul@example.test>").startswith("250")
        assert command(sender, b"DATA").startswith("354")
        reply = command(sender, b"Subject: nul\r\n\r\nbefore\x00after\r\n.")
        assert reply.startswith("554 5.6.0"), reply
        assert command(sender, b"NOOP").startswith("250")  # the session goes on
    reporter = inbound_session(relayd.inbound_port)
    with reporter.sock:
        assert command(reporter, b"MAIL FROM:<>").startswith("250")
        assert command(reporter, b"RCPT TO:<" + POSTMASTER + b">").startswith("250")
        assert command(reporter, b"DATA").startswith("354")
        reply = command(reporter, REPORT + b"\x00\r\n.")
        assert reply.startswith("554 5.6.0"), reply
    # a message without NUL still goes through, and only that one is delivered
    assert relayd.submit(message("no nul"), to=["nul@example.test"])[0] == 250
    assert wait_until(lambda: sink.handler.count() == before + 1)
    assert all(b"\x00" not in m.data for m in sink.messages)


# --- 6. who may read /metrics -------------------------------------------------------------------------------


def _get(port: int, path: str, source: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_metrics_only_for_clients_in_metrics_allow(tmp_path: Path, sink: Sink) -> None:
    relayd = Relayd(tmp_path, routes={"example.test": sink.port})
    set_http(relayd, 'metrics_allow = ["127.0.0.2/32", "::1/128"]')
    with relayd:
        listening(relayd)
        status, body = _get(relayd.http_port, "/metrics", "127.0.0.2")
        assert status == 200 and b"relayd_submissions_total" in body
        status, body = _get(relayd.http_port, "/metrics", "127.0.0.1")
        assert status == 403 and b"relayd_" not in body
        # what the client writes about itself counts for nothing
        spoofed = {"X-Forwarded-For": "127.0.0.2", "Forwarded": "for=127.0.0.2", "X-Real-IP": "127.0.0.2"}
        status, body = _get(relayd.http_port, "/metrics", "127.0.0.1", spoofed)
        assert status == 403 and b"relayd_" not in body
        assert (
            _get(relayd.http_port, "/healthz", "127.0.0.1")[0] == 200
        )  # the rest of the site is not affected


def test_metrics_allow_defaults_to_loopback(peers: tuple[Relayd, Sink]) -> None:
    relayd, _ = peers
    assert _get(relayd.http_port, "/metrics", "127.0.0.1")[0] == 200
    from relayd.config import HttpConfig

    assert [str(n) for n in HttpConfig().metrics_allow] == ["127.0.0.0/8", "::1/128"]


# --- 7. a failed STARTTLS turns TLS off for a while, not for good ----------------------------------------


class TlsSeen:
    def __init__(self) -> None:
        self.seen: list[bool] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server: AioSMTP, session: Session, envelope: Envelope) -> str:
        with self.lock:
            self.seen.append(session.ssl is not None)
        return "250 2.0.0 OK"


def _tls_fallbacks() -> float:
    """``relayd_tls_fallback_total`` summed over its reasons."""
    return sum(
        sample.value
        for family in metrics.REGISTRY.collect()
        for sample in family.samples
        if sample.name == "relayd_tls_fallback_total"
    )


@pytest.fixture
def flaky_tls_mx() -> Iterator[tuple[int, TlsSeen, ssl.SSLContext]]:
    """An aiosmtpd server offering STARTTLS whose handshake fails: TLS 1.2 with a client certificate
    required, which the delivery client never has. Setting ``verify_mode`` to CERT_NONE mends it."""
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.example.test").configure_cert(ctx)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    handler = TlsSeen()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, tls_context=ctx, require_starttls=False)
    controller.start()
    try:
        yield port, handler, ctx
    finally:
        controller.stop()


async def test_failed_starttls_falls_back_for_the_ttl_then_tls_is_tried_again(
    flaky_tls_mx: tuple[int, TlsSeen, ssl.SSLContext],
) -> None:
    from relayd.queue.transport.client import Transport

    port, handler, ctx = flaky_tls_mx
    now = [1000.0]
    transport = Transport(
        helo="relayd.test",
        tls="may",
        connect_timeout=5,
        command_timeout=10,
        messages_per_connection=1,  # a new connection (and TLS decision) per message
        tls_fallback_ttl=3600,
        clock=lambda: now[0],
    )
    fallbacks = _tls_fallbacks()
    hosts = (("127.0.0.1", port),)
    data = message("tls")
    try:
        assert (await transport.send(hosts, "a@acme.example.test", "r1@example.test", data)).startswith("250")
        assert handler.seen == [False]  # the handshake failed: delivered in plaintext
        assert _tls_fallbacks() == fallbacks + 1
        ctx.verify_mode = ssl.CERT_NONE  # the server's TLS works again from here on
        now[0] += 3599
        await transport.send(hosts, "a@acme.example.test", "r2@example.test", data)
        assert handler.seen == [False, False]  # within the TTL: TLS not even tried
        now[0] += 2
        await transport.send(hosts, "a@acme.example.test", "r3@example.test", data)
        assert handler.seen == [False, False, True]  # past it: TLS tried again, and used
    finally:
        await transport.close()
