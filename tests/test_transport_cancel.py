"""A delivery attempt abandoned half way (shutdown cancels it) closes its connection at once.

Why it matters: the scheduler's ``stop()`` cancels attempts in flight; a connection that was checked out of
the pool at that moment is in no pool, so nothing else closes it. Left to the garbage collector it stays
open on both ends until then, and counts against its lane's connection cap for ever.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from relayd.queue.transport.client import Transport


class _Server:
    """An SMTP server on 127.0.0.1 that answers everything but never answers the end of DATA (or, with
    ``greet=False``, never greets): the client is stuck where the test wants to cancel it."""

    def __init__(self, *, greet: bool) -> None:
        self.greet = greet
        self.reached = asyncio.Event()  # the client got as far as the test wanted
        self.closed = asyncio.Event()  # the client closed its end
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not self.greet:
                self.reached.set()
                await reader.read()  # until the client closes
                return
            writer.write(b"220 sink.test ESMTP\r\n")
            in_data = False
            while line := await reader.readline():
                if in_data:
                    if line == b".\r\n":
                        self.reached.set()  # and no reply: the client waits for it
                    continue
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-sink.test\r\n250 PIPELINING\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go on\r\n")
                    in_data = True
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        finally:
            self.closed.set()
            writer.close()


@pytest.fixture(params=[True, False], ids=["mid-transaction", "before-the-greeting"])
async def server(request: pytest.FixtureRequest) -> AsyncIterator[_Server]:
    srv = _Server(greet=request.param)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


async def test_a_cancelled_attempt_closes_its_connection(server: _Server) -> None:
    transport = Transport(
        helo="relayd.test", tls="none", connect_timeout=5, command_timeout=30, messages_per_connection=10
    )
    data = b"From: a@acme.example.test\r\nTo: r@example.test\r\nSubject: x\r\n\r\nbody\r\n"
    attempt = asyncio.create_task(
        transport.send((("127.0.0.1", server.port),), "a@acme.example.test", "r@example.test", data)
    )
    await asyncio.wait_for(server.reached.wait(), 10)
    attempt.cancel()
    with pytest.raises(asyncio.CancelledError):
        await attempt
    # closed by the transport itself, not by the garbage collector or the transport's close()
    await asyncio.wait_for(server.closed.wait(), 5)
    assert transport.open_connections("") == 0
    await transport.close()
