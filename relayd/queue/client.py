"""The SMTP client side of delivery: one transaction over a (possibly reused) connection.

This is the transport seam of the queue: :meth:`Transport.send` either returns the final reply or raises
:class:`TemporaryFailure` / :class:`PermanentFailure`; aiosmtplib and socket errors never leave this module.

* Opportunistic STARTTLS (``tls = "may"``, Postfix's ``smtp_tls_security_level = may``): used when offered,
  certificates not verified (there is no trust anchor for MX hosts without DANE/MTA-STS); a failed handshake
  is retried once in plaintext, as Postfix does, because an unencrypted delivery beats a bounce. The host
  then gets plaintext for :data:`TLS_FALLBACK_TTL` only (counted in ``relayd_tls_fallback_total``): for
  good, one man-in-the-middle that broke one handshake would have turned TLS off until the next restart.
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
from collections.abc import Callable
from dataclasses import dataclass, field

import aiosmtplib

from relayd import metrics
from relayd.errors import PermanentFailure, TemporaryFailure
from relayd.queue.smtpclient import LeanSMTP

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

_Key = tuple[str, int, str | None, str]  # host, port, source address, EHLO name


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
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return "refused"  # the server answered STARTTLS with an error code
    if any(isinstance(e, TimeoutError | aiosmtplib.SMTPTimeoutError) for e in causes):
        return "timeout"
    if any(isinstance(e, ConnectionError) for e in causes):
        return "closed"  # the connection was cut in the handshake (what a stripping middlebox does)
    return "other"


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
    ) -> None:
        self._helo = helo
        self._tls = tls
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

    async def _connect(self, host: str, port: int, ch: Channel) -> _Conn:
        helo = ch.helo or self._helo
        use_tls = self._tls == "may" and not self._tls_suspended(host, port)
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
        except aiosmtplib.SMTPResponseException as exc:
            client.close()
            raise _fail(exc.code, exc.message, f"greeting from {host}:{port}{source}") from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            client.close()
            raise TemporaryFailure(f"connect to {host}:{port}{source}: {exc}") from exc
        if use_tls and client.supports_extension("starttls"):
            try:
                await client.starttls(validate_certs=False)
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                client.close()
                log.warning(
                    "STARTTLS with %s:%d failed (%s); plaintext for this host for %.0fs",
                    host,
                    port,
                    exc,
                    self._tls_fallback_ttl,
                )
                self._suspend_tls(host, port, exc)
                return await self._connect(host, port, ch)
        self._open[ch.lane] = self._open.get(ch.lane, 0) + 1
        limit = ch.messages_per_connection or self._per_conn
        return _Conn(client, host, port, (host, port, ch.address, helo), ch.lane, limit)

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

    async def _checkout(self, host: str, port: int, ch: Channel) -> _Conn:
        pool = self._idle.get((host, port, ch.address, ch.helo or self._helo))
        while pool:
            conn = pool.pop()
            if conn.client.is_connected and time.monotonic() - conn.idle_since < _IDLE_SECONDS:
                return conn
            self._drop(conn)
        await self._make_room(ch)
        return await self._connect(host, port, ch)

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
        with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
            if conn.client.is_connected:
                await conn.client.quit(timeout=5)
        self._drop(conn)

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
        data: bytes,
        channel: Channel = _DEFAULT,
    ) -> str:
        """Deliver; return the final ``250`` reply text.

        The next host is tried only when a host can't be reached or refuses the session (RFC 5321 §5.1);
        a reply to the transaction itself is final for this attempt. The caller holds one of the lane's
        ``max_connections`` slots for the whole call, so the lane never opens more than that.
        """
        last: TemporaryFailure | PermanentFailure | None = None
        for host, port in hosts:
            try:
                conn = await self._checkout(host, port, channel)
            except (TemporaryFailure, PermanentFailure) as exc:
                last = exc
                continue
            try:
                return await self._transaction(conn, mail_from, rcpt, data)
            except _StaleConnection:
                # the server closed a pooled connection while it sat idle: not a failure of this delivery
                pass
            try:
                await self._make_room(channel)
                conn = await self._connect(host, port, channel)
            except (TemporaryFailure, PermanentFailure) as exc:
                last = exc
                continue
            return await self._transaction(conn, mail_from, rcpt, data)
        raise last or TemporaryFailure("no host to deliver to")

    async def _transaction(self, conn: _Conn, mail_from: str, rcpt: str, data: bytes) -> str:
        client = conn.client
        options = []
        if client.supports_extension("8bitmime") and not data.isascii():
            options.append("BODY=8BITMIME")
        if client.supports_extension("size"):
            options.append(f"SIZE={len(data)}")
        try:
            code, text = await client.send(mail_from, rcpt, data, options)
        except aiosmtplib.SMTPResponseException as exc:
            step = getattr(exc, "command", "DATA")
            err = _fail(exc.code, exc.message, f"{step} at {conn.host}:{conn.port}", step)
            if exc.code == 421 or not client.is_connected:
                self._drop(conn)
            else:
                try:
                    await client.rset()
                except (aiosmtplib.SMTPException, OSError, TimeoutError):
                    self._drop(conn)
                else:
                    await self._checkin(conn)
            raise err from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            # nothing answered on a connection that had been idle in the pool: the server closed it
            stale = not client.replied and conn.used > 0
            self._drop(conn)
            if stale:
                raise _StaleConnection(f"{conn.host}:{conn.port} closed an idle connection") from exc
            raise TemporaryFailure(f"transaction at {conn.host}:{conn.port}: {exc}") from exc
        await self._checkin(conn)
        return f"{code} {text}"
