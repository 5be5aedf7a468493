"""The peers of the MTAs under test: scripted next hops, a capturing MX and a tiny DNS.

Everything listens on loopback addresses inside the factory's private network namespace
(port 25 for SMTP, 53 for DNS), so the MTAs route by ordinary MX lookups, exactly as on
the Internet, and nothing leaves the machine.

* :class:`ScriptedHost` answers per recipient (``rcpt``), per envelope sender (``mail``),
  after the final dot (``data``) or at the banner (``greeting``), with the wording the
  generator chose for that address.
* :class:`CaptureHost` accepts everything and stores each null-sender message (a DSN).
* :class:`Resolver` answers MX/A for the configured zones and NXDOMAIN for the rest.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


@dataclass
class Script:
    """What a scripted host answers; filled in by the generator before sending."""

    rcpt: dict[str, str] = field(default_factory=dict)
    data: dict[str, str] = field(default_factory=dict)
    mail: tuple[str, ...] = ()
    greeting: tuple[str, ...] = ()
    counter: itertools.count[int] = field(default_factory=itertools.count)

    def rotate(self, replies: tuple[str, ...]) -> str:
        return replies[next(self.counter) % len(replies)]


class _Session(asyncio.Protocol):
    def __init__(
        self, name: str, script: Script | None, sink: Callable[[bytes, str, list[str]], None] | None
    ):
        self.name = name
        self.script = script
        self.sink = sink
        self.buffer = b""
        self.in_data = False
        self.data: list[bytes] = []
        self.sender = ""
        self.rcpts: list[str] = []
        self.transport: asyncio.Transport | None = None
        self.peer = "127.0.0.1"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = transport.get_extra_info("peername")[0]
        if self.script and self.script.greeting:
            self.reply(self.script.rotate(self.script.greeting).format(ip=self.peer))
            transport.close()
            return
        self.reply(f"220 {self.name} ESMTP ready")

    def reply(self, line: str) -> None:
        assert self.transport is not None
        self.transport.write(line.encode() + b"\r\n")

    def data_received(self, chunk: bytes) -> None:
        self.buffer += chunk
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            self.line(line.rstrip(b"\r"))

    def line(self, raw: bytes) -> None:
        if self.in_data:
            if raw == b".":
                self.in_data = False
                self.end_of_data()
            else:
                self.data.append(raw[1:] if raw.startswith(b".") else raw)
            return
        text = raw.decode("latin-1")
        verb = text[:4].upper()
        if verb in ("EHLO", "HELO"):
            extra = "-SIZE 104857600\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES" if verb == "EHLO" else ""
            self.reply(f"250-{self.name}\r\n250{extra}" if extra else f"250 {self.name}")
        elif verb == "MAIL":
            self.sender = _path(text)
            self.rcpts = []
            if self.script and self.script.mail:
                self.reply(self.script.rotate(self.script.mail).format(sender=self.sender, ip=self.peer))
                return
            self.reply("250 2.1.0 Ok")
        elif verb == "RCPT":
            rcpt = _path(text)
            answer = self.script.rcpt.get(rcpt.lower()) if self.script else None
            if answer:
                domain = rcpt.rpartition("@")[2]
                self.reply(answer.format(rcpt=rcpt, ip=self.peer, domain=domain))
                return
            self.rcpts.append(rcpt)
            self.reply("250 2.1.5 Ok")
        elif verb == "DATA":
            if not self.rcpts:
                self.reply("554 5.5.1 Error: no valid recipients")
                return
            self.in_data = True
            self.data = []
            self.reply("354 End data with <CR><LF>.<CR><LF>")
        elif verb == "RSET":
            self.sender, self.rcpts = "", []
            self.reply("250 2.0.0 Ok")
        elif verb == "NOOP":
            self.reply("250 2.0.0 Ok")
        elif verb == "QUIT":
            self.reply("221 2.0.0 Bye")
            assert self.transport is not None
            self.transport.close()
        else:
            self.reply("502 5.5.2 Error: command not recognized")

    def end_of_data(self) -> None:
        body = b"\r\n".join(self.data) + b"\r\n"
        if self.script:
            for rcpt in self.rcpts:
                answer = self.script.data.get(rcpt.lower())
                if answer:
                    self.reply(answer.format(rcpt=rcpt, ip=self.peer))
                    return
        if self.sink is not None:
            self.sink(body, self.sender, list(self.rcpts))
        self.reply("250 2.0.0 Ok: queued")


def _path(command: str) -> str:
    start = command.find("<")
    end = command.find(">", start + 1)
    if start < 0 or end < 0:
        return command.partition(":")[2].strip()
    return command[start + 1 : end]


async def serve_smtp(
    address: str,
    name: str,
    script: Script | None = None,
    sink: Callable[[bytes, str, list[str]], None] | None = None,
) -> asyncio.base_events.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _Session(name, script, sink), address, 25, reuse_address=True)


class _DnsProtocol(asyncio.DatagramProtocol):
    def __init__(self, zones: dict[str, tuple[str, str | None]]):
        #: domain -> (mx host name or "." for a null MX, A address of that host)
        self.zones = zones
        self.hosts = {mx: ip for mx, ip in zones.values() if ip}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            query = dns.message.from_wire(data)
        except Exception:
            return
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        name = question.name.to_text().rstrip(".").lower()
        rtype = question.rdtype
        if name in self.zones:
            mx, _ip = self.zones[name]
            if rtype == dns.rdatatype.MX:
                target = "." if mx == "." else mx + "."
                priority = 0 if mx == "." else 10
                response.answer.append(
                    dns.rrset.from_text(name + ".", 300, "IN", "MX", f"{priority} {target}")
                )
        elif name in self.hosts:
            if rtype == dns.rdatatype.A:
                response.answer.append(dns.rrset.from_text(name + ".", 300, "IN", "A", self.hosts[name]))
        elif name.endswith(".in-addr.arpa") or name.endswith(".ip6.arpa"):
            response.set_rcode(dns.rcode.NXDOMAIN)
        else:
            response.set_rcode(dns.rcode.NXDOMAIN)
        assert self.transport is not None
        self.transport.sendto(response.to_wire(), addr)


async def serve_dns(zones: dict[str, tuple[str, str | None]]) -> asyncio.DatagramTransport:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _DnsProtocol(zones), local_addr=("127.0.0.1", 53), family=socket.AF_INET
    )
    return transport
