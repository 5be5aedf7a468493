"""aiosmtpd's SMTP protocol, made strict where a relay has to be.

What this subclass changes, and why:

* DATA is read by our own loop: only ``<CR><LF>.<CR><LF>`` ends a message (aiosmtpd >= 1.4.6 does that too),
  and any bare LF or bare CR in the stream makes the whole message refused with ``554 5.5.2`` after the real
  terminator, as Postfix >= 3.9 does (``smtpd_forbid_bare_newline``). That is the SMTP smuggling defence
  (Longin, SEC Consult, 2023): ``\\n.\\n``, ``\\r.\\r`` and friends can never end one message and start a
  second one here, and we never pass such bytes on to a server that might read them differently.
* Oversized messages and over-long lines are read to the end and then refused once (RFC 5321 §4.2.5).
* Separate timeouts: ``command_timeout`` between commands, ``data_timeout`` for the whole DATA phase
  (slowloris), each answered with ``421 4.4.2`` before the connection is closed.
* Connection limits (total and per client IP) are checked before the greeting and answered ``421 4.7.0``.
* An exception in our own code answers ``451 4.3.0`` (our fault, temporary) and never shows its text;
  aiosmtpd's default is a ``500`` with the exception message.
"""

from __future__ import annotations

import asyncio
import builtins
import inspect
import logging
import re
from collections import Counter
from typing import Any, ClassVar, cast

import aiosmtpd.smtp
from aiosmtpd.smtp import SMTP, Envelope, Session

log = logging.getLogger(__name__)

MAX_LINE = 1000  # 998 octets + CRLF, RFC 5322 §2.1.1

# A plain ``<local@domain>`` path (dot-atom local part, hostname domain): what nearly every MAIL/RCPT is.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_PATH = re.compile(
    rf"\s*<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*)>(.*)\Z",
    re.S,
)


class _MemberCache:
    """Stand-in for the ``inspect`` module and ``dir`` builtin inside aiosmtpd.smtp.

    aiosmtpd's ``SMTP.__init__`` looks up its ``auth_*``, ``handle_*`` and ``smtp_*`` methods with
    ``inspect.getmembers``/``dir`` on every connection: about 0.1 ms of CPU, a tenth of what a message
    costs us under load (py-spy). The method *names* depend only on the class, so they are computed once
    per class; the bound methods are still looked up on each instance, so behaviour is unchanged.
    """

    signature = staticmethod(inspect.signature)
    _names: ClassVar[dict[tuple[type, str], tuple[str, ...]]] = {}

    @classmethod
    def _cached(cls, obj: object, kind: str) -> tuple[str, ...]:
        key = (type(obj), kind)
        names = cls._names.get(key)
        if names is None:
            names = cls._names[key] = tuple(n for n in builtins.dir(obj) if n.startswith(kind))
        return names

    @classmethod
    def getmembers(cls, obj: object) -> list[tuple[str, Any]]:
        # aiosmtpd only keeps the auth_* members of what this returns
        return [(n, getattr(obj, n)) for n in cls._cached(obj, "auth_")]

    @classmethod
    def dir(cls, obj: object) -> list[str]:
        # aiosmtpd only keeps the handle_* / smtp_* names of what this returns
        return [*cls._cached(obj, "handle_"), *cls._cached(obj, "smtp_")]


aiosmtpd.smtp.inspect = _MemberCache  # type: ignore[assignment,attr-defined]
aiosmtpd.smtp.dir = _MemberCache.dir  # type: ignore[attr-defined]


class ConnectionLimits:
    """Counts open connections, in total and per client IP, across all listeners of one kind."""

    def __init__(self, total: int, per_ip: int) -> None:
        self.total = total
        self.per_ip = per_ip
        self._by_ip: Counter[str] = Counter()
        self._open = 0

    def admit(self, ip: str) -> str | None:
        """Register a connection, or return the reply that refuses it."""
        if self._open >= self.total:
            return "421 4.7.0 Too many connections, try again later"
        if self._by_ip[ip] >= self.per_ip:
            return "421 4.7.0 Too many connections from your address, try again later"
        self._open += 1
        self._by_ip[ip] += 1
        return None

    def release(self, ip: str) -> None:
        self._open -= 1
        self._by_ip[ip] -= 1
        if self._by_ip[ip] <= 0:
            del self._by_ip[ip]

    @property
    def open(self) -> int:
        return self._open


class RelaySession(Session):
    """aiosmtpd's session plus who the client is to us."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.account: str | None = None


class RelayEnvelope(Envelope):
    """aiosmtpd's envelope plus the recipients policy accepted only to drop (spam traps)."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped: set[str] = set()


class StrictSMTP(SMTP):
    line_length_limit = MAX_LINE + 1

    def __init__(
        self,
        handler: Any,
        *,
        limits: ConnectionLimits,
        data_timeout: float,
        on_close: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self._limits = limits
        self._data_timeout = data_timeout
        self._on_close = on_close

    def _create_session(self) -> RelaySession:
        return RelaySession(self.loop)

    def _create_envelope(self) -> RelayEnvelope:
        return RelayEnvelope()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """Plain ``<local@domain>`` paths are taken apart with one regex; anything else (quoted local
        parts, address literals, the null path, source routes) goes to aiosmtpd's full RFC 5322 parser,
        which costs ~50 us a call (two per message)."""
        m = _SIMPLE_PATH.match(arg) if arg else None
        if m is not None and not (
            self.local_part_limit and len(m.group(1).partition("@")[0]) > self.local_part_limit
        ):
            return m.group(1), m.group(2)
        return super()._getaddr(arg)

    @property
    def peer_ip(self) -> str:
        peer = self.session.peer if self.session is not None else None
        return str(peer[0]) if isinstance(peer, tuple) else "unknown"

    async def _handle_client(self) -> None:
        ip = self.peer_ip
        refusal = self._limits.admit(ip)
        if refusal is not None:
            log.warning("%s: %s", ip, refusal)
            await self.push(refusal)
            if self.transport is not None:
                self.transport.close()
            return
        try:
            await super()._handle_client()
        finally:
            self._limits.release(ip)
            if self._on_close is not None:
                self._on_close(self)

    def _timeout_cb(self) -> None:
        # uvloop's transports are not asyncio.WriteTransport subclasses, so no isinstance() here
        transport = cast(asyncio.WriteTransport | None, self.transport)
        if transport is not None and not transport.is_closing():
            transport.write(f"421 4.4.2 {self.hostname} Error: timeout exceeded\r\n".encode())
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self._reset_timeout(self._data_timeout)

        lines: list[bytes] = []
        size = 0
        limit = self.data_size_limit
        problem: str | None = None
        continuation = False  # the previous read ended inside an over-long line
        while self.transport is not None:
            try:
                line = await self._reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError as exc:
                await self._reader.read(exc.consumed)
                size += exc.consumed
                continuation = True
                problem = problem or "554 5.6.0 Message has a line over 998 characters (RFC 5322 2.1.1)"
                lines.clear()
                continue
            except asyncio.IncompleteReadError:
                return  # client went away mid-DATA: nothing was accepted
            if line == b".\r\n" and not continuation:
                break
            continuation = False
            size += len(line)
            if problem is not None:
                continue
            if line.count(b"\n") != 1 or line.count(b"\r") != 1:
                # a CR or LF that is not part of CRLF: refuse, never guess (SMTP smuggling)
                problem = "554 5.5.2 Error: bare <CR> or <LF> received in message data"
                lines.clear()
            elif limit and size > limit:
                problem = f"552 5.3.4 Message size exceeds fixed limit of {limit} bytes"
                lines.clear()
            else:
                lines.append(line[1:] if line[:1] == b"." else line)  # RFC 5321 §4.5.2 dot-unstuffing
        else:
            return
        self._reset_timeout()
        if problem is not None:
            log.info("%s: DATA refused: %s", self.peer_ip, problem)
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push(problem)
            return
        content = b"".join(lines)
        self.envelope.content = content
        self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push(status if isinstance(status, str) else "451 4.3.0 Internal error, try again later")
