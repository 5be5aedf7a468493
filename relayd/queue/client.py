"""The SMTP client side of delivery: one transaction over a (possibly reused) connection.

This is the transport seam of the queue: :meth:`Transport.send` either returns the final reply or raises
:class:`TemporaryFailure` / :class:`PermanentFailure`; aiosmtplib and socket errors never leave this module.

* Opportunistic STARTTLS (``tls = "may"``, Postfix's ``smtp_tls_security_level = may``): used when offered,
  certificates not verified (there is no trust anchor for MX hosts without DANE/MTA-STS); a failed handshake
  is retried once in plaintext, as Postfix does, because an unencrypted delivery beats a bounce.
* Connections are kept per host for ``messages_per_connection`` transactions (RSET between them) and closed
  when idle: a bulk sender sends many messages to the same few MX hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import aiosmtplib

from relayd.errors import PermanentFailure, TemporaryFailure

log = logging.getLogger(__name__)

_IDLE_SECONDS = 10.0


@dataclass(slots=True)
class _Conn:
    client: aiosmtplib.SMTP
    host: str
    port: int
    used: int = 0
    idle_since: float = field(default_factory=time.monotonic)


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
    ) -> None:
        self._helo = helo
        self._tls = tls
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._per_conn = messages_per_connection
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._no_tls: set[tuple[str, int]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Future[None]] = set()

    async def _connect(self, host: str, port: int) -> _Conn:
        use_tls = self._tls == "may" and (host, port) not in self._no_tls
        client = aiosmtplib.SMTP(
            hostname=host,
            port=port,
            local_hostname=self._helo,
            timeout=self._command_timeout,
            start_tls=False,
            use_tls=False,
        )
        try:
            await client.connect(timeout=self._connect_timeout)
            await client.ehlo()
        except aiosmtplib.SMTPResponseException as exc:
            client.close()
            raise _fail(exc.code, exc.message, f"greeting from {host}:{port}") from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            client.close()
            raise TemporaryFailure(f"connect to {host}:{port}: {exc}") from exc
        if use_tls and client.supports_extension("starttls"):
            try:
                await client.starttls(validate_certs=False)
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                client.close()
                log.warning("STARTTLS with %s:%d failed (%s); retrying without TLS", host, port, exc)
                self._no_tls.add((host, port))
                return await self._connect(host, port)
        return _Conn(client, host, port)

    async def _checkout(self, host: str, port: int) -> _Conn:
        pool = self._idle.get((host, port))
        while pool:
            conn = pool.pop()
            if conn.client.is_connected and time.monotonic() - conn.idle_since < _IDLE_SECONDS:
                return conn
            conn.client.close()
        return await self._connect(host, port)

    def _checkin(self, conn: _Conn) -> None:
        conn.used += 1
        if conn.used >= self._per_conn or not conn.client.is_connected:
            task = asyncio.ensure_future(self._quit(conn.client))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
            return
        conn.idle_since = time.monotonic()
        self._idle.setdefault((conn.host, conn.port), []).append(conn)
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap())

    @staticmethod
    async def _quit(client: aiosmtplib.SMTP) -> None:
        with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
            await client.quit(timeout=5)
        client.close()

    async def _reap(self) -> None:
        while any(self._idle.values()):
            await asyncio.sleep(_IDLE_SECONDS / 2)
            now = time.monotonic()
            for key, conns in list(self._idle.items()):
                keep = [c for c in conns if now - c.idle_since < _IDLE_SECONDS and c.client.is_connected]
                for c in conns:
                    if c not in keep:
                        await self._quit(c.client)
                self._idle[key] = keep

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for conns in self._idle.values():
            for c in conns:
                await self._quit(c.client)
        self._idle.clear()

    async def send(self, hosts: tuple[tuple[str, int], ...], mail_from: str, rcpt: str, data: bytes) -> str:
        """Deliver; return the final ``250`` reply text.

        The next host is tried only when a host can't be reached or refuses the session (RFC 5321 §5.1);
        a reply to the transaction itself is final for this attempt.
        """
        last: TemporaryFailure | PermanentFailure | None = None
        for host, port in hosts:
            try:
                conn = await self._checkout(host, port)
            except (TemporaryFailure, PermanentFailure) as exc:
                last = exc
                continue
            try:
                return await self._transaction(conn, mail_from, rcpt, data)
            except _StaleConnection:
                # the server closed a pooled connection while it sat idle: not a failure of this delivery
                pass
            try:
                conn = await self._connect(host, port)
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
        step = "MAIL FROM"
        try:
            await client.mail(mail_from, options=options)
            step = "RCPT TO"
            await client.rcpt(rcpt)
            step = "DATA"
            reply = await client.data(data)
        except aiosmtplib.SMTPResponseException as exc:
            err = _fail(exc.code, exc.message, f"{step} at {conn.host}:{conn.port}", step.split(" ")[0])
            if exc.code == 421 or not client.is_connected:
                client.close()
            else:
                with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
                    await client.rset()
                    self._checkin(conn)
            raise err from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            client.close()
            if step == "MAIL FROM" and conn.used > 0:
                raise _StaleConnection(f"{conn.host}:{conn.port} closed an idle connection") from exc
            raise TemporaryFailure(f"{step} at {conn.host}:{conn.port}: {exc}") from exc
        self._checkin(conn)
        return f"{reply.code} {reply.message}"
