"""MX routing against a real DNS server on loopback (a small dnspython responder with a fixed zone)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from relayd.config import DeliveryConfig
from relayd.core.errors import PermanentFailure, TemporaryFailure
from relayd.queue.routing import Router

ZONE: dict[tuple[str, str], list[str]] = {
    ("multi.test.", "MX"): ["20 mx2.multi.test.", "10 mx1.multi.test."],
    ("mx1.multi.test.", "A"): ["127.0.0.11"],
    ("mx2.multi.test.", "A"): ["127.0.0.12"],
    ("mx2.multi.test.", "AAAA"): ["::1"],
    ("nomx.test.", "A"): ["127.0.0.13"],
    ("nullmx.test.", "MX"): ["0 ."],
    ("servfail.test.", "MX"): ["SERVFAIL"],
}
EXISTING = {name for name, _ in ZONE}


class DnsStub:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(4096)
            except OSError:
                return
            query = dns.message.from_wire(data)
            q = query.question[0]
            name, rdtype = q.name.to_text(), dns.rdatatype.to_text(q.rdtype)
            reply = dns.message.make_response(query)
            records = ZONE.get((name, rdtype))
            if records == ["SERVFAIL"]:
                reply.set_rcode(dns.rcode.SERVFAIL)
            elif records:
                reply.answer.append(dns.rrset.from_text(name, 60, "IN", rdtype, *records))
            elif name not in EXISTING:
                reply.set_rcode(dns.rcode.NXDOMAIN)
            self.sock.sendto(reply.to_wire(), addr)


@pytest.fixture(scope="module")
def router() -> Iterator[Router]:
    stub = DnsStub()
    stub.thread.start()
    cfg = DeliveryConfig(mode="mx", nameservers=[f"127.0.0.1:{stub.port}"], port=2525)
    r = Router(cfg)
    r._resolver.lifetime = 3.0
    yield r
    stub.sock.close()


async def test_mx_hosts_in_preference_order(router: Router) -> None:
    route = await router.route("Multi.Test")
    assert route.nexthop == "multi.test"
    assert route.hosts == (("127.0.0.11", 2525), ("127.0.0.12", 2525), ("::1", 2525))


async def test_no_mx_falls_back_to_the_address(router: Router) -> None:
    assert (await router.route("nomx.test")).hosts == (("127.0.0.13", 2525),)


async def test_null_mx_is_permanent(router: Router) -> None:
    with pytest.raises(PermanentFailure) as exc:
        await router.route("nullmx.test")
    assert exc.value.status == "5.1.10"


async def test_nxdomain_is_permanent(router: Router) -> None:
    with pytest.raises(PermanentFailure):
        await router.route("does-not-exist.test")


async def test_servfail_is_temporary(router: Router) -> None:
    with pytest.raises(TemporaryFailure):
        await router.route("servfail.test")


async def test_configured_routes_win_over_mx() -> None:
    cfg = DeliveryConfig(mode="mx", routes={".corp.test": "127.0.0.1:2600", "exact.test": "[::1]:2601"})
    r = Router(cfg)
    assert (await r.route("mail.corp.test")).hosts == (("127.0.0.1", 2600),)
    assert (await r.route("exact.test")).hosts == (("::1", 2601),)
    strict = Router(DeliveryConfig(mode="routes", routes={"a.test": "127.0.0.1:1"}))
    with pytest.raises(PermanentFailure):
        await strict.route("b.test")
