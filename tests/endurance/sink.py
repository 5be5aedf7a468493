"""A receiving SMTP server that misbehaves on purpose, and counts what it really accepted.

Our own small asyncio server rather than aiosmtpd: the faults that matter happen *between* the protocol
steps aiosmtpd hands to a handler -- a connection cut half-way through the DATA lines, a stall after the
final dot past the client's timeout, a ``250`` the client never sees because the socket is closed right
after the message was stored. Each of those is one line here.

Per recipient address (deterministic, so the ledger can say what to expect):

* local part ending in ``-reject``: ``550 5.1.1`` at RCPT every time (a hard bounce);
* local part ending in ``-defer``: ``451 4.2.0`` at RCPT every time (retried until ``max_age``: expired).

Everything else draws from :class:`Faults` on every attempt. A message counts as delivered when its
``X-Endurance-Id`` marker was stored, i.e. right before a ``250`` to the final dot was (or was meant to be)
sent; the same marker twice is a duplicate (at-least-once delivery, never a loss).
"""

from __future__ import annotations

import asyncio
import random
import re
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.harness import free_port

MARKER = re.compile(rb"^X-Endurance-Id: (\d+)\r$", re.M)


@dataclass(frozen=True)
class Faults:
    """Probabilities, per attempt, of each way of misbehaving (the rest of the time: 250)."""

    greeting_421: float = 0.003
    mail_451: float = 0.01
    rcpt_421: float = 0.003  # and close, as a server shutting down does (shaping backs off on 421)
    rcpt_451: float = 0.03
    rcpt_550: float = 0.01  # a bounce out of the blue (not a block-list text: shaping would rest the IP)
    rcpt_stall: float = 0.005  # say nothing until the client gives up
    data_drop: float = 0.02  # close the connection half-way through the message lines
    data_451: float = 0.02  # read it all, then refuse for now
    data_stall_after_store: float = 0.005  # store it, then say nothing: the client will send it again
    data_drop_after_store: float = 0.01  # store it, then close before the 250: likewise
    stall_seconds: float = 3.0  # longer than the client's [delivery] command_timeout


@dataclass
class SinkStats:
    connections: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    markers: Counter[int] = field(default_factory=Counter)


class ChaosSink:
    """The server in a thread of its own with its own event loop; ``stats`` is read under ``lock``."""

    def __init__(self, faults: Faults, seed: int) -> None:
        self.faults = faults
        self.rng = random.Random(seed)
        self.port = free_port()
        self.stats = SinkStats()
        self.lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="chaos-sink", daemon=True)
        self._server: asyncio.Server | None = None

    def __enter__(self) -> ChaosSink:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> asyncio.Server:
        return await asyncio.start_server(self._session, "127.0.0.1", self.port, backlog=512)

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            sessions = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in sessions:
                task.cancel()
            await asyncio.gather(*sessions, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def markers(self) -> Counter[int]:
        with self.lock:
            return Counter(self.stats.markers)

    def fault_counts(self) -> Counter[str]:
        with self.lock:
            return Counter(self.stats.faults)

    def _roll(self, name: str) -> bool:
        if self.rng.random() < getattr(self.faults, name):
            with self.lock:
                self.stats.faults[name] += 1
            return True
        return False

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self.lock:
            self.stats.connections += 1
        try:
            await self._converse(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def say(line: str) -> None:
            writer.write(line.encode() + b"\r\n")

        if self._roll("greeting_421"):
            say("421 4.3.2 sink busy, closing")
            await writer.drain()
            return
        say("220 sink.test ESMTP chaos")
        rcpts: list[str] = []
        mail = False
        while True:
            await writer.drain()
            line = await reader.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                say("250-sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES")
            elif verb == b"MAIL":
                if self._roll("mail_451"):
                    say("451 4.3.0 sink: try MAIL again later")
                else:
                    mail, rcpts = True, []
                    say("250 2.1.0 ok")
            elif verb == b"RCPT":
                address = line.decode(errors="replace").partition("<")[2].partition(">")[0]
                local = address.rpartition("@")[0]
                if not mail:
                    say("503 5.5.1 need MAIL")
                elif local.endswith("-reject"):
                    say(f"550 5.1.1 <{address}>: user unknown")
                elif local.endswith("-defer"):
                    say(f"451 4.2.0 <{address}>: mailbox busy, try later")
                elif self._roll("rcpt_421"):
                    say("421 4.3.2 sink shutting down")
                    await writer.drain()
                    return
                elif self._roll("rcpt_451"):
                    say("451 4.3.0 sink: try RCPT again later")
                elif self._roll("rcpt_550"):
                    say(f"550 5.2.1 <{address}>: mailbox disabled")
                elif self._roll("rcpt_stall"):
                    await asyncio.sleep(self.faults.stall_seconds)
                    return
                else:
                    rcpts.append(address)
                    say("250 2.1.5 ok")
            elif verb == b"DATA":
                if not rcpts:
                    say("503 5.5.1 need RCPT")
                    continue
                say("354 go ahead")
                await writer.drain()
                if not await self._data(reader, say):
                    return
                mail, rcpts = False, []
            elif verb == b"RSET":
                mail, rcpts = False, []
                say("250 2.0.0 ok")
            elif verb == b"NOOP":
                say("250 2.0.0 ok")
            elif verb == b"QUIT":
                say("221 2.0.0 bye")
                await writer.drain()
                return
            else:
                say("502 5.5.2 not implemented")

    async def _data(self, reader: asyncio.StreamReader, say: Callable[[str], None]) -> bool:
        """Read one message; False when the connection is to be closed."""
        drop_at = 3 if self._roll("data_drop") else -1
        lines: list[bytes] = []
        while True:
            line = await reader.readline()
            if not line:
                return False
            if len(lines) == drop_at:
                return False  # cut half-way: the client has no reply, nothing was stored
            if line == b".\r\n":
                break
            lines.append(line)
        if self._roll("data_451"):
            say("451 4.3.0 sink: try DATA again later")
            return True
        found = MARKER.search(b"".join(lines))
        with self.lock:
            self.stats.markers[int(found.group(1)) if found else -1] += 1
        if self._roll("data_stall_after_store"):
            await asyncio.sleep(self.faults.stall_seconds)
            return False
        if self._roll("data_drop_after_store"):
            return False
        say("250 2.0.0 ok: stored")
        return True
