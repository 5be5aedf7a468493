"""Reports are parsed in a child process with a hard time limit, so that no input can stall a listener.

Why a process: the report parsers (:mod:`relayd.reports.dsn`, :mod:`relayd.reports.arf`) run regular
expressions and the
stdlib MIME parser over text that anyone on the internet may send to ``postmaster@``. The regex engine holds
the GIL for the whole match, so a slow path run in a thread still stops submission, inbound and web of the
process, and a match cannot be interrupted from Python. The parsers are meant to be linear in their input;
this is the line of defence for the slow path nobody has found yet. Only a process can be stopped mid-match.

How: one long-lived child (``python -P -m relayd.reports.parseworker``) per listening process, started by
the first report (an idle child costs ~24 MB, and most processes never see a report) and stopped at shutdown,
speaking length-prefixed frames over its stdin and stdout: the raw
message in, the pickled :class:`ParsedReport` out ("parse once": the ARF parse and the DSN classification
of one message come back as one object that every later step reads). Reports are parsed one at a time;
up to :data:`MAX_PENDING` may wait their turn (an MTA sends few reports at once), and beyond that
:class:`ParserBusy` is raised, which the listener answers with a 4xx so the MTA retries.

Failure: a report not parsed within ``[inbound] parse_timeout`` raises :class:`ParseAbandoned`; the child
is killed (SIGKILL: nothing else stops a match running in C) and a fresh one is started for the next
report. The child running out of memory or dying on its own is reported the same way, since for the
caller it is the same thing: this message could not be read, and sending it again will not help. (The
child sets no rlimit of its own: the systemd unit filters ``@resources``, setrlimit among them, and a
filtered call kills the caller; a memory cap belongs in the unit, e.g. ``MemoryMax=``.)
An exception raised by a parser itself (a bug; they are written never to raise) is re-raised here as
:class:`ParserFailed`, except RecursionError, which is re-raised as is (MIME nested too deeply to parse).

``relayd dsn classify`` and ``relayd arf parse`` stay in-process: they read files an operator chose, and
a daemon is nowhere near.

::

    ReportParseError
     ├── ParseAbandoned    over the time limit, out of memory, or the child died: killed and replaced
     ├── ParserBusy        too many reports already waiting for the child
     └── ParserFailed      a parser raised (a bug)
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
import logging
import os
import pickle
import signal
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, cast

from relayd.reports import arf, dsn
from relayd.reports.arf import ArfReport
from relayd.reports.dsn import DsnReport

log = logging.getLogger(__name__)

__all__ = [
    "ParseAbandoned",
    "ParseWorker",
    "ParsedReport",
    "ParserBusy",
    "ParserFailed",
    "ReportParseError",
    "parse_report",
]

#: ARF formats that are complaints in their own right: never read as a bounce, so not classified as one.
_ARF_ONLY = frozenset({"rfc5965", "hotmail-jmrp"})
#: What of a message the child is given. The report parts come first in a ``multipart/report`` (RFC 6522
#: §3); what lies beyond this is the tail of a returned original, which nothing here needs.
MAX_INPUT = 16 * 1024 * 1024
#: The largest answer accepted from the child: a parsed report holds parts of the message, never more.
_MAX_OUTPUT = 4 * MAX_INPUT
#: Reports parsed or waiting for the child, per process; one more gets :class:`ParserBusy`.
MAX_PENDING = 32
#: How long a child gets to exit after its stdin is closed at shutdown, before it is killed.
_CLOSE_GRACE = 2.0
#: How long a new child may take to start (interpreter, imports) before its first report: not part of
#: ``parse_timeout``, which bounds parsing, but bounded all the same.
_START_TIMEOUT = 60.0

DEFAULT_TARGET = "relayd.reports.parseworker:parse_report"

_HEADER = struct.Struct("!Q")
#: what the child writes once it has imported its parser: an empty frame
_READY = _HEADER.pack(0)


@dataclass(frozen=True, slots=True)
class ParsedReport:
    """One inbound message read once: its ARF reading, and its DSN reading unless it is a real ARF report
    (``dsn`` is None then: RFC 5965 and JMRP reports are complaints, never bounces)."""

    arf: ArfReport
    dsn: DsnReport | None


def parse_report(raw: bytes) -> ParsedReport:
    """ARF parse and, unless the message is an RFC 5965 or JMRP report, DSN classification. Pure; what
    the child runs, and what a listener without a worker runs in a thread."""
    report = arf.parse(raw)
    if report.is_arf and report.format in _ARF_ONLY:
        return ParsedReport(report, None)
    return ParsedReport(report, dsn.classify(raw))


class ReportParseError(Exception):
    """A report could not be parsed by the worker (see the module docstring for the tree)."""


class ParseAbandoned(ReportParseError):
    """The child gave no answer: ``why`` is ``timeout``, ``memory`` or ``crashed``."""

    def __init__(self, why: str) -> None:
        super().__init__(f"report parsing abandoned: {why}")
        self.why = why


class ParserBusy(ReportParseError):
    """Too many reports are waiting for the child; the sender should retry later."""


class ParserFailed(ReportParseError):
    """A parser raised in the child: a bug, named by the exception's type and message."""


class ParseWorker:
    """The parent's end: one child, one report at a time, ``timeout`` seconds each.

    ``target`` (``"module:function"``, taking the raw bytes and returning a :class:`ParsedReport`) is what
    the child runs; tests point it at a function that never returns."""

    def __init__(self, timeout: float, *, target: str = DEFAULT_TARGET) -> None:
        self.timeout = timeout
        self.target = target
        self._proc: asyncio.subprocess.Process | None = None
        self._ready = False  # has the child said it is ready?
        self._lock = asyncio.Lock()
        self._pending = 0
        self._reaping: set[asyncio.Task[int]] = set()
        self.replaced = 0  # children killed and replaced so far (for logs and tests)

    @property
    def pid(self) -> int | None:
        """The running child's pid, None when there is none."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    async def start(self) -> None:
        """Start the child now (it imports the parsers while the daemon goes on starting up)."""
        if self.pid is None:
            self._ready = False
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-P",  # no script or working directory on sys.path: only what relayd itself resolves
                "-m",
                "relayd.reports.parseworker",
                self.target,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )

    async def parse(self, raw: bytes) -> ParsedReport:
        """Parse ``raw`` (at most :data:`MAX_INPUT` bytes of it) in the child.

        Raises ParseAbandoned (the child was killed and is being replaced), ParserBusy, ParserFailed,
        or RecursionError (MIME nested too deeply)."""
        if self._pending >= MAX_PENDING:
            raise ParserBusy(f"{self._pending} reports already waiting for the parser")
        self._pending += 1
        try:
            async with self._lock:
                return await self._exchange(raw[:MAX_INPUT])
        finally:
            self._pending -= 1

    async def _exchange(self, data: bytes) -> ParsedReport:
        await self.start()
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        try:
            if not self._ready:
                async with asyncio.timeout(_START_TIMEOUT):
                    if await proc.stdout.readexactly(_HEADER.size) != _READY:
                        raise ValueError("no ready frame")
                self._ready = True
            async with asyncio.timeout(self.timeout):
                proc.stdin.write(_HEADER.pack(len(data)) + data)
                await proc.stdin.drain()
                (size,) = _HEADER.unpack(await proc.stdout.readexactly(_HEADER.size))
                if size > _MAX_OUTPUT:
                    raise ValueError(f"answer of {size} bytes")
                body = await proc.stdout.readexactly(size)
        except TimeoutError:
            self._replace("timeout")
            raise ParseAbandoned("timeout") from None
        except (OSError, EOFError, ValueError, asyncio.IncompleteReadError) as exc:
            self._replace(f"crashed ({exc!r})")
            raise ParseAbandoned("crashed") from exc
        except BaseException:
            # cancelled mid-exchange: the child's answer would be read as the next report's
            self._replace("cancelled")
            raise
        answer = pickle.loads(body)
        if answer[0] == "ok":
            return cast(ParsedReport, answer[1])
        _, name, text = answer
        if name == "MemoryError":
            self._replace("out of memory")
            raise ParseAbandoned("memory")
        if name == "RecursionError":
            raise RecursionError(text)
        raise ParserFailed(f"{name}: {text}")

    def _replace(self, why: str) -> None:
        """Kill the child (a stopped or looping one too) and start no new one until the next report or
        :meth:`start`; the caller's report is lost to parsing, never the daemon."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        self.replaced += 1
        log.warning("report parser (pid %d) killed and replaced: %s", proc.pid, why)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        task = asyncio.create_task(proc.wait())
        self._reaping.add(task)
        task.add_done_callback(self._reaping.discard)

    async def close(self) -> None:
        """Stop the child: end of input makes it exit; one that does not within a moment is killed."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), _CLOSE_GRACE)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._reaping:
            await asyncio.gather(*self._reaping, return_exceptions=True)


# -- the child ----------------------------------------------------------------------------------------------


def _load(target: str) -> Callable[[bytes], ParsedReport]:
    module, _, name = target.partition(":")
    return cast(Callable[[bytes], ParsedReport], getattr(importlib.import_module(module), name))


def _read_exactly(stream: BinaryIO, n: int) -> bytes | None:
    data = stream.read(n)
    return data if len(data) == n else None


#: prctl(2): the signal the kernel sends us when the process that started us dies
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """A child stuck in a match would outlive a daemon killed with -9 and burn a CPU until the match ends
    (end of input is only read between reports): have the kernel kill it with its parent (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def main(argv: list[str]) -> int:
    """The child's loop: read a frame, parse it, answer; exit at end of input (the parent closed the pipe
    or died). Ctrl-C in a terminal reaches the whole process group: the parent decides when we stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    # frames go to the pipe the parent reads; anything a library prints goes to stderr instead
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    target = _load(argv[0] if argv else DEFAULT_TARGET)
    out.write(_READY)
    out.flush()
    stdin = sys.stdin.buffer
    while (head := _read_exactly(stdin, _HEADER.size)) is not None:
        (size,) = _HEADER.unpack(head)
        raw = _read_exactly(stdin, size)
        if raw is None:
            return 0
        try:
            answer: tuple[object, ...] = ("ok", target(raw))
        except Exception as exc:  # the parent decides what a failure means
            answer = ("error", type(exc).__name__, str(exc)[:500])
        data = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
        out.write(_HEADER.pack(len(data)) + data)
        out.flush()
    return 0


if __name__ == "__main__":
    # run the module's own copy, not __main__'s: what the child pickles must name relayd.reports.parseworker
    from relayd.reports.parseworker import main as child_main

    sys.exit(child_main(sys.argv[1:]))
