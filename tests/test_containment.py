"""Containment: no report and no remote reply can stall relayd, whatever the parsers do with it.

* Reports are parsed in a child process (:mod:`relayd.reports.parseworker`) with a hard time limit: a parse
that
  never ends is cut off, its report kept as an ``unclassified`` event acting on nobody, the child replaced,
  and the listeners answer all along. The slow parse is made deterministic two ways: a parser target that
  loops forever (the worker alone), and a real daemon's parser child stopped with SIGSTOP.
* The delivery client keeps a bounded part of a remote reply however many lines a hostile MX sends.

Hang detection uses generous socket and ``asyncio.wait_for`` bounds, never timing assertions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from relayd import config
from relayd.core.errors import PermanentFailure, TemporaryFailure
from relayd.queue.transport.client import Transport
from relayd.queue.transport.smtpclient import MAX_REPLY_LINES, MAX_REPLY_TEXT
from relayd.reports import parseworker
from relayd.reports.parseworker import ParseAbandoned, ParsedReport, ParserBusy, ParseWorker, parse_report
from tests.adversarial import adversarial_dsn
from tests.harness import PASSWORD, Relayd, Sink, message, wait_for_port, wait_until
from tests.test_feedback_e2e import _deliver, _dsn, _suppressions, _verp

ROOT = Path(__file__).resolve().parent.parent
INBOUND = "bounces.example.test"
NEVER = b"X-Test-Parse: forever"


def parse_slowly(raw: bytes) -> ParsedReport:
    """A parser target for the worker: never returns for a message carrying :data:`NEVER` (a stand-in for a
    slow path nobody has found yet), parses like the real one otherwise."""
    if NEVER in raw:
        while True:
            pass
    return parse_report(raw)


@pytest.fixture
def importable_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's child is a fresh interpreter: let it import ``tests.test_containment``."""
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    )


@pytest.fixture
async def slow_worker(importable_tests: None) -> AsyncIterator[ParseWorker]:
    worker = ParseWorker(1.0, target="tests.test_containment:parse_slowly")
    await worker.start()
    try:
        yield worker
    finally:
        await worker.close()


def _crlf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _bounce(rcpt: str = "gone@example.test") -> bytes:
    return _crlf(_dsn(rcpt, message()))


# --- the worker alone ---------------------------------------------------------------------------------------


async def test_a_parse_that_never_ends_is_cut_off_and_the_child_replaced(slow_worker: ParseWorker) -> None:
    bounce = _bounce()
    first = await asyncio.wait_for(slow_worker.parse(bounce), 60)  # the child has started and answers
    assert first.dsn is not None and first.dsn.is_dsn
    old_pid = slow_worker.pid
    assert old_pid is not None
    with pytest.raises(ParseAbandoned) as info:
        await asyncio.wait_for(slow_worker.parse(NEVER + b"\r\n" + bounce), 60)
    assert info.value.why == "timeout"
    assert slow_worker.replaced == 1
    # the looping child is gone (killed and reaped), and the next report gets a fresh one
    assert wait_until(lambda: not Path(f"/proc/{old_pid}").exists() or _zombie(old_pid), timeout=30)
    again = await asyncio.wait_for(slow_worker.parse(bounce), 60)
    assert again == first
    assert slow_worker.pid not in (None, old_pid)


async def test_the_worker_reads_a_report_as_the_parsers_do_in_process(importable_tests: None) -> None:
    worker = ParseWorker(30.0)
    try:
        for raw in (_bounce(), adversarial_dsn(2000), b"Subject: hello\r\n\r\nnot a report\r\n"):
            assert await asyncio.wait_for(worker.parse(raw), 60) == parse_report(raw)
    finally:
        await worker.close()
    assert worker.pid is None


async def test_reports_beyond_the_waiting_bound_are_refused_at_once(
    slow_worker: ParseWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(parseworker, "MAX_PENDING", 2)
    slow = [asyncio.create_task(slow_worker.parse(NEVER)) for _ in range(2)]
    await asyncio.sleep(0)  # both are now pending: one in the child, one waiting for it
    with pytest.raises(ParserBusy):
        await slow_worker.parse(_bounce())
    results = await asyncio.wait_for(asyncio.gather(*slow, return_exceptions=True), 60)
    assert [type(r) for r in results] == [ParseAbandoned, ParseAbandoned]


def _zombie(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()
    return True


@pytest.mark.parametrize(
    ("value", "problem"),
    [('"0s"', "greater than 0"), ('"soon"', "expected a duration")],
)
def test_parse_timeout_is_validated_with_file_and_key(tmp_path: Path, value: str, problem: str) -> None:
    path = tmp_path / "relayd.toml"
    path.write_text(f'[inbound]\ndomains = ["{INBOUND}"]\nparse_timeout = {value}\n')
    out = subprocess.run(
        [sys.executable, "-m", "relayd", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 2
    [line] = [x for x in out.stderr.splitlines() if "parse_timeout" in x]
    assert line.startswith(f"{path}: inbound.parse_timeout: ") and problem in line, line


def test_parse_timeout_defaults_to_10s_and_the_example_config_documents_it() -> None:
    assert config.InboundConfig().parse_timeout == 10.0
    assert '# parse_timeout = "10s"' in (ROOT / "conf" / "relayd.toml").read_text()


# --- a real daemon ------------------------------------------------------------------------------------------


def _parser_child(relayd: Relayd) -> int | None:
    """The pid of the daemon's report parser child (a child process running relayd.reports.parseworker)."""
    assert relayd.proc is not None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            status = (entry / "status").read_text()
            ppid = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:"))
            ours = (
                ppid == relayd.proc.pid and b"relayd.reports.parseworker" in (entry / "cmdline").read_bytes()
            )
            if ours and "\nState:\tZ" not in status:
                return int(entry.name)
    return None


def _lines(sock: socket.socket) -> list[str]:
    """One whole (multi-line) reply."""
    data = b""
    while not data.endswith(b"\r\n") or data.splitlines()[-1][3:4] != b" ":
        chunk = sock.recv(4096)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return data.decode().splitlines()


def _start_report(relayd: Relayd, rcpt: str | list[str], raw: bytes) -> socket.socket:
    """Send one report (to one or more recipients) up to and including the end of its DATA; leave its
    reply unread."""
    wait_for_port(relayd.inbound_port)
    sock = socket.create_connection(("127.0.0.1", relayd.inbound_port), timeout=60)
    rcpts = [f"RCPT TO:<{r}>".encode() for r in ([rcpt] if isinstance(rcpt, str) else rcpt)]
    for command in (None, b"EHLO mx.remote.example", b"MAIL FROM:<>", *rcpts, b"DATA"):
        if command is not None:
            sock.sendall(command + b"\r\n")
        reply = _lines(sock)
        assert reply[-1][:1] in ("2", "3"), reply
    sock.sendall(raw + (b"" if raw.endswith(b"\r\n") else b"\r\n") + b".\r\n")
    return sock


def _pending(sock: socket.socket) -> bool:
    """True while no reply to the DATA is there yet."""
    sock.setblocking(False)
    try:
        return not sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    finally:
        sock.setblocking(True)


def _events(relayd: Relayd, kind: str) -> list[dict[str, object]]:
    out = relayd.cli("events", "--json", "--kind", kind)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def test_a_report_whose_parse_never_ends_is_unclassified_suppresses_nobody_and_the_listeners_answer(
    tmp_path: Path,
) -> None:
    with Sink() as sink, Relayd(tmp_path, routes={"example.test": sink.port}) as relayd:
        rcpt = "gone@example.test"
        original = _deliver(relayd, sink, rcpt)
        verp = _verp(sink, rcpt)
        bounce = _dsn(rcpt, original)  # a genuine hard bounce: parsed, it would suppress rcpt globally
        # a first message through the parser: the child has started up and answered
        wait_for_port(relayd.inbound_port)
        with smtplib.SMTP("127.0.0.1", relayd.inbound_port, timeout=60) as s:
            s.ehlo("mx.remote.example")
            s.mail("<>")
            s.rcpt(f"postmaster@{INBOUND}")
            assert s.data(b"Subject: hello\r\n\r\nnot a report\r\n")[0] == 250
        child = _parser_child(relayd)
        assert child is not None
        os.kill(child, signal.SIGSTOP)  # the parse of the next report never ends
        # to two addresses: one parse for the message, not one per recipient role
        report = _start_report(relayd, [verp, f"postmaster@{INBOUND}"], bounce)
        with report:
            # while the report waits for its parse, submission and inbound both answer
            code, resp = relayd.submit(message(), to=["someone@example.test"])
            assert code == 250, resp
            with smtplib.SMTP("127.0.0.1", relayd.inbound_port, timeout=60) as s:
                assert s.ehlo("mx.other.example")[0] == 250
            assert _pending(report)
            # [inbound] parse_timeout (10s by default) later: accepted, nothing acted on
            reply = _lines(report)
            assert reply[-1].startswith("250 "), reply
        events = _events(relayd, "unclassified")
        assert sorted(str(e["reason"]) for e in events) == ["bounce", "postmaster"]
        for event in events:
            assert event["account"] is None and event["address"] is None
            evidence = event["evidence"]
            assert isinstance(evidence, dict) and evidence["why"] == "timeout"
        assert relayd.log_text().count("killed and replaced") == 1
        assert _suppressions(relayd, rcpt) == []
        assert _events(relayd, "hard_bounce") == []
        # the stopped child was killed; a fresh one parses the same report, which now takes effect
        with smtplib.SMTP("127.0.0.1", relayd.inbound_port, timeout=60) as s:
            s.ehlo("mx.remote.example")
            s.mail("<>")
            s.rcpt(verp)
            assert s.data(bounce)[0] == 250
        assert _parser_child(relayd) not in (None, child)
        assert [e["kind"] for e in _events(relayd, "hard_bounce")] == ["hard_bounce"]
        assert _suppressions(relayd, rcpt) != []


def test_a_stuck_parser_child_dies_with_a_daemon_killed_by_sigkill(tmp_path: Path) -> None:
    """A stopped child reads no end of input: only the kernel's parent-death signal can end it."""
    with Sink() as sink, Relayd(tmp_path, routes={"example.test": sink.port}) as relayd:
        wait_for_port(relayd.inbound_port)
        with smtplib.SMTP("127.0.0.1", relayd.inbound_port, timeout=60) as s:
            s.ehlo("mx.remote.example")
            s.mail("<>")
            s.rcpt(f"postmaster@{INBOUND}")
            assert s.data(b"Subject: hello\r\n\r\nnot a report\r\n")[0] == 250
        child = _parser_child(relayd)
        assert child is not None
        os.kill(child, signal.SIGSTOP)
        relayd.kill()
    assert wait_until(lambda: not Path(f"/proc/{child}").exists() or _zombie(child), timeout=30)


def test_an_adversarial_dsn_to_postmaster_does_not_stall_submission(tmp_path: Path) -> None:
    """The headline attack: a 64 KB Diagnostic-Code of repeated phrase prefixes, to postmaster@ (no token
    needed). Whatever the classifier makes of it, a normal client's submission is answered meanwhile (a
    generous socket timeout is the hang detector), and so is the report."""
    with Sink() as sink, Relayd(tmp_path, routes={"example.test": sink.port}) as relayd:
        # 65,000 bytes of phrase prefixes: the longest Diagnostic-Code line the listener takes (64 KiB)
        reports = [_start_report(relayd, f"postmaster@{INBOUND}", _crlf(adversarial_dsn(65_000)))]
        try:
            for _ in range(3):
                with smtplib.SMTP("127.0.0.1", relayd.port, timeout=60) as s:
                    s.login("acme", PASSWORD)
                    s.mail("app@acme.example.test")
                    s.rcpt("bob@example.test")
                    assert s.data(message())[0] == 250
            for sock in reports:
                sock.settimeout(120)
                assert _lines(sock)[-1][:3] == "250"
        finally:
            for sock in reports:
                sock.close()


# --- the delivery client against a hostile MX ---------------------------------------------------------------

FLOOD_LINE = b"550-5.2.2 mailbox exceeded mailbox exceeded mailbox exceeded mailbox exceeded\r\n"


async def hostile_mx(
    at: bytes, lines: int, final: bytes = b"550 5.2.2 mailbox exceeded\r\n"
) -> tuple[asyncio.Server, Callable[[], Awaitable[None]]]:
    """An MX on 127.0.0.1 that answers the command ``at`` (``EHLO`` or ``RCPT``) with ``lines`` continuation
    lines, then ``final``; everything else as a plain server (no PIPELINING: one command at a time)."""

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            writer.write(b"220 hostile.example ESMTP\r\n")
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == at:
                    for _ in range(lines // 1000):
                        writer.write(FLOOD_LINE * 1000)
                        await writer.drain()
                    writer.write(FLOOD_LINE * (lines % 1000) + final)
                elif verb == b"EHLO":
                    writer.write(b"250-hostile.example\r\n250 8BITMIME\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go on\r\n")
                    while (body := await reader.readline()) and body != b".\r\n":
                        pass
                    writer.write(b"250 2.0.0 ok\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(session, "127.0.0.1", 0)

    async def stop() -> None:
        server.close()
        await server.wait_closed()

    return server, stop


async def _send_through(server: asyncio.Server) -> str:
    transport = Transport(
        helo="relayd.test", tls="none", connect_timeout=10, command_timeout=60, messages_per_connection=1
    )
    port = server.sockets[0].getsockname()[1]
    try:
        return await asyncio.wait_for(
            transport.send((("127.0.0.1", port),), "bounce@b.test", "rcpt@example.test", message() + b"\r\n"),
            120,
        )
    finally:
        await transport.close()


@pytest.mark.parametrize("at", [b"EHLO", b"RCPT"])
async def test_a_reply_of_100000_continuation_lines_fails_the_attempt_temporarily(at: bytes) -> None:
    server, stop = await hostile_mx(at, 100_000)
    try:
        with pytest.raises(TemporaryFailure) as info:
            await _send_through(server)
    finally:
        await stop()
    assert "longer than" in str(info.value)
    assert len(str(info.value)) < 1000


async def test_a_long_reply_keeps_its_code_and_a_clipped_text() -> None:
    server, stop = await hostile_mx(b"RCPT", 2000)
    try:
        with pytest.raises(PermanentFailure) as info:
            await _send_through(server)
    finally:
        await stop()
    err = info.value
    assert (err.code, err.command) == (550, "RCPT")
    assert err.text is not None
    assert len(err.text.splitlines()) <= MAX_REPLY_LINES
    assert len(err.text) <= MAX_REPLY_TEXT + MAX_REPLY_LINES
