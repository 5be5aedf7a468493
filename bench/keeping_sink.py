"""A counting SMTP sink that also counts recipients, remembers when the last message arrived and can keep
the first N messages on disk (for DKIM verification after a benchmark run).

bench/e2e.py measures into Postfix's C smtp-sink (bench/smtp_sink.py); this sink serves its
``--chunking-sink`` runs. It runs in its own process (uvloop when available), so it doesn't compete with
the load generator for the GIL, and checks nothing. With ``chunking=True`` it also offers CHUNKING (RFC
3030, ``BDAT``), as Gmail, Microsoft and Postfix's smtpd do; a client that doesn't use it ends messages
with ``<CRLF>.<CRLF>`` as usual. Counters are shared through ``multiprocessing.Value``;
:meth:`KeepingSink.start_keeping` makes it write the next N messages (dot-unstuffed, as the client meant
them) to ``<keep_dir>/<tag>-<seq>.eml``.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import socket
import time
from pathlib import Path
from typing import Any


class _State:
    def __init__(self) -> None:
        self.messages: Any = multiprocessing.Value("q", 0)
        self.recipients: Any = multiprocessing.Value("q", 0)
        self.last: Any = multiprocessing.Value("d", 0.0)  # time.time() of the last message's end of data
        self.keep: Any = multiprocessing.Value("q", 0)  # how many more messages to write to disk
        self.tag: Any = multiprocessing.Value("q", 0)
        self.seq: Any = multiprocessing.Value("q", 0)


_EHLO = b"250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 100000000\r\n"
_EHLO_CHUNKING = b"250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-CHUNKING\r\n250 SIZE 100000000\r\n"


class _Protocol(asyncio.Protocol):
    def __init__(self, st: _State, keep_dir: Path, chunking: bool) -> None:
        self.st = st
        self.keep_dir = keep_dir
        self.ehlo = _EHLO_CHUNKING if chunking else _EHLO
        self.buf = b""
        self.in_data = False
        self.chunk_left = 0  # bytes of a BDAT chunk still to come
        self.chunks: list[bytes] = []
        self.last_chunk = False
        self.rcpts = 0
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # uvloop's transports are not asyncio.Transport
        self.transport.write(b"220 sink ESMTP\r\n")

    def _delivered(self, body: bytes, *, stuffed: bool = True) -> None:
        st = self.st
        with st.messages.get_lock():
            st.messages.value += 1
        with st.recipients.get_lock():
            st.recipients.value += max(1, self.rcpts)
        st.last.value = time.time()
        if st.keep.value > 0:
            with st.keep.get_lock():
                take = st.keep.value > 0
                if take:
                    st.keep.value -= 1
                    st.seq.value += 1
                    name = f"{st.tag.value}-{st.seq.value:06d}.eml"
            if take:
                # DATA: body starts with the CRLF put in front at DATA; undo dot-stuffing (RFC 5321
                # §4.5.2). BDAT: the chunks are the message as it is.
                msg = body[2:].replace(b"\r\n..", b"\r\n.") + b"\r\n" if stuffed else body
                (self.keep_dir / name).write_bytes(msg)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        out = []
        while True:
            if self.chunk_left:
                take = self.buf[: self.chunk_left]
                self.buf = self.buf[len(take) :]
                self.chunk_left -= len(take)
                self.chunks.append(take)
                if self.chunk_left:
                    break
                if self.last_chunk:
                    self._delivered(b"".join(self.chunks), stuffed=False)
                    self.chunks, self.rcpts = [], 0
                    out.append(b"250 2.0.0 Ok: queued\r\n")
                else:
                    out.append(b"250 2.0.0 Ok: chunk\r\n")
                continue
            if self.in_data:
                end = self.buf.find(b"\r\n.\r\n")
                if end < 0:
                    break
                body = self.buf[:end]
                self.buf = self.buf[end + 5 :]
                self.in_data = False
                self._delivered(body)
                self.rcpts = 0
                out.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            line, sep, rest = self.buf.partition(b"\r\n")
            if not sep:
                break
            self.buf = rest
            verb = line[:4].upper()
            if verb == b"EHLO":
                out.append(self.ehlo)
            elif verb == b"BDAT":
                words = line.split()
                self.chunk_left = int(words[1])
                self.last_chunk = len(words) > 2 and words[2].upper() == b"LAST"
                if not self.chunk_left:  # an empty chunk: nothing to read
                    if self.last_chunk:
                        self._delivered(b"".join(self.chunks), stuffed=False)
                        self.chunks, self.rcpts = [], 0
                    out.append(b"250 2.0.0 Ok\r\n")
            elif verb == b"RCPT":
                self.rcpts += 1
                out.append(b"250 2.1.5 Ok\r\n")
            elif verb == b"RSET" or verb == b"MAIL":
                self.rcpts = 0
                out.append(b"250 2.0.0 Ok\r\n")
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


def _serve(port: int, st: _State, keep_dir: Path, ready: Any, chunking: bool) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not whatever handler the parent had installed
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which stops the sink
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _Protocol(st, keep_dir, chunking), "127.0.0.1", port, backlog=1024
        )
        ready.set()
        async with server:
            await server.serve_forever()

    asyncio.run(main())


class KeepingSink:
    def __init__(self, keep_dir: Path, *, chunking: bool = False, port: int | None = None) -> None:
        if port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
        self.port = port
        self.keep_dir = Path(keep_dir)
        self.keep_dir.mkdir(parents=True, exist_ok=True)
        self._st = _State()
        ready = multiprocessing.Event()
        self.proc = multiprocessing.Process(
            target=_serve, args=(self.port, self._st, self.keep_dir, ready, chunking), daemon=True
        )
        self.proc.start()
        if not ready.wait(10):
            raise RuntimeError("sink did not start")

    @property
    def pid(self) -> int:
        """The sink's process (its CPU time is reported beside each contender's: they share the CPUs)."""
        assert self.proc.pid is not None
        return self.proc.pid

    @property
    def messages(self) -> int:
        """Transactions received (one per message per delivery attempt that ended with 250)."""
        return int(self._st.messages.value)

    @property
    def recipients(self) -> int:
        """Recipients of those transactions (a message to 10 recipients in one transaction counts 10)."""
        return int(self._st.recipients.value)

    @property
    def last(self) -> float:
        return float(self._st.last.value)

    def start_keeping(self, n: int, tag: int) -> None:
        self._st.tag.value = tag
        self._st.seq.value = 0
        self._st.keep.value = n

    def kept(self, tag: int) -> list[Path]:
        return sorted(self.keep_dir.glob(f"{tag}-*.eml"))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
