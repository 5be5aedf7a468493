"""A minimal, fast counting SMTP sink for benchmarks (not a test peer: it checks nothing).

Runs in its own process so it doesn't compete with the load generator for the GIL; the count of messages
received is shared through a ``multiprocessing.Value``.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.sharedctypes
import socket
from typing import Any


class _SinkProtocol(asyncio.Protocol):
    def __init__(self, counter: Any) -> None:
        self.counter = counter
        self.buf = b""
        self.in_data = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(b"220 sink ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        out = []
        while True:
            if self.in_data:
                end = self.buf.find(b"\r\n.\r\n")
                if end < 0:
                    break
                self.buf = self.buf[end + 5 :]
                self.in_data = False
                with self.counter.get_lock():
                    self.counter.value += 1
                out.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            line, sep, rest = self.buf.partition(b"\r\n")
            if not sep:
                break
            self.buf = rest
            verb = line[:4].upper()
            if verb == b"EHLO":
                out.append(b"250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 100000000\r\n")
            elif verb == b"DATA":
                self.in_data = True
                self.buf = b"\r\n" + self.buf  # so a terminator right away is found
                out.append(b"354 go ahead\r\n")
            elif verb == b"QUIT":
                out.append(b"221 bye\r\n")
                self.transport.write(b"".join(out))
                self.transport.close()
                return
            else:
                out.append(b"250 Ok\r\n")
        if out:
            self.transport.write(b"".join(out))


def _serve(port: int, counter: Any, ready: Any) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _SinkProtocol(counter), "127.0.0.1", port, backlog=1024)
        ready.set()
        async with server:
            await server.serve_forever()

    asyncio.run(main())


class CountingSink:
    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.counter: Any = multiprocessing.Value("q", 0)
        ready = multiprocessing.Event()
        self.proc = multiprocessing.Process(target=_serve, args=(self.port, self.counter, ready), daemon=True)
        self.proc.start()
        ready.wait(10)

    @property
    def count(self) -> int:
        return int(self.counter.value)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.join(5)
