"""The next copy's MAIL, RCPT and DATA go in the write that ends the copy before it (RFC 2920 §3.1: message
content may begin a group), on a connection the transport keeps for that copy (``Transport.send`` with
``then``/``primed``); relayd sends a message's recipients one transaction each, so a write and a wait fewer
per transaction count.

The server side is an SMTP server on 127.0.0.1 that reads what arrives one segment at a time and notes,
for each end of data, whether the next transaction's commands came in the same segment; Postfix's
``smtp-sink`` is the real pipelining peer of the end-to-end test (a 10-recipient message through relayd).
"""

from __future__ import annotations

import asyncio
import re
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from relayd.core.errors import PermanentFailure
from relayd.core.tokens import verify_token, verp_token
from relayd.queue.transport.client import Next, Transport
from tests.harness import PostfixSink, Relayd, message, wait_until

HOST = "127.0.0.1"


@dataclass
class Delivered:
    conn: int
    mail_from: str
    rcpt: str
    body: bytes
    ahead: bool  # the next transaction's commands came in the segment that ended this one's data


@dataclass
class Recorder:
    """What the server saw, across its connections."""

    pipelining: bool = True
    chunking: bool = False  # offer CHUNKING: the client then sends BDAT
    keep: bool = True  # keep each message's body (False: count its bytes only)
    refuse: set[str] = field(default_factory=set)  # recipients whose content gets 550
    close_after: int = 0  # close each connection after this many messages (0: never)
    delivered: list[Delivered] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    ended_in_data: int = 0  # connections that closed while a message's content was coming
    connections: int = 0


class _Session(asyncio.Protocol):
    def __init__(self, rec: Recorder) -> None:
        self.rec = rec
        rec.connections += 1
        self.no = rec.connections
        self.buf = b""
        self.data: list[bytes] | None = None
        self.size = 0  # of the message coming, when its body is not kept
        self.chunk = 0  # octets of a BDAT chunk still to come
        self.mail_from = self.rcpt = ""
        self.count = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.t = transport
        transport.write(b"220 rec.test ESMTP\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.data is not None:
            self.rec.ended_in_data += 1

    def data_received(self, segment: bytes) -> None:
        if self.chunk:
            taken, segment = segment[: self.chunk], segment[self.chunk :]
            self.chunk -= len(taken)
            self.size += len(taken)
            if self.chunk:
                return
            self.data = []
            self._ended(False)
        self.buf += segment
        lines = self.buf.split(b"\r\n")
        self.buf = leftover = lines.pop()
        for i, line in enumerate(lines):
            if self.t.is_closing():
                return
            if self.data is not None:
                if line != b".":
                    if self.rec.keep:
                        self.data.append(line)
                    else:
                        self.size += len(line) + 2
                    continue
                ahead = i + 1 < len(lines) and lines[i + 1].upper().startswith(b"MAIL FROM:")
                self._ended(ahead)
                continue
            self._command(line.decode())
            if self.chunk:  # a BDAT chunk follows its command line: the rest of this segment starts it
                rest = b"\r\n".join(lines[i + 1 :])
                self.buf = b""
                self.data_received(rest + b"\r\n" + leftover if i + 1 < len(lines) else leftover)
                return

    def _ended(self, ahead: bool) -> None:
        assert self.data is not None
        body = b"\r\n".join(self.data) if self.rec.keep else b"%d" % self.size
        self.data, self.size = None, 0
        if self.rcpt in self.rec.refuse:
            self.t.write(b"550 5.7.1 content refused\r\n")
            return
        self.rec.delivered.append(Delivered(self.no, self.mail_from, self.rcpt, body, ahead))
        self.t.write(b"250 2.0.0 ok\r\n")
        self.count += 1
        if self.rec.close_after and self.count >= self.rec.close_after:
            self.t.close()  # a server's own limit of messages per connection, without a word

    def _command(self, line: str) -> None:
        self.rec.commands.append(line)
        verb = line[:4].upper()
        if verb == "EHLO":
            self.t.write(
                b"250-rec.test\r\n250-SIZE 100000000\r\n" + b"250-PIPELINING\r\n" * self.rec.pipelining
            )
            self.t.write(b"250-CHUNKING\r\n" * self.rec.chunking)
            self.t.write(b"250 8BITMIME\r\n")
        elif verb == "MAIL":
            self.mail_from = re.match(r"MAIL FROM:<([^>]*)>", line, re.I).group(1)  # type: ignore[union-attr]
            self.t.write(b"250 2.1.0 ok\r\n")
        elif verb == "RCPT":
            self.rcpt = re.match(r"RCPT TO:<([^>]*)>", line, re.I).group(1)  # type: ignore[union-attr]
            self.t.write(b"250 2.1.5 ok\r\n")
        elif verb == "BDAT":
            self.chunk = int(line.split()[1])  # this test's client sends one chunk, LAST
        elif verb == "DATA":
            self.data = []
            self.t.write(b"354 go on\r\n")
        elif verb == "QUIT":
            self.t.write(b"221 bye\r\n")
            self.t.close()
        else:
            self.t.write(b"250 ok\r\n")


@pytest.fixture
async def server() -> AsyncIterator[tuple[Recorder, int]]:
    rec = Recorder()
    srv = await asyncio.get_running_loop().create_server(lambda: _Session(rec), HOST, 0)
    try:
        yield rec, srv.sockets[0].getsockname()[1]
    finally:
        srv.close()


def _transport(limit: int = 100) -> Transport:
    return Transport(
        helo="relayd.test", tls="none", connect_timeout=5, command_timeout=10, messages_per_connection=limit
    )


def _copy(n: int) -> bytes:
    return f"From: a@acme.example.test\r\nTo: r{n}@example.test\r\nSubject: {n}\r\n\r\ncopy {n}\r\n".encode()


def _next(n: int) -> Next:
    return Next(f"b{n}@bounces.test", f"r{n}@example.test", _copy(n))


async def _send_all(transport: Transport, port: int, n: int) -> list[str]:
    """Copies 0..n-1 as the scheduler sends a message's copies: each with the next one behind it."""
    hosts = ((HOST, port),)
    replies, primed = [], None
    for k in range(n):
        this = primed or _next(k)
        then = _next(k + 1) if k + 1 < n else None
        replies.append(
            await transport.send(hosts, this.mail_from, this.rcpt, this.data, then=then, primed=primed)
        )
        primed = then
    return replies


async def test_the_next_copys_commands_go_behind_the_content_and_each_copy_is_its_own_transaction(
    server: tuple[Recorder, int],
) -> None:
    rec, port = server
    transport = _transport()
    replies = await _send_all(transport, port, 5)
    assert all(r.startswith("250") for r in replies)
    assert [(d.mail_from, d.rcpt) for d in rec.delivered] == [
        (f"b{k}@bounces.test", f"r{k}@example.test") for k in range(5)
    ]
    assert [d.body for d in rec.delivered] == [_copy(k).removesuffix(b"\r\n") for k in range(5)]
    assert [d.ahead for d in rec.delivered] == [True] * 4 + [False], "copies 1-4 began in the segment before"
    assert rec.connections == 1
    assert sum(c.startswith("MAIL") for c in rec.commands) == 5, "no transaction sent twice"
    assert not any(c.startswith("RSET") for c in rec.commands)
    await transport.close()
    assert transport.open_connections("") == 0


async def test_refused_content_still_leaves_the_next_copy_primed(server: tuple[Recorder, int]) -> None:
    rec, port = server
    rec.refuse = {"r1@example.test"}
    transport = _transport()
    hosts = ((HOST, port),)
    first, second, third = _next(0), _next(1), _next(2)
    await transport.send(hosts, first.mail_from, first.rcpt, first.data, then=second)
    assert second.conn is not None
    with pytest.raises(PermanentFailure):
        await transport.send(hosts, second.mail_from, second.rcpt, second.data, then=third, primed=second)
    assert third.conn is not None, "the server read the next commands behind the refused content"
    await transport.send(hosts, third.mail_from, third.rcpt, third.data, primed=third)
    assert [d.rcpt for d in rec.delivered] == ["r0@example.test", "r2@example.test"]
    assert rec.connections == 1 and not any(c.startswith("RSET") for c in rec.commands)
    await transport.close()


async def test_an_abandoned_primed_connection_is_closed_without_ending_a_message(
    server: tuple[Recorder, int],
) -> None:
    rec, port = server
    transport = _transport()
    first, second = _next(0), _next(1)
    await transport.send(((HOST, port),), first.mail_from, first.rcpt, first.data, then=second)
    assert transport.open_connections("") == 1
    transport.abandon(second)  # the scheduler will not send it here (a block reply, a slow-down)
    assert second.conn is None and transport.open_connections("") == 0
    assert await asyncio.to_thread(wait_until, lambda: rec.ended_in_data == 1)
    assert [d.rcpt for d in rec.delivered] == ["r0@example.test"], "the 354 got no message"
    await transport.close()


async def test_a_primed_connection_the_server_closed_is_retried_on_a_new_one(
    server: tuple[Recorder, int],
) -> None:
    rec, port = server
    rec.close_after = 1
    transport = _transport()
    replies = await _send_all(transport, port, 3)
    assert all(r.startswith("250") for r in replies)
    assert [d.rcpt for d in rec.delivered] == [f"r{k}@example.test" for k in range(3)], "each once"
    assert rec.connections == 3
    await transport.close()


async def test_the_next_copy_is_primed_only_within_the_messages_per_connection(
    server: tuple[Recorder, int],
) -> None:
    rec, port = server
    transport = _transport(limit=2)
    await _send_all(transport, port, 5)
    assert [d.rcpt for d in rec.delivered] == [f"r{k}@example.test" for k in range(5)]
    assert [d.conn for d in rec.delivered] == [1, 1, 2, 2, 3]
    assert [d.ahead for d in rec.delivered] == [True, False, True, False, False]
    await transport.close()


async def test_without_pipelining_each_copy_waits_for_its_replies(server: tuple[Recorder, int]) -> None:
    rec, port = server
    rec.pipelining = False
    transport = _transport()
    await _send_all(transport, port, 3)
    assert [d.rcpt for d in rec.delivered] == [f"r{k}@example.test" for k in range(3)]
    assert not any(d.ahead for d in rec.delivered)
    assert rec.connections == 1
    await transport.close()


@pytest.mark.parametrize("chunking", [False, True], ids=["DATA", "BDAT"])
async def test_a_big_copy_is_written_a_window_at_a_time_not_held_whole(
    server: tuple[Recorder, int], chunking: bool
) -> None:
    """A 20 MB copy (the pieces relayd.policy.render makes: slices of the stored message) goes out
    without the client ever holding it whole again, stuffed or joined: with the next copy's commands
    behind it (DATA) and as one BDAT chunk. Python's allocations are traced while it is sent (the server
    here counts the bytes it gets and keeps none)."""
    rec, port = server
    rec.keep, rec.chunking = False, chunking
    stored = b"".join(
        b"line %07d of a big attachment, base64-like text........\r\n" % i for i in range(330_000)
    )
    head = b"From: a@acme.example.test\r\nTo: r0@example.test\r\nSubject: big\r\n\r\n"
    view = memoryview(stored)
    big = [head, *(view[at : at + (1 << 20)] for at in range(0, len(stored), 1 << 20))]
    transport = _transport()
    hosts = ((HOST, port),)
    first, second = Next("b0@bounces.test", "r0@example.test", big), _next(1)
    tracemalloc.start()
    try:
        await transport.send(hosts, first.mail_from, first.rcpt, first.data, then=second)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    await transport.send(hosts, second.mail_from, second.rcpt, second.data, primed=second)
    assert peak < 4_000_000, f"{peak} bytes traced while sending a {len(stored)}-byte copy"
    assert [d.rcpt for d in rec.delivered] == ["r0@example.test", "r1@example.test"]
    assert rec.delivered[0].body == b"%d" % (len(head) + len(stored)), "the whole copy arrived"
    await transport.close()


def test_a_message_to_ten_recipients_reaches_postfix_smtp_sink_as_ten_transactions(tmp_path: Path) -> None:
    """Through relayd, into a real pipelining server: every copy arrives once, with its own recipient and
    its own VERP return path."""
    rcpts = [f"user{i}@example.test" for i in range(10)]
    with PostfixSink() as psink, Relayd(tmp_path, routes={"example.test": psink.port}) as relayd:
        code, _ = relayd.submit(message(), to=rcpts)
        assert code == 250
        assert wait_until(lambda: relayd.log_text().count("status=delivered") == 10)
        assert wait_until(lambda: len(psink.dumps()) == 10)
        dumps = [d.decode() for d in psink.dumps()]
    secret = bytes.fromhex((tmp_path / "secret.key").read_text().strip())
    got = {}
    for dump in dumps:
        rcpt = re.findall(r"^X-Rcpt-Args: <([^>]*)>", dump, re.M)
        sender = re.search(r"^X-Mail-Args: <([^>]*)>", dump, re.M)
        assert len(rcpt) == 1 and sender is not None, "one recipient per transaction"
        token = verp_token(sender.group(1))
        assert token is not None and verify_token(secret, "verp", token, rcpt[0]) is not None
        got[rcpt[0]] = dump
    assert sorted(got) == rcpts
