"""A lean SMTP client for delivery: a transaction in two round trips with PIPELINING (RFC 2920), one with
CHUNKING, and one when the next transaction's commands went behind the last one's content (``send`` with
``then``).

Why not aiosmtplib: it sends one command and waits for
its reply before the next, and drops replies that arrive for commands it did not wait on, so it can't
pipeline; it also re-parses every address with the stdlib header parser and re-normalises the whole
message's line endings. Under load that was a third of relayd's CPU (py-spy, profile of 10 recipients a
message). Delivery sends one transaction per recipient (VERP), so the per-transaction cost is what counts.

The errors it raises are relayd's :class:`~relayd.core.errors.SmtpError` tree (``SmtpReplyError`` with
``code``/``message`` for a reply, ``SmtpDisconnected``/``SmtpConnectError``/``SmtpTimeout`` for the
connection), which the transport maps to delivery failures. A reply error also carries ``command`` ("MAIL",
"RCPT", "DATA").

With CHUNKING (RFC 3030) and PIPELINING offered, a transaction is one round trip: MAIL, RCPT, ``BDAT <n>
LAST`` and the message in one write (Gmail, Microsoft and Postfix's smtpd offer both).

What it does not do: AUTH (delivery never authenticates), SMTPUTF8 addresses.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
from collections.abc import Iterable

from relayd.core.errors import SmtpConnectError, SmtpDisconnected, SmtpReplyError, SmtpTimeout
from relayd.mail import chunks
from relayd.mail.chunks import Chunks

log = logging.getLogger(__name__)

_MAX_LINE = 8192
#: What is kept of one (multi-line) reply: its first lines, up to this many characters in all. Real replies
#: are a few lines (an EHLO list of 15, a rejection with a URL or two); the kept text is what classification
#: and the logs read. Like Postfix's smtp_chat.c ("defend against a denial of service attack by limiting
#: the amount of multi-line text that we are willing to store"), the rest is read and thrown away.
MAX_REPLY_LINES = 100
MAX_REPLY_TEXT = 16 * 1024
#: What is read of one reply before the server is taken for broken: past it the connection is closed and the
#: attempt fails temporarily (a hostile MX streaming continuation lines must not keep a delivery busy).
MAX_REPLY_BYTES = 1024 * 1024

#: the replies a BDAT transaction must get; a refused chunk is reported as DATA (the content stage)
_BDAT_EXPECTED = (("MAIL", (250,)), ("RCPT", (250, 251)), ("DATA", (250,)))


class ReplyError(SmtpReplyError):
    def __init__(self, code: int, message: str, command: str) -> None:
        super().__init__(code, message)
        self.command = command


class LeanSMTP:
    def __init__(
        self,
        *,
        hostname: str,
        port: int,
        local_hostname: str,
        source_address: tuple[str, int] | None,
        timeout: float,
    ) -> None:
        self.hostname = hostname
        self.port = port
        self.local_hostname = local_hostname
        self.source_address = source_address
        self.timeout = timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._extensions: dict[str, str] = {}
        self.replied = False  # did the server answer anything in the current transaction?
        #: the MAIL, RCPT and DATA of the next transaction, written behind the last one's content and not
        #: yet answered (:meth:`send` with ``then``); None when the connection is between transactions
        self.primed: str | None = None
        self.encrypted = False  # has STARTTLS succeeded on this connection?

    # --- connection --------------------------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def connect(self, *, timeout: float) -> None:
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(
                    self.hostname, self.port, local_addr=self.source_address, limit=_MAX_LINE
                ),
                timeout,
            )
        except (OSError, TimeoutError) as exc:
            raise SmtpConnectError(f"Error connecting to {self.hostname} on port {self.port}: {exc}") from exc
        code, text = await self._reply()
        if code != 220:
            self.close()
            raise ReplyError(code, text, "CONNECT")

    async def ehlo(self) -> None:
        code, text = await self._command(f"EHLO {self.local_hostname}")
        if code != 250:
            code, text = await self._command(f"HELO {self.local_hostname}")
            if code != 250:
                raise ReplyError(code, text, "HELO")
            self._extensions = {}
            return
        self._extensions = {}
        for line in text.split("\n")[1:]:
            name, _, value = line.strip().partition(" ")
            self._extensions[name.lower()] = value

    def supports_extension(self, name: str) -> bool:
        return name.lower() in self._extensions

    async def starttls(
        self,
        *,
        validate_certs: bool = False,
        context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        """Upgrade the connection. Without ``context``, opportunistic TLS verifies nothing (there is no
        trust anchor for MX hosts without DANE or MTA-STS), like Postfix's ``smtp_tls_security_level =
        may``; a verifying ``context`` checks the certificate against ``server_hostname`` (default: the
        host connected to)."""
        code, text = await self._command("STARTTLS")
        if code != 220:
            raise ReplyError(code, text, "STARTTLS")
        ctx = context
        if ctx is None:
            ctx = ssl.create_default_context()
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if not validate_certs:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
        assert self._writer is not None
        name = server_hostname or self.hostname
        try:
            await asyncio.wait_for(self._writer.start_tls(ctx, server_hostname=name), self.timeout)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            self.close()
            raise SmtpDisconnected(f"TLS handshake failed: {exc}") from exc
        self.encrypted = True
        await self.ehlo()

    def ssl_object(self) -> ssl.SSLObject | None:
        """The TLS session after STARTTLS (for checks of the peer's chain), None before."""
        if self._writer is None:
            return None
        obj = self._writer.get_extra_info("ssl_object")
        return obj if isinstance(obj, ssl.SSLObject) else None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer = self._reader = None
        self.primed = None

    async def quit(self, *, timeout: float = 5.0) -> None:
        try:
            await asyncio.wait_for(self._command("QUIT"), timeout)
        finally:
            self.close()

    async def rset(self) -> None:
        code, text = await self._command("RSET")
        if code != 250:
            raise ReplyError(code, text, "RSET")

    # --- the transaction -------------------------------------------------------------------------------

    @staticmethod
    def _mail(mail_from: str, options: list[str]) -> str:
        return f"MAIL FROM:<{mail_from}>" + "".join(f" {o}" for o in options)

    @classmethod
    def _group(cls, mail_from: str, rcpt: str, options: list[str]) -> str:
        """The pipelined commands that begin a transaction (RFC 2920 §3.1: DATA ends the group)."""
        return f"{cls._mail(mail_from, options)}\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n"

    async def send(
        self,
        mail_from: str,
        rcpt: str,
        data: Chunks,
        options: list[str],
        then: tuple[str, str, list[str]] | None = None,
    ) -> tuple[int, str]:
        """MAIL, RCPT, DATA and the message; returns the final reply. ``data`` must be CRLF text (the
        queue only holds such: bare CR/LF were refused at submission), one ``bytes`` or the pieces of a
        copy (relayd.mail.chunks), sent a window at a time without joining them.

        ``then`` is the envelope (sender, recipient, MAIL options) of the next transaction on this
        connection. With PIPELINING (and DATA, not BDAT), its MAIL, RCPT and DATA go in the write that
        ends this message: RFC 2920 §3.1 lets message content begin a group, as Postfix's smtp-sink and
        every PIPELINING server read it. Its replies are then already on their way when it begins, one
        write and one wait fewer per transaction (relayd sends a message's recipients one transaction
        each). The connection stays :attr:`primed` even when this transaction failed, since the server
        read those commands anyway; the next ``send`` must be that transaction, or the connection be
        closed (a ``354`` can't be taken back without sending a message)."""
        self.replied = False
        if "chunking" in self._extensions and "pipelining" in self._extensions:
            return await self._send_bdat(self._mail(mail_from, options), f"RCPT TO:<{rcpt}>", data)
        expected = (("MAIL", (250,)), ("RCPT", (250, 251)), ("DATA", (354,)))
        if "pipelining" in self._extensions:
            group = self._group(mail_from, rcpt, options)
            if self.primed is None:
                self._write(group.encode())
            elif self.primed != group:
                raise ValueError("the connection is primed for another transaction")
            self.primed = None
            replies = await self._replies(3)
        else:
            then = None
            replies = [await self._command(self._mail(mail_from, options))]
            if replies[0][0] == 250:
                replies.append(await self._command(f"RCPT TO:<{rcpt}>"))
                if replies[1][0] in (250, 251):
                    replies.append(await self._command("DATA"))
        for (code, text), (command, ok) in zip(
            replies, expected, strict=False
        ):  # fewer replies: stopped early
            if code not in ok:
                if command != "DATA" and len(replies) == 3 and replies[2][0] == 354:
                    # a server that accepted DATA after a refused command: end the empty message
                    self._write(b".\r\n")
                    await self._reply()
                raise ReplyError(code, text, command)
        follow = "" if then is None else self._group(*then)
        # lazily: a big message is stuffed and written a window at a time, never held stuffed whole
        await self._write_all(itertools.chain(chunks.dot_stuffed(data), (follow.encode(),)))
        self.primed = follow or None
        code, text = await self._reply()
        if code != 250:
            raise ReplyError(code, text, "DATA")
        return code, text

    async def _send_bdat(self, mail: str, rcpt_cmd: str, data: Chunks) -> tuple[int, str]:
        """RFC 3030 CHUNKING with PIPELINING: MAIL, RCPT, ``BDAT <n> LAST`` and the message in one write,
        three replies back -- one round trip instead of two, and no dot-stuffing. A server that refused
        MAIL or RCPT still reads the chunk and refuses the BDAT (§2), so the connection stays in step."""
        size = chunks.total(data)
        end = b"\r\n" if size and not chunks.ends_with_crlf(data) else b""
        commands = f"{mail}\r\n{rcpt_cmd}\r\nBDAT {size + len(end)} LAST\r\n".encode()
        await self._write_all(itertools.chain((commands,), chunks.windows(data), (end,)))
        replies = await self._replies(3)
        for (code, text), (command, ok) in zip(replies, _BDAT_EXPECTED, strict=True):
            if code not in ok:
                raise ReplyError(code, text, command)
        return replies[2]

    # --- wire ------------------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._writer is None or self._writer.is_closing():
            raise SmtpDisconnected("Connection lost")
        self._writer.write(data)

    async def _write_all(self, pieces: Iterable[bytes]) -> None:
        """Write ``pieces`` joined into writes of about a window (relayd.mail.chunks.WINDOW); after a write
        that leaves more than a window in the transport's buffer, wait until it has room again, so a big
        message is never buffered whole (``timeout`` for each wait). A copy of a few KB is one write and
        no wait, as a joined message was: one system call per transaction counts at thousands a second."""
        batch: list[bytes] = []
        size = 0
        for piece in pieces:
            if piece:
                batch.append(piece)
                size += len(piece)
                if size >= chunks.WINDOW:
                    await self._write_window(batch)
                    batch, size = [], 0
        if batch:
            await self._write_window(batch)

    async def _write_window(self, batch: list[bytes]) -> None:
        self._write(batch[0] if len(batch) == 1 else b"".join(batch))
        writer = self._writer
        assert writer is not None
        if writer.transport.get_write_buffer_size() <= chunks.WINDOW:
            return
        try:
            async with asyncio.timeout(self.timeout):
                await writer.drain()
        except TimeoutError as exc:
            self.close()
            raise SmtpTimeout("Timed out sending the message") from exc
        except OSError as exc:
            self.close()
            raise SmtpDisconnected(f"Connection lost: {exc}") from exc

    async def _command(self, line: str) -> tuple[int, str]:
        self._write(line.encode("ascii", "strict") + b"\r\n")
        return await self._reply()

    async def _reply(self) -> tuple[int, str]:
        """One (possibly multi-line) reply: ``(code, text)`` with the lines joined by ``\\n``."""
        return (await self._replies(1))[0]

    async def _replies(self, n: int) -> list[tuple[int, str]]:
        """The replies to a group of ``n`` pipelined commands, which arrive together: the group gets
        ``timeout`` (one round trip), like a single command.

        Of each reply the first :data:`MAX_REPLY_LINES` lines (:data:`MAX_REPLY_TEXT` characters) are
        kept and the rest read and dropped; a reply over :data:`MAX_REPLY_BYTES` closes the connection
        with an ``SmtpReplyError`` (code -1: a temporary failure of the attempt)."""
        reader = self._reader
        if reader is None:
            raise SmtpDisconnected("Connection lost")
        out: list[tuple[int, str]] = []
        lines: list[str] = []
        kept = size = dropped = 0  # of the reply being read: characters kept, bytes read, lines dropped
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for wraps every readline in a new Task
            async with asyncio.timeout(self.timeout):
                while len(out) < n:
                    raw = await reader.readline()
                    if not raw:
                        self.close()
                        raise SmtpDisconnected("Unexpected EOF received")
                    size += len(raw)
                    if size > MAX_REPLY_BYTES:
                        self.replied = True
                        self.close()
                        raise SmtpReplyError(
                            -1,
                            f"Reply longer than {MAX_REPLY_BYTES} bytes: {lines[0][:100] if lines else ''}",
                        )
                    line = raw.decode("utf-8", "surrogateescape").rstrip("\r\n")
                    if len(line) < 3 or not line[:3].isdigit():
                        self.close()
                        raise SmtpReplyError(-1, f"Malformed SMTP response line: {line[:100]}")
                    if len(lines) < MAX_REPLY_LINES and kept < MAX_REPLY_TEXT:
                        text = line[4 : 4 + MAX_REPLY_TEXT - kept]
                        lines.append(text)
                        kept += len(text) + 1
                    else:
                        dropped += 1
                    if line[3:4] != "-":
                        self.replied = True
                        if dropped:
                            log.info(
                                "%s:%d: %d-line reply of %d bytes; kept its first %d lines",
                                self.hostname,
                                self.port,
                                len(lines) + dropped,
                                size,
                                len(lines),
                            )
                        out.append((int(line[:3]), "\n".join(lines)))
                        lines = []
                        kept = size = dropped = 0
            return out
        except TimeoutError as exc:
            self.close()
            raise SmtpTimeout("Timed out waiting for server response") from exc
        except (OSError, ValueError, asyncio.LimitOverrunError, asyncio.IncompleteReadError) as exc:
            self.close()
            raise SmtpDisconnected(f"Connection lost: {exc}") from exc
