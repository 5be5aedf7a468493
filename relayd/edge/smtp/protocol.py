"""aiosmtpd's SMTP protocol, made strict where a relay has to be.

What this subclass changes, and why:

* DATA is read by our own loop: only ``<CR><LF>.<CR><LF>`` ends a message (aiosmtpd >= 1.4.6 does that too).
  That is the SMTP smuggling defence (Longin, SEC Consult, 2023): ``\\n.\\n``, ``\\r.\\r`` and friends can
  never end one message and start a second one here, and we never pass such bytes on to a server that might
  read them differently. A bare LF is handled as Postfix 3.9's ``smtpd_forbid_bare_newline`` does, by the
  listener's ``bare_newline`` setting: ``normalize`` takes a content line ending in a bare LF as if it ended
  in CRLF (``smtplib.sendmail(..., msg.as_bytes())`` sends such lines), ``reject`` refuses the whole message
  with ``554 5.5.2`` after the real terminator. Either way a ``.`` line that follows a bare LF, or that ends
  in one, is content, never the end of the data. A bare CR (not followed by LF) is refused ``554 5.5.2`` in
  both modes: no sender we know of ends lines with CR alone, Postfix's ``normalize`` leaves it alone too, and
  guessing what it means is exactly the ambiguity smuggling lives on.
* Oversized messages and over-long lines are read to the end and then refused once (RFC 5321 §4.2.5).
* Separate timeouts: ``command_timeout`` between commands, ``data_timeout`` for the whole DATA phase
  (slowloris), each answered with ``421 4.4.2`` before the connection is closed.
* Connection limits (total and per client IP) are checked before the greeting and answered ``421 4.7.0``.
* An exception in our own code answers ``451 4.3.0`` (our fault, temporary) and never shows its text;
  aiosmtpd's default is a ``500`` with the exception message.

Hostile clients, and what bounds the memory each one can make us use:

* Idle and slow clients (slowloris) hold a connection slot, nothing else: the per-IP limit stops one source
  from taking them all, and ``command_timeout`` only restarts on a complete, recognised command, so dripping
  bytes buys nothing. The listen backlog is :data:`BACKLOG` so a connection flood does not make the kernel
  drop a real client's SYN.
* Pipelining floods: replies go through ``drain()``, so a client that writes and never reads stops us
  reading from it once its unread replies reach the transport's high-water mark; the StreamReader pauses the
  socket at twice the line limit. Neither side's buffer grows with the number of commands.
* Errors: every protocol error (``500``-``504``, ``530``, ``452 4.5.3``) counts; at ``max_errors`` since the
  last accepted message the client gets ``421 4.7.0`` and is disconnected (Postfix's
  ``smtpd_hard_error_limit``). Policy refusals (``550 5.7.1 ... suppressed``) do not count: a bulk sender
  meets many of them in a healthy session. An over-long command line is ``500 5.5.2`` (aiosmtpd reads it
  away in chunks, never whole).
* Every ``421`` we send is followed by closing the connection (RFC 5321 §3.8), after a short lingering
  read so that the client still sees the reply (:meth:`StrictSMTP.hang_up`).
* Header bombs: more than :data:`MAX_HEADER_FIELDS` header fields or :data:`MAX_HEADER_BYTES` of header
  section are refused ``554 5.6.0`` after the terminator, without keeping the message (no MIME parser ever
  sees it).
* Memory across sessions: every byte of DATA held counts against the process's
  :class:`~relayd.edge.smtp.limits.DataBudget` (``[server] max_data_in_flight``); a message that would
  pass it is read to its end, discarded and answered ``452 4.3.1``, and each session's share is given back
  however its DATA ends (once the DATA hook is done with it, even if the client left before).
* NUL in DATA is refused ``554 5.6.0`` after the terminator, like a bare CR or LF: RFC 5322 text has no
  NUL, and a next hop written in C may cut the message there.
* Lockstep (the inbound listener, which offers no PIPELINING): a client that sends before it has our reply,
  or before the greeting ends, gets ``554 5.5.0`` and is disconnected (Postfix's
  ``reject_unauth_pipelining`` and postscreen's pregreet test).
* EHLO lists exactly the SASL mechanisms implemented: only coroutine methods named ``auth_*`` count
  (:class:`_MemberCache`); an unknown mechanism is ``504 5.5.4`` and counts as an error.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import inspect
import io
import logging
import re
import ssl
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, cast

import aiosmtpd.smtp
from aiosmtpd.smtp import SMTP, Envelope, Session

from relayd.config import parse_hostport
from relayd.core import metrics
from relayd.edge.smtp.limits import ConnectionLimits

log = logging.getLogger(__name__)

MAX_LINE = 1000  # 998 octets + CRLF, RFC 5322 §2.1.1
#: Header fields / bytes of header section accepted in one message. Real mail has a few dozen fields and a
#: few KB; a long Received chain stays far below. More is an attack on whatever parses headers later.
MAX_HEADER_FIELDS = 1000
MAX_HEADER_BYTES = 256 * 1024
#: listen() backlog: aiosmtpd's default of 100 overflows in a connection flood, and a dropped SYN costs a
#: real client a 1 s retransmit (the kernel caps this at net.core.somaxconn).
BACKLOG = 1024
#: TLS 1.2 suites offered (1.3 suites are all AEAD and forward-secret; OpenSSL picks among them itself).
TLS12_CIPHERS = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:" + (
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)


def listener_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The server context of every listener (submission, implicit TLS, inbound): TLS 1.2 and later only,
    forward-secret AEAD suites, no compression (CRIME) and no client-initiated renegotiation (a DoS).
    Raises OSError (ssl.SSLError is one) when the pair does not load, so a reload can refuse it."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.load_cert_chain(cert, key)
    return ctx


async def listen(
    specs: Sequence[str],
    factory_for: Callable[[str], Callable[[], asyncio.BaseProtocol]],
    *,
    reuse_port: bool,
) -> list[asyncio.Server]:
    """Bind every ``host:port`` of ``specs`` with the protocol factory ``factory_for(host)`` gives, the
    listen backlog :data:`BACKLOG`; return the servers (closing them stops accepting). Raises OSError when
    an address cannot be bound."""
    loop = asyncio.get_running_loop()
    servers = []
    for spec in specs:
        host, port = parse_hostport(spec)
        servers.append(
            await loop.create_server(
                factory_for(host),
                host=host,
                port=port,
                reuse_address=True,
                reuse_port=reuse_port,
                backlog=BACKLOG,
            )
        )
    return servers


#: After a 421 we read and discard the client's input this long (seconds) before closing; see hang_up().
LINGER = 2.0

LINE_TOO_LONG = "500 5.5.2 Error: line too long"
HEADER_TOO_LARGE = (
    f"554 5.6.0 Message header too large (over {MAX_HEADER_FIELDS} fields or {MAX_HEADER_BYTES // 1024} KiB)"
)
TOO_MANY_ERRORS = "421 4.7.0 Too many errors, closing connection"
NUL_IN_DATA = "554 5.6.0 Error: NUL character in message data (RFC 5322 3.5)"
BARE_NEWLINE = "554 5.5.2 Error: bare <CR> or <LF> received in message data"
OVER_DATA_BUDGET = "452 4.3.1 Insufficient system resources: too much mail in progress, try again later"
TALKED_AHEAD = "554 5.5.0 Error: command sent before the previous reply (no PIPELINING here)"
_ERROR_CODES = frozenset({"500", "501", "502", "503", "504", "530"})

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
        """The ``auth_*`` members that are SASL mechanisms. aiosmtpd keeps every ``auth_*`` member of the
        protocol and of the handler as a mechanism, and lists it in EHLO: a plain attribute such as
        ``auth_guard`` became mechanism ``guard``, and ``AUTH guard`` crashed the session. Only coroutine
        methods (what aiosmtpd awaits) count here."""
        members = ((n, getattr(obj, n, None)) for n in cls._cached(obj, "auth_"))
        return [(n, m) for n, m in members if inspect.iscoroutinefunction(m)]

    @classmethod
    def dir(cls, obj: object) -> list[str]:
        # aiosmtpd only keeps the handle_* / smtp_* names of what this returns
        return [*cls._cached(obj, "handle_"), *cls._cached(obj, "smtp_")]


class _RedactAuth(logging.Filter):
    """Blanks AUTH arguments in aiosmtpd's own log lines (``mail.log``, at DEBUG and INFO).

    aiosmtpd logs every command line it reads, and ``AUTH PLAIN <base64>`` carries the password: with
    ``--log-level debug`` it would land in the journal. The line keeps its mechanism only."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and any(
            isinstance(a, bytes | str) and a[:5].upper() in (b"AUTH ", "AUTH ") for a in args
        ):
            record.args = tuple(_redact_auth(a) for a in args)
        return True


def _redact_auth(arg: object) -> object:
    if isinstance(arg, bytes) and arg[:5].upper() == b"AUTH ":
        return b" ".join(arg.split()[:2]) + b" <redacted>"
    if isinstance(arg, str) and arg[:5].upper() == "AUTH ":
        return " ".join(arg.split()[:2]) + " <redacted>"
    return arg


def _buffered(reader: asyncio.StreamReader) -> int:
    """Bytes received from the client and not read yet. StreamReader has no public way to ask this;
    aiosmtpd reaches for the same ``_buffer`` (it clears it after STARTTLS)."""
    return len(getattr(reader, "_buffer", b""))


logging.getLogger("mail.log").addFilter(_RedactAuth())
aiosmtpd.smtp.inspect = _MemberCache  # type: ignore[assignment,attr-defined]
aiosmtpd.smtp.dir = _MemberCache.dir  # type: ignore[attr-defined]


class RelaySession(Session):
    """aiosmtpd's session plus who the client is to us."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.account: str | None = None

    # aiosmtpd (1.4) sets its own deprecated ``login_data`` after every successful AUTH, and the property
    # logs "Session.login_data is deprecated" at WARNING each time: noise in every log, and nothing here
    # reads it (``account`` and ``auth_data`` say who logged in). A plain attribute, without the warning.
    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class RelayEnvelope(Envelope):
    """aiosmtpd's envelope plus the recipients policy accepted only to drop (spam traps)."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped: set[str] = set()


class _NoteCancel:
    """Stands in for the session's task while the DATA hook finishes: a cancellation is noted, not done."""

    def __init__(self, server: StrictSMTP) -> None:
        self._server = server

    def cancel(self, msg: object = None) -> bool:
        self._server._gone = True
        return True


class StrictSMTP(SMTP):
    line_length_limit = MAX_LINE + 1
    #: Longest line of DATA taken, in octets before its line end, whether that end was CRLF or a bare LF
    #: taken as one (RFC 5322 §2.1.1). ``line_length_limit`` bounds what the reader buffers; this is the rule.
    max_line_octets: ClassVar[int] = MAX_LINE - 2

    def __init__(
        self,
        handler: Any,
        *,
        limits: ConnectionLimits,
        data_timeout: float,
        on_close: Any = None,
        max_errors: int = 20,
        lockstep: bool = False,
        greet_wait: float = 0.0,
        normalize_bare_lf: bool = False,
        **kwargs: Any,
    ) -> None:
        """``lockstep``: a client that sends before it has our reply (pipelining, which this server never
        offers, or talking before the greeting) gets ``554 5.5.0`` and is disconnected (Postfix's
        ``reject_unauth_pipelining``). ``greet_wait``: with lockstep, the greeting is sent as ``220-``
        first and completed with ``220`` this many seconds later, so that a client talking before the
        greeting ends is seen (postscreen's pregreet test). ``normalize_bare_lf``: a DATA line ending in a
        bare LF is taken as if it ended in CRLF (``bare_newline = "normalize"``) instead of refusing the
        message."""
        super().__init__(handler, **kwargs)
        self._normalize_bare_lf = normalize_bare_lf
        self._limits = limits
        self._data_timeout = data_timeout
        self._on_close = on_close
        self._max_errors = max_errors
        self._lockstep = lockstep
        self._greet_wait = greet_wait if lockstep else 0.0
        self._greeted = False
        self._data_held = 0  # bytes of the DATA in progress taken from limits.data
        self._errors = 0  # protocol errors since the last accepted message
        self._hung_up = False
        self._held: list[str] = []  # continuation lines of a multi-line reply, sent with its last line
        self._hung_up_transport: asyncio.BaseTransport | None = None
        self._finishing = False  # the DATA hook is finishing a message (see connection_lost)
        self._gone = False  # the client went while it did

    @property
    def client_gone(self) -> bool:
        """Whether the client went (closed, reset, half-closed, timed out) while the DATA hook was
        finishing its message: the reply can't reach it, and it will send the message again."""
        return self._gone

    def connection_lost(self, error: Exception | None) -> None:
        """aiosmtpd cancels the session's task when its client goes. Cut short in the DATA hook, a message
        would be half done: caps and ledger written without it, or committed to the queue (the commit goes
        on without its caller) with no ``accepted`` line and no hand-off. So while the hook runs, the
        cancellation waits for it to end, as in Postfix, whose smtpd does not look at the socket again
        before its reply (:meth:`_finish`). A task and a shield around the hook did that with two more
        turns of the event loop per message, each a few ms under load (the bench's 250 latency)."""
        with self._cancel_deferred():
            super().connection_lost(error)

    def eof_received(self) -> bool | None:
        with self._cancel_deferred():
            return super().eof_received()

    @contextlib.contextmanager
    def _cancel_deferred(self) -> Iterator[None]:
        task = self._handler_coroutine
        if not self._finishing or task is None:
            yield
            return
        self._handler_coroutine = cast(asyncio.Task[None], _NoteCancel(self))
        try:
            yield
        finally:
            self._handler_coroutine = task

    async def _finish(self) -> str | None:
        """The DATA hook's reply, or None when the client went meanwhile (it gets no reply: its session
        ends as aiosmtpd meant to end it). An exception of the hook is aiosmtpd's to answer (451), unless
        there is nobody left to answer."""
        self._finishing = True
        try:
            status = await self._call_handler_hook("DATA")
        except Exception:
            if not self._gone:
                raise
            log.exception("DATA from %s failed after the client hung up", self.peer_ip)
        finally:
            self._finishing = False
        if self._gone:
            raise asyncio.CancelledError
        return cast(str | None, status)

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
            await self.push(refusal)  # a 421: hangs up
            await self._linger()
            return
        try:
            await super()._handle_client()
            await self._linger()
        finally:
            self._limits.release(ip)
            if self._on_close is not None:
                self._on_close(self)

    def hang_up(self) -> None:
        """End the session after what was already written; later replies are dropped.

        Setting ``transport`` to None ends aiosmtpd's command loop after the current command, and
        :meth:`_linger` closes the connection. Closing right away would lose our last reply to a client that
        pipelined more than we read: a socket closed with unread input sends RST, and on RST the peer's
        kernel throws away what it had received but not yet handed to the client."""
        if self._hung_up:
            return
        self._hung_up = True
        self._hung_up_transport = self.transport
        self.transport = None

    async def _linger(self) -> None:
        """After a hang-up: send FIN, read and discard input for up to :data:`LINGER` seconds (or until
        the client closes), then close (Apache's "lingering close", for the same reason)."""
        # uvloop's transports are not asyncio.WriteTransport subclasses, so a cast, not isinstance()
        transport = cast(asyncio.WriteTransport | None, self._hung_up_transport if self._hung_up else None)
        if transport is None or transport.is_closing():
            return
        try:
            if transport.can_write_eof():  # plain TCP; a TLS transport cannot half-close
                transport.write_eof()
                with contextlib.suppress(TimeoutError, ConnectionError):
                    async with asyncio.timeout(LINGER):
                        while await self._reader.read(65536):
                            pass
        finally:
            transport.close()

    async def push(self, status: str | bytes) -> None:
        """aiosmtpd's push, plus: an enhanced code for an over-long line, the error limit, and a hang-up
        after every 421."""
        if self._hung_up:
            await asyncio.sleep(0)  # let connection_lost() cancel the command loop
            return
        if status == "500 Command line too long":  # aiosmtpd's text, for a line over the reader limit
            status = LINE_TOO_LONG
        if isinstance(status, bytes):  # aiosmtpd's AUTH challenges ("334 ...")
            await super().push(status)
            return
        if self._lockstep and status[3:4] != "-":
            if not self._greeted and status[:4] == "220 ":
                self._greeted = True
                if self._greet_wait > 0:
                    await super().push("220-" + status[4:])
                    await asyncio.sleep(self._greet_wait)
            if _buffered(self._reader):
                # Every byte in the buffer now was sent before this reply (to the previous command, or
                # the greeting) was: the client does not wait for replies. A real MTA without
                # PIPELINING always does; spambots and protocol fuzzers do not.
                log.info("%s: client talked ahead of our reply: %s", self.peer_ip, TALKED_AHEAD)
                self._held.clear()
                await super().push(TALKED_AHEAD)
                self.hang_up()
                return
        if status[3:4] == "-" and status[:3].isdigit():
            # a continuation line ("250-PIPELINING"): aiosmtpd pushes each line of the EHLO reply on its
            # own, one send(2) each; held here, the whole reply is one write. Writing replies was 14% of
            # an accepting process's CPU under load (py-spy), EHLO's lines more than half of the writes.
            if status.rstrip() != "250-AUTH":  # aiosmtpd lists AUTH even when every mechanism is excluded
                self._held.append(status)
            return
        code = status[:9]
        if self._held:
            status = "\r\n".join([*self._held, status])
            self._held.clear()
        await super().push(status)
        if code[:3] == "421":
            self.hang_up()
        elif code[:3] in _ERROR_CODES or code == "452 4.5.3":
            self._errors += 1
            if self._errors >= self._max_errors:
                log.warning("%s: %d protocol errors, disconnecting", self.peer_ip, self._errors)
                await super().push(TOO_MANY_ERRORS)
                self.hang_up()

    def _timeout_cb(self) -> None:
        if self._hung_up:  # the command timeout ran out while lingering
            if self._hung_up_transport is not None:
                self._hung_up_transport.close()
            return
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
        try:
            await self._receive_data()
        finally:
            self._release_data()  # however DATA ended: reply sent, refused, client gone, our exception

    def _release_data(self) -> None:
        """Give this session's share of the process's DATA budget back."""
        if self._limits.data is not None:
            self._limits.data.give(self._data_held)
        self._data_held = 0

    async def _receive_data(self) -> None:
        """Read the message after ``354``, check it line by line, and hand it to the DATA hook.

        Any problem is answered only after the terminator, once, and what was read so far is dropped at
        once (memory and budget): bare CR, or bare LF unless normalised (smuggling), NUL (RFC 5322 §3.5 has
        no NUL in ``text``; with no BINARYMIME offered, a NUL is never legitimate, and some next hops end a
        string there), lines over :attr:`max_line_octets`, over the size limit, a header bomb, or over the
        process's :class:`DataBudget`.

        Lines are read up to each LF, so a message of LF-only lines is as many short reads as it has lines,
        and the reader never holds more than ``line_length_limit`` bytes of one line. The end of data is a
        ``.<CR><LF>`` line right after a line that ended in CRLF (or right after DATA's own CRLF): a ``.``
        line after a bare LF, or ending in one, is content in normalize mode (RFC 5321 §4.5.2 removes the
        leading dot only when "there are other characters on the line", so it stays ``.``; the delivery
        client dot-stuffs it again, or sends it with BDAT unstuffed)."""
        assert self.envelope is not None
        budget = self._limits.data
        lines = io.BytesIO()  # grown in place; getvalue() hands its buffer over (a list of lines cost 2.5x)
        size = 0
        limit = self.data_size_limit
        problem: str | None = None
        continuation = False  # the previous read ended inside an over-long line
        after_crlf = True  # the previous line ended in CRLF: DATA's own, at first
        too_long = f"554 5.6.0 Message has a line over {self.max_line_octets} characters (RFC 5322 2.1.1)"
        in_header = True
        header_fields = header_bytes = 0
        while self.transport is not None:
            try:
                chunk = await self._reader.readuntil(b"\n")
            except asyncio.LimitOverrunError as exc:
                # Leave the last byte unread: if it is the CR of a CRLF, the next read sees that CRLF, and a
                # "." line after it is still the end of data.
                await self._reader.read(exc.consumed - 1)
                size += exc.consumed - 1
                continuation = True
                problem = problem or too_long
                lines = io.BytesIO()
                self._release_data()
                continue
            except asyncio.IncompleteReadError:
                return  # client went away mid-DATA: nothing was accepted
            crlf = chunk[-2:] == b"\r\n"
            if chunk == b".\r\n" and after_crlf and not continuation:
                break
            after_crlf = crlf
            text = chunk[:-2] if crlf else chunk[:-1]  # the line without its end
            size += len(text) + 2  # as stored: a normalised line ends in CRLF too
            if continuation or problem is not None:
                continuation = False  # the rest of an over-long line, or anything after a refusal
                continue
            if b"\r" in text or not (crlf or self._normalize_bare_lf):
                # a CR that is not part of CRLF, or a bare LF we do not normalise: refuse, never guess
                problem = BARE_NEWLINE
            elif b"\x00" in text:
                problem = NUL_IN_DATA
            elif len(text) > self.max_line_octets:
                problem = too_long
            elif limit and size > limit:
                problem = f"552 5.3.4 Message size exceeds fixed limit of {limit} bytes"
            elif budget is not None and not budget.take(len(text) + 2):
                problem = OVER_DATA_BUDGET
                metrics.DATA_BUDGET_REFUSALS.inc()
            else:
                line = chunk if crlf else text + b"\r\n"
                if budget is not None:
                    self._data_held += len(line)
                if in_header:
                    if line == b"\r\n":
                        in_header = False  # RFC 5322 §2.1: the empty line ends the header section
                    else:
                        header_bytes += len(line)
                        header_fields += line[:1] not in (b" ", b"\t")
                        if header_fields > MAX_HEADER_FIELDS or header_bytes > MAX_HEADER_BYTES:
                            problem = HEADER_TOO_LARGE
                if problem is None:
                    # RFC 5321 §4.5.2 dot-unstuffing; a lone "." here is content (see above) and stays
                    lines.write(line[1:] if line[:1] == b"." and len(text) > 1 else line)
            if problem is not None:
                lines = io.BytesIO()
                self._release_data()
        else:
            return
        self._reset_timeout()
        if problem is not None:
            log.info("%s: DATA refused: %s", self.peer_ip, problem)
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push(problem)
            return
        self.envelope.content = self.envelope.original_content = lines.getvalue()
        del lines  # the envelope alone holds the message: the DATA hook may let it go (accept.py)
        status = await self._finish()
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        if isinstance(status, str) and status.startswith("250"):
            self._errors = 0  # the error limit counts from the last accepted message
        await self.push(status if isinstance(status, str) else "451 4.3.0 Internal error, try again later")
