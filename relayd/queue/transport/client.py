"""The SMTP client side of delivery: one transaction over a (possibly reused) connection.

This is the transport seam of the queue: :meth:`Transport.send` either returns the final reply or raises
:class:`TemporaryFailure` / :class:`PermanentFailure`; SMTP client and socket errors never leave this module.

* Opportunistic STARTTLS (``tls = "may"``, Postfix's ``smtp_tls_security_level = may``): used when offered,
  certificates not verified (there is no trust anchor for MX hosts without DANE/MTA-STS); a failed handshake
  is retried once in plaintext, as Postfix does, because an unencrypted delivery beats a bounce. The host
  then gets plaintext for :data:`TLS_FALLBACK_TTL` only (counted in ``relayd_tls_fallback_total``): for
  good, one man-in-the-middle that broke one handshake would have turned TLS off until the next restart.
* Required TLS (``encrypt``, ``verify``, relayd.queue.transport.tlspolicy; DANE for an MX host with validated
TLSA
  records, relayd.queue.transport.dane): no STARTTLS offered, a failed handshake or a certificate that does
  not
  verify ends the connection before MAIL FROM, with a ``4.7.5`` temporary failure; there is no plaintext
  fallback. Connections are pooled per level and verified name (and TLSA set), so a plaintext connection
  opened for a ``may`` destination never carries mail that requires more.
* Connections are kept per (host, source address, EHLO name) for ``messages_per_connection`` transactions
  (RSET between them) and closed when idle: a bulk sender sends many messages to the same few MX hosts, and a
  connection opened from one pool's address must never carry another account's mail.
* A :class:`Channel` names the source address to bind (dedicated IPs, ``[pools.NAME]``), the EHLO name, and
  the shaping caps of its *lane* (destination x source address): the number of connections a lane holds open
  -- in use or idle -- never exceeds ``max_connections``, because a receiver counts open sockets, not
  transactions. A connection that has carried its last message is closed (QUIT answered) before its slot is
  given back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from relayd.core import metrics
from relayd.core.errors import PermanentFailure, SmtpError, SmtpReplyError, SmtpTimeout, TemporaryFailure
from relayd.mail import chunks
from relayd.mail.chunks import Chunks
from relayd.queue.transport import dane
from relayd.queue.transport.smtpclient import LeanSMTP
from relayd.queue.transport.tlspolicy import TlsLevel, handshake_result, unmet

log = logging.getLogger(__name__)

_IDLE_SECONDS = 10.0
#: Seconds a host whose STARTTLS handshake failed is sent to in plaintext before TLS is tried again.
TLS_FALLBACK_TTL = 3600.0


@dataclass(frozen=True, slots=True)
class Channel:
    """How one attempt connects: bound source ``address`` (None: the kernel picks), ``helo`` (None: the
    transport's default), and the caps of its ``lane`` (None: the transport's defaults, no cap)."""

    lane: str = ""
    address: str | None = None
    helo: str | None = None
    messages_per_connection: int | None = None
    max_connections: int | None = None


_DEFAULT = Channel()

_Key = tuple[str, int, str | None, str, TlsLevel, str]  # host, port, source, EHLO, TLS level, verified name
#: told of each new TLS session: (MX host name, address, None for success or the RFC 8460 result type)
SessionReport = Callable[[str, str, str | None], None]


@dataclass(slots=True)
class _Conn:
    client: LeanSMTP
    host: str
    port: int
    key: _Key
    lane: str
    limit: int
    used: int = 0
    idle_since: float = field(default_factory=time.monotonic)


def _fallback_reason(exc: BaseException) -> str:
    """A closed set of label values for ``relayd_tls_fallback_total`` (no host names: unbounded)."""
    causes = (exc, exc.__cause__)
    if any(isinstance(e, ssl.SSLError) for e in causes):
        return "tls_error"
    if isinstance(exc, SmtpReplyError):
        return "refused"  # the server answered STARTTLS with an error code
    if any(isinstance(e, TimeoutError | SmtpTimeout) for e in causes):
        return "timeout"
    if any(isinstance(e, ConnectionError) for e in causes):
        return "closed"  # the connection was cut in the handshake (what a stripping middlebox does)
    return "other"


def _pool_name(name: str, tlsa: tuple[dane.Tlsa, ...]) -> str:
    """The name part of a pool key: a DANE connection was checked against one TLSA set, and is reused only
    for the same set."""
    if not tlsa:
        return name
    return name + "#" + "|".join(f"{r.usage} {r.selector} {r.mtype} {r.data.hex()}" for r in tlsa)


def _naming(report: SessionReport, mx: str) -> SessionReport:
    """``report`` with the MX host name filled in: a connection at a level that verifies no name knows
    only its address."""

    def named(_name: str, address: str, result: str | None) -> None:
        report(mx, address, result)

    return named


@dataclass(slots=True, eq=False)
class Next:
    """The transaction to pipeline behind the one being sent (``Transport.send(then=...)``): its sender,
    recipient and copy. Once a connection is primed with its commands, the connection waits here, in no
    pool, for the ``send`` that passes this object as ``primed``; a caller that will not make that send
    hands it to :meth:`Transport.abandon`."""

    mail_from: str
    rcpt: str
    data: Chunks
    conn: _Conn | None = None
    #: its MAIL parameters, as written behind the last message (SIZE and 8BITMIME read the whole copy)
    options: list[str] | None = None


class _StaleConnection(Exception):
    """A pooled connection turned out to be closed before anything was sent on it."""


def _fail(code: int, text: str, what: str, command: str | None = None) -> TemporaryFailure | PermanentFailure:
    first = text.split(" ", 1)[0]
    status = first if first[:1].isdigit() and first.count(".") == 2 else None
    rest = text[len(first) :].strip() if status else text
    msg = f"{what}: {code} {text}"
    if 500 <= code < 600:
        return PermanentFailure(msg, code, status, command=command, text=rest)
    return TemporaryFailure(msg, code, status, command=command, text=rest)


class Transport:
    """Sends one message to one recipient through a pooled connection to one of ``hosts``."""

    def __init__(
        self,
        *,
        helo: str,
        tls: str,
        connect_timeout: float,
        command_timeout: float,
        messages_per_connection: int,
        tls_fallback_ttl: float = TLS_FALLBACK_TTL,
        clock: Callable[[], float] = time.monotonic,
        tls_ca_file: Path | None = None,
    ) -> None:
        self._helo = helo
        self._tls = TlsLevel(tls)
        self._ca_file = tls_ca_file
        self._verify_ctx: ssl.SSLContext | None = None
        self._encrypt_ctx: ssl.SSLContext | None = None
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._per_conn = messages_per_connection
        self._idle: dict[_Key, list[_Conn]] = {}
        self._open: dict[str, int] = {}  # lane -> connections open (in use or idle)
        #: (host, port) -> when TLS is tried again, after a failed handshake
        self._no_tls: dict[tuple[str, int], float] = {}
        self._tls_fallback_ttl = tls_fallback_ttl
        self._clock = clock
        self._reaper: asyncio.Task[None] | None = None

    def open_connections(self, lane: str) -> int:
        """Connections the lane holds open now (in use or idle); for tests and gauges."""
        return self._open.get(lane, 0)

    def _context(self, level: TlsLevel) -> ssl.SSLContext | None:
        """The client context of a required level (None: ``may``'s, made by the client). Built once: a
        verifying context loads the CA store, which takes milliseconds."""
        if level is TlsLevel.VERIFY:
            if self._verify_ctx is None:
                ctx = ssl.create_default_context(cafile=str(self._ca_file) if self._ca_file else None)
                ctx.minimum_version = ssl.TLSVersion.TLSv1_2
                self._verify_ctx = ctx
            return self._verify_ctx
        if level in (TlsLevel.ENCRYPT, TlsLevel.DANE):  # DANE checks the chain itself, after the handshake
            if self._encrypt_ctx is None:
                ctx = ssl.create_default_context()
                ctx.minimum_version = ssl.TLSVersion.TLSv1_2
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                self._encrypt_ctx = ctx
            return self._encrypt_ctx
        return None

    async def _connect(
        self,
        host: str,
        port: int,
        ch: Channel,
        level: TlsLevel | None = None,
        name: str = "",
        tlsa: tuple[dane.Tlsa, ...] = (),
        report: SessionReport | None = None,
    ) -> _Conn:
        """Connect, EHLO and STARTTLS as ``level`` (default: the transport's) asks; ``name`` is what a
        verified certificate must name (default: ``host``), ``tlsa`` what a ``dane`` one must match. A
        required level that is not met raises :class:`~relayd.queue.transport.tlspolicy.TlsUnmet` with the
        connection closed and nothing sent."""
        level = self._tls if level is None else level
        helo = ch.helo or self._helo
        use_tls = level is not TlsLevel.NONE and not (
            level is TlsLevel.MAY and self._tls_suspended(host, port)
        )
        client = LeanSMTP(
            hostname=host,
            port=port,
            local_hostname=helo,
            source_address=(ch.address, 0) if ch.address else None,
            timeout=self._command_timeout,
        )
        source = f" from {ch.address}" if ch.address else ""
        try:
            await client.connect(timeout=self._connect_timeout)
            await client.ehlo()
        except asyncio.CancelledError:
            client.close()  # an attempt abandoned at shutdown: closed now, not by the garbage collector
            raise
        except SmtpReplyError as exc:
            client.close()
            raise _fail(exc.code, exc.message, f"greeting from {host}:{port}{source}") from exc
        except (SmtpError, OSError, TimeoutError) as exc:
            client.close()
            raise TemporaryFailure(f"connect to {host}:{port}{source}: {exc}") from exc
        if level.required and not client.supports_extension("starttls"):
            client.close()
            metrics.DELIVERY_TLS.labels(level.value, "not_offered").inc()
            if report is not None:
                report(name or host, host, "starttls-not-supported")
            raise unmet(level, host, port, "STARTTLS not offered", "starttls-not-supported")
        if use_tls and client.supports_extension("starttls"):
            try:
                context = self._context(level)
                await client.starttls(context=context, server_hostname=name or host)
            except asyncio.CancelledError:
                client.close()
                raise
            except (SmtpError, OSError, TimeoutError) as exc:
                client.close()
                if level.required:
                    metrics.DELIVERY_TLS.labels(level.value, "failed").inc()
                    log.warning("STARTTLS with %s:%d (%s) failed: %s", host, port, level.value, exc)
                    result = handshake_result(exc)
                    if report is not None:
                        report(name or host, host, result)
                    raise unmet(level, host, port, f"STARTTLS failed: {exc}", result) from exc
                log.warning(
                    "STARTTLS with %s:%d failed (%s); plaintext for this host for %.0fs",
                    host,
                    port,
                    exc,
                    self._tls_fallback_ttl,
                )
                self._suspend_tls(host, port, exc)
                return await self._connect(host, port, ch, level, name)
        if level is TlsLevel.DANE:
            ssl_object = client.ssl_object()
            why = dane.check(tlsa, dane.peer_chain(ssl_object), name) if ssl_object else "no TLS session"
            if why is not None:
                client.close()
                metrics.DELIVERY_TLS.labels(level.value, "failed").inc()
                log.warning("DANE with %s:%d (%s) failed: %s", host, port, name, why)
                if report is not None:
                    report(name, host, "validation-failure")
                raise unmet(level, host, port, why)
        metrics.DELIVERY_TLS.labels(level.value, "tls" if client.encrypted else "plaintext").inc()
        if report is not None and client.encrypted:
            report(name or host, host, None)
        self._open[ch.lane] = self._open.get(ch.lane, 0) + 1
        limit = ch.messages_per_connection or self._per_conn
        key = (host, port, ch.address, helo, level, _pool_name(name, tlsa))
        return _Conn(client, host, port, key, ch.lane, limit)

    def _tls_suspended(self, host: str, port: int) -> bool:
        until = self._no_tls.get((host, port))
        if until is None:
            return False
        if self._clock() < until:
            return True
        del self._no_tls[(host, port)]  # expired: this connection tries TLS again
        return False

    def _suspend_tls(self, host: str, port: int, exc: BaseException) -> None:
        now = self._clock()
        for key in [k for k, until in self._no_tls.items() if until <= now]:
            del self._no_tls[key]  # the map holds only hosts still in their fallback period
        self._no_tls[(host, port)] = now + self._tls_fallback_ttl
        metrics.TLS_FALLBACKS.labels(_fallback_reason(exc)).inc()

    async def _checkout(
        self,
        host: str,
        port: int,
        ch: Channel,
        level: TlsLevel,
        name: str,
        tlsa: tuple[dane.Tlsa, ...],
        report: SessionReport | None,
    ) -> _Conn:
        pool = self._idle.get((host, port, ch.address, ch.helo or self._helo, level, _pool_name(name, tlsa)))
        while pool:
            conn = pool.pop()
            if conn.client.is_connected and time.monotonic() - conn.idle_since < _IDLE_SECONDS:
                return conn
            self._drop(conn)
        await self._make_room(ch)
        return await self._connect(host, port, ch, level, name, tlsa, report)

    async def _make_room(self, ch: Channel) -> None:
        """Close idle connections of the lane (to its other hosts) until a new one fits under its cap."""
        if ch.max_connections is None:
            return
        for conns in list(self._idle.values()):
            while conns and self._open.get(ch.lane, 0) >= ch.max_connections:
                idle = [c for c in conns if c.lane == ch.lane]
                if not idle:
                    break
                conns.remove(idle[0])
                await self._retire(idle[0])

    def _drop(self, conn: _Conn) -> None:
        """Close at once (the connection is broken, or the server said 421)."""
        conn.client.close()
        self._forget(conn)

    async def _retire(self, conn: _Conn) -> None:
        """QUIT and close; the lane's count drops only once the server has seen the end."""
        try:
            with contextlib.suppress(SmtpError, OSError, TimeoutError):
                if conn.client.is_connected:
                    await conn.client.quit(timeout=5)
        finally:
            self._drop(conn)  # also when cancelled while waiting for the QUIT reply

    def _forget(self, conn: _Conn) -> None:
        if conn.lane in self._open and conn.used >= 0:
            self._open[conn.lane] -= 1
            if not self._open[conn.lane]:
                del self._open[conn.lane]
        conn.used = -1  # counted out once, however many close paths it takes

    async def _checkin(self, conn: _Conn) -> None:
        conn.used += 1
        if conn.used >= conn.limit or not conn.client.is_connected:
            await self._retire(conn)
            return
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.key, []).append(conn)
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap())

    async def _reap(self) -> None:
        while any(self._idle.values()):
            await asyncio.sleep(_IDLE_SECONDS / 2)
            now = time.monotonic()
            for key, conns in list(self._idle.items()):
                keep = [c for c in conns if now - c.idle_since < _IDLE_SECONDS and c.client.is_connected]
                self._idle[key] = keep
                for c in conns:
                    if c not in keep:
                        await self._retire(c)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for c in conns:
                await self._retire(c)

    async def send(
        self,
        hosts: tuple[tuple[str, int], ...],
        mail_from: str,
        rcpt: str,
        data: Chunks,
        channel: Channel = _DEFAULT,
        *,
        tls: TlsLevel | None = None,
        names: tuple[str, ...] = (),
        tlsa: Mapping[str, tuple[dane.Tlsa, ...]] | None = None,
        levels: Mapping[str, TlsLevel] | None = None,
        report: SessionReport | None = None,
        then: Next | None = None,
        primed: Next | None = None,
    ) -> str:
        """Deliver; return the final ``250`` reply text.

        The next host is tried only when a host can't be reached, refuses the session or can't meet the
        TLS level ``tls`` (default: the transport's); a reply to the transaction itself is final for this
        attempt (RFC 5321 §5.1). ``names[i]`` is the name a verified certificate of ``hosts[i]`` must
        carry (default: the host as given); a host whose name has records in ``tlsa`` gets DANE instead of
        ``tls``, one named in ``levels`` that level (a validated but unusable TLSA RRset: ``encrypt``).
        ``report`` is told of each new TLS session and each failed one (TLS reporting). The caller holds
        one of the lane's ``max_connections`` slots for the whole call, so the lane never opens more than
        that.

        ``then``: the next transaction the caller means to send to this destination. Its commands go
        behind this message's content when the connection can pipeline them and may carry one more
        message; the connection is then kept in ``then`` (also when this transaction's reply was an
        error) for the ``send`` that passes it as ``primed``, which sends only its content. A primed
        connection the server closed before answering is taken for an idle one that went stale.
        """
        if primed is not None and primed.conn is not None:
            if (primed.mail_from, primed.rcpt, primed.data) != (mail_from, rcpt, data):
                self.abandon(primed)  # primed for another transaction: a 354 is waiting for other content
            else:
                conn, primed.conn = primed.conn, None
                try:
                    return await self._transaction(conn, mail_from, rcpt, data, then, primed.options)
                except _StaleConnection:
                    pass  # closed before this transaction's first reply: start over, as for an idle one
        last: TemporaryFailure | PermanentFailure | None = None
        for i, (host, port) in enumerate(hosts):
            hostname = names[i] if i < len(names) else host
            records = (tlsa or {}).get(hostname, ())
            level = TlsLevel.DANE if records else self._tls if tls is None else tls
            level = (levels or {}).get(hostname, level)
            # only verification reads the name: other levels pool connections under the address alone
            name = hostname if level in (TlsLevel.VERIFY, TlsLevel.DANE) else ""
            # a TLS report names the MX host whatever the level (RFC 8460 §4.3 receiving-mx-hostname)
            host_report = None if report is None else _naming(report, hostname)
            try:
                conn = await self._checkout(host, port, channel, level, name, records, host_report)
            except (TemporaryFailure, PermanentFailure) as exc:
                last = exc
                continue
            try:
                return await self._transaction(conn, mail_from, rcpt, data, then)
            except _StaleConnection:
                # the server closed a pooled connection while it sat idle: not a failure of this delivery
                pass
            try:
                await self._make_room(channel)
                conn = await self._connect(host, port, channel, level, name, records, host_report)
            except (TemporaryFailure, PermanentFailure) as exc:
                last = exc
                continue
            return await self._transaction(conn, mail_from, rcpt, data, then)
        raise last or TemporaryFailure("no host to deliver to")

    def abandon(self, primed: Next) -> None:
        """Close the connection ``primed`` holds, if any: the server may have answered its DATA with
        ``354``, and only a message or a closed connection ends that."""
        conn, primed.conn = primed.conn, None
        if conn is not None:
            self._drop(conn)

    def _options(self, client: LeanSMTP, data: Chunks) -> list[str]:
        options = []
        if client.supports_extension("8bitmime") and not chunks.all_ascii(data):
            options.append("BODY=8BITMIME")
        if client.supports_extension("size"):
            options.append(f"SIZE={chunks.total(data)}")
        return options

    async def _transaction(
        self,
        conn: _Conn,
        mail_from: str,
        rcpt: str,
        data: Chunks,
        then: Next | None,
        options: list[str] | None = None,
    ) -> str:
        """``options``: the MAIL parameters already worked out for this copy on this connection."""
        client = conn.client
        follow = None
        if then is not None and conn.used + 2 <= conn.limit:  # this message and the next fit in its limit
            then.options = self._options(client, then.data)
            follow = (then.mail_from, then.rcpt, then.options)
        if options is None:
            options = self._options(client, data)
        try:
            code, text = await client.send(mail_from, rcpt, data, options, follow)
        except asyncio.CancelledError:
            # abandoned mid-transaction (shutdown): the session's state is unknown, and the connection
            # is in no pool, so nothing else would close it or give its lane's slot back
            self._drop(conn)
            raise
        except SmtpReplyError as exc:
            step = getattr(exc, "command", "DATA")
            err = _fail(exc.code, exc.message, f"{step} at {conn.host}:{conn.port}", step)
            if exc.code == 421 or not client.is_connected:
                self._drop(conn)
            elif then is not None and client.primed is not None:
                self._prime(conn, then)  # refused content; the next transaction's commands are read
            else:
                try:
                    await client.rset()
                except (SmtpError, OSError, TimeoutError):
                    self._drop(conn)
                else:
                    await self._checkin(conn)
            raise err from exc
        except (SmtpError, OSError, TimeoutError) as exc:
            # nothing answered on a connection that had been idle in the pool (or primed behind the last
            # message, whose reply came): the server closed it
            stale = not client.replied and conn.used > 0
            self._drop(conn)
            if stale:
                raise _StaleConnection(f"{conn.host}:{conn.port} closed an idle connection") from exc
            raise TemporaryFailure(f"transaction at {conn.host}:{conn.port}: {exc}") from exc
        if then is not None and client.primed is not None:
            self._prime(conn, then)
        else:
            await self._checkin(conn)
        return f"{code} {text}"

    def _prime(self, conn: _Conn, then: Next) -> None:
        """Keep ``conn``, which has carried one more message, in ``then`` (in no pool)."""
        conn.used += 1
        then.conn = conn
