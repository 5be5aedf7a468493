"""``relayd.cli.doctor`` against a real DNS server on loopback (a dnspython responder, UDP and TCP).

The zone has one domain where everything is right (``a.test``, plus ``news.a.test`` relying on it), one
where each record is wrong in its own way (``b.test``), and one whose server fails (``broken.test``).
Nothing in dnspython or pyspf is mocked: both are only pointed at the responder's address.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from relayd.cli.doctor import Check, format_table, run_checks
from relayd.config import Config
from relayd.mail.dkim import keygen

# A TXT set of the size real apex domains have (site verification tokens next to SPF): over 512 bytes, so
# the UDP answer is truncated and the lookup has to be retried over TCP (RFC 7766), as in the wild.
_PADDING = ['"site-verification=' + "x" * 200 + '"', '"other-verification=' + "y" * 200 + '"']


def _txt(text: str) -> str:
    """Text as a TXT rdata: quoted strings of at most 255 octets (RFC 1035 §3.3.14)."""
    return " ".join(f'"{text[i : i + 250]}"' for i in range(0, len(text), 250))


def _zone_rdata(zone_line: str) -> str:
    """The rdata part of ``relayd dkim keygen``'s zone line, as an operator would paste it."""
    return zone_line.split(" IN TXT ", 1)[1]


class DnsServer:
    """Authoritative-only responder for a fixed zone, on one UDP and one TCP socket of the same port.

    Names under ``servfail`` answer SERVFAIL; names not in the zone (and not above a name in it) NXDOMAIN.
    UDP answers over 512 bytes (or the EDNS payload size) are truncated with TC set, as a real server does.
    """

    def __init__(self, zone: dict[tuple[str, str], list[str]], servfail: str) -> None:
        self.zone = zone
        self.servfail = dns.name.from_text(servfail)
        self.names = {dns.name.from_text(n) for n, _ in zone}
        self.tcp_queries = 0
        self.stop = threading.Event()
        for _ in range(50):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                udp.close()
                tcp.close()
                continue
            break
        else:
            raise RuntimeError("no free port for both UDP and TCP")
        tcp.listen(16)
        udp.settimeout(0.2)
        tcp.settimeout(0.2)
        self.udp, self.tcp, self.port = udp, tcp, port
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self._serve_udp, self._serve_tcp)]
        for t in self.threads:
            t.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _exists(self, name: dns.name.Name) -> bool:
        return any(known.is_subdomain(name) for known in self.names)

    def answer(self, wire: bytes, limit: int | None) -> bytes:
        query = dns.message.from_wire(wire)
        q = query.question[0]
        reply = dns.message.make_response(query)
        reply.flags |= dns.flags.AA
        rdtype = dns.rdatatype.to_text(q.rdtype)
        records = self.zone.get((q.name.to_text(), rdtype))
        if q.name.is_subdomain(self.servfail):
            reply.set_rcode(dns.rcode.SERVFAIL)
        elif records:
            reply.answer.append(dns.rrset.from_text(q.name, 60, "IN", rdtype, *records))
        elif not self._exists(q.name):
            reply.set_rcode(dns.rcode.NXDOMAIN)
        out = reply.to_wire()
        if limit is not None:
            size = max(512, query.payload) if query.edns >= 0 else 512
            if len(out) > size:
                reply = dns.message.make_response(query)
                reply.flags |= dns.flags.AA | dns.flags.TC
                out = reply.to_wire()
        return out

    def _serve_udp(self) -> None:
        while not self.stop.is_set():
            try:
                data, addr = self.udp.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.udp.sendto(self.answer(data, limit=512), addr)

    def _serve_tcp(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._tcp_conn, args=(conn,), daemon=True).start()

    def _tcp_conn(self, conn: socket.socket) -> None:
        def read(n: int) -> bytes:
            buf = b""
            while len(buf) < n:
                chunk = conn.recv(n - len(buf))
                if not chunk:
                    raise EOFError
                buf += chunk
            return buf

        with conn:
            conn.settimeout(5)
            try:
                while True:
                    (length,) = struct.unpack("!H", read(2))
                    self.tcp_queries += 1
                    out = self.answer(read(length), limit=None)
                    conn.sendall(struct.pack("!H", len(out)) + out)
            except (EOFError, OSError):
                return

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(2)
        self.udp.close()
        self.tcp.close()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Keys relayd is configured with, and a stranger's key that b.test publishes by mistake."""
    conf = tmp_path_factory.mktemp("keys")
    other = tmp_path_factory.mktemp("other")
    a_path, a_zone = keygen("a.test", "s1", "rsa", conf)
    b1_path, _ = keygen("b.test", "s1", "ed25519", conf)
    b2_path, _ = keygen("b.test", "s2", "rsa", conf)
    broken_path, _ = keygen("broken.test", "s1", "ed25519", conf)
    _, stranger_zone = keygen("b.test", "s1", "ed25519", other)
    return {
        "a": a_path,
        "a_zone": a_zone,
        "b1": b1_path,
        "b2": b2_path,
        "broken": broken_path,
        "stranger_zone": stranger_zone,
    }


@pytest.fixture(scope="module")
def server(keys: dict[str, Any]) -> Iterator[DnsServer]:
    zone = {
        # a.test: all good (SPF in a big TXT set, a 2048-bit key split over several strings)
        ("a.test.", "TXT"): ['"v=spf1 ip4:127.0.0.1 -all"', *_PADDING],
        ("s1._domainkey.a.test.", "TXT"): [_zone_rdata(keys["a_zone"])],
        ("_dmarc.a.test.", "TXT"): [_txt("v=DMARC1; p=reject; rua=mailto:dmarc@a.test")],
        # news.a.test: own SPF, signed as d=a.test, covered by a.test's DMARC record (its sp=)
        ("news.a.test.", "TXT"): [_txt("v=spf1 ip4:127.0.0.0/8 -all")],
        # b.test: SPF for another address, s1 publishes someone else's key, s2 nothing, no DMARC
        ("b.test.", "TXT"): [_txt("v=spf1 ip4:192.0.2.1 -all"), *_PADDING],
        ("s1._domainkey.b.test.", "TXT"): [_zone_rdata(keys["stranger_zone"])],
        ("_dmarc.b.test.", "TXT"): [_txt("some unrelated text")],
        # inbound domains
        ("bounces.a.test.", "MX"): ["10 mx.a.test."],
        ("mx.a.test.", "A"): ["127.0.0.1"],
        ("bounces.b.test.", "A"): ["127.0.0.1"],  # exists, but no MX
        ("elsewhere.b.test.", "MX"): ["10 mx.a.test.", "20 mx.other.test."],
        ("mx.other.test.", "A"): ["192.0.2.99"],
        ("nullmx.b.test.", "MX"): ["0 ."],
    }
    srv = DnsServer(zone, servfail="broken.test.")
    yield srv
    srv.close()


def _config(keys: dict[str, Any], **extra: Any) -> Config:
    data: dict[str, Any] = {
        "server": {"hostname": "relayd.a.test"},
        "inbound": {"domains": ["bounces.a.test", "bounces.b.test", "elsewhere.b.test", "nullmx.b.test"]},
        "accounts": {
            "acme": {
                "networks": ["127.0.0.1/32"],
                "domains": ["a.test", "news.a.test"],
                "signing_domain": "a.test",
            },
            "bravo": {"networks": ["127.0.0.2/32"], "domains": ["b.test"]},
            "crash": {"networks": ["127.0.0.3/32"], "domains": ["broken.test", "unsigned.test"]},
        },
        "dkim": [
            {"domain": "a.test", "selector": "s1", "key_file": str(keys["a"]), "algorithm": "rsa"},
            {"domain": "b.test", "selector": "s1", "key_file": str(keys["b1"]), "algorithm": "ed25519"},
            {"domain": "b.test", "selector": "s2", "key_file": str(keys["b2"]), "algorithm": "rsa"},
            {
                "domain": "broken.test",
                "selector": "s1",
                "key_file": str(keys["broken"]),
                "algorithm": "ed25519",
            },
        ],
    }
    data.update(extra)
    return Config.model_validate(data)


def _by(checks: list[Check], domain: str, what: str) -> list[Check]:
    return [c for c in checks if c.domain == domain and c.what == what]


def _one(checks: list[Check], domain: str, what: str) -> Check:
    (check,) = _by(checks, domain, what)
    return check


@pytest.fixture
async def checks(server: DnsServer, keys: dict[str, Any]) -> list[Check]:
    cfg = _config(keys, delivery={"nameservers": [server.address]})
    return await run_checks(cfg, outbound_ips=["127.0.0.1"])


async def test_good_domain_passes_every_check(checks: list[Check], server: DnsServer) -> None:
    spf = _one(checks, "a.test", "SPF")
    assert spf.ok, spf
    assert "127.0.0.1" in spf.detail
    dkim = _one(checks, "a.test", "DKIM")
    assert dkim.ok and dkim.detail.startswith("ok:"), dkim
    dmarc = _one(checks, "a.test", "DMARC")
    assert dmarc.ok and dmarc.detail == "p=reject", dmarc
    mx = _one(checks, "bounces.a.test", "MX")
    assert mx.ok and "mx.a.test (127.0.0.1)" in mx.detail, mx
    # the SPF answer of a.test is over 512 bytes: pyspf's lookups went through our resolver, over TCP
    assert server.tcp_queries > 0


async def test_subdomain_relies_on_its_parent(checks: list[Check]) -> None:
    assert _one(checks, "news.a.test", "SPF").ok
    dkim = _one(checks, "news.a.test", "DKIM")
    assert dkim.ok and "d=a.test" in dkim.detail, dkim
    dmarc = _one(checks, "news.a.test", "DMARC")
    assert dmarc.ok and dmarc.detail == "p=reject (from _dmarc.a.test)", dmarc
    assert len(_by(checks, "a.test", "DKIM")) == 1  # the signing domain's key is checked once


async def test_bad_domain_fails_each_check(checks: list[Check]) -> None:
    spf = _one(checks, "b.test", "SPF")
    assert not spf.ok and spf.detail.startswith("fail for 127.0.0.1"), spf
    dkim = {c.detail.split(":")[0]: c for c in _by(checks, "b.test", "DKIM")}
    assert set(dkim) == {"mismatch", "missing"}
    assert not dkim["mismatch"].ok and "s1._domainkey.b.test" in dkim["mismatch"].detail
    assert not dkim["missing"].ok and "s2._domainkey.b.test" in dkim["missing"].detail
    dmarc = _one(checks, "b.test", "DMARC")
    assert not dmarc.ok and dmarc.detail.startswith("missing:"), dmarc


async def test_inbound_domains_without_a_usable_mx_fail(checks: list[Check]) -> None:
    no_mx = _one(checks, "bounces.b.test", "MX")
    assert not no_mx.ok and "no MX record" in no_mx.detail, no_mx
    foreign = _one(checks, "elsewhere.b.test", "MX")
    assert not foreign.ok and "mx.other.test (192.0.2.99) is not this host" in foreign.detail, foreign
    null = _one(checks, "nullmx.b.test", "MX")
    assert not null.ok and "null MX" in null.detail, null


async def test_dns_failures_are_failed_checks(checks: list[Check]) -> None:
    for what in ("SPF", "DKIM", "DMARC"):
        check = _one(checks, "broken.test", what)
        assert not check.ok, check
        assert "SERVFAIL" in check.detail or "temperror" in check.detail, check
    unsigned = _one(checks, "unsigned.test", "DKIM")
    assert not unsigned.ok and "unsigned" in unsigned.detail


async def test_order_is_per_domain_then_inbound(checks: list[Check]) -> None:
    assert [(c.domain, c.what) for c in checks][:4] == [
        ("a.test", "SPF"),
        ("a.test", "DKIM"),
        ("a.test", "DMARC"),
        ("news.a.test", "SPF"),
    ]
    assert [c.what for c in checks[-4:]] == ["MX"] * 4


async def test_table_names_every_problem(checks: list[Check]) -> None:
    table = format_table(checks)
    lines = table.splitlines()
    assert lines[0].split() == ["DOMAIN", "CHECK", "RESULT", "DETAIL"]
    assert len(lines) == len(checks) + 1
    columns = [lines[0].index(h) for h in ("CHECK", "RESULT", "DETAIL")]
    for line, check in zip(lines[1:], checks, strict=True):
        assert line.startswith(check.domain + " ")
        assert line[columns[0] :].startswith(check.what)
        assert line[columns[1] :].startswith("FAIL" if not check.ok else "WARN" if check.warning else "ok")
        assert line[columns[2] :] == check.detail
    fails = [line for line in lines if "FAIL" in line]
    for needle in (
        "fail for 127.0.0.1 (SPF fail - not authorized)",
        "mismatch: p= at s1._domainkey.b.test",
        "missing: no DKIM key record (TXT with p=) at s2._domainkey.b.test",
        "missing: no v=DMARC1 record at _dmarc.b.test",
        "missing: no MX record for bounces.b.test",
        "mx.other.test (192.0.2.99) is not this host",
    ):
        assert any(needle in line for line in fails), (needle, table)


async def test_pool_addresses_are_what_spf_must_authorise(server: DnsServer, keys: dict[str, Any]) -> None:
    cfg = _config(
        keys,
        delivery={"nameservers": [server.address]},
        pools={"main": {"addresses": ["127.0.0.1", "192.0.2.1"], "helo": "mta.a.test"}},
    )
    checks = await run_checks(cfg, outbound_ips=["127.0.0.1"])  # pools win over outbound_ips
    a = _one(checks, "a.test", "SPF")
    assert not a.ok and a.detail.startswith("fail for 192.0.2.1"), a
    b = _one(checks, "b.test", "SPF")
    assert not b.ok and "fail for 127.0.0.1" in b.detail and "192.0.2.1" not in b.detail.split(";")[0], b


async def test_resolver_argument_overrides_config(server: DnsServer, keys: dict[str, Any]) -> None:
    cfg = _config(keys, delivery={"nameservers": ["127.0.0.1:1"]})
    checks = await run_checks(cfg, resolver_nameservers=[server.address], outbound_ips=["127.0.0.1"])
    assert _one(checks, "a.test", "DKIM").ok


async def test_no_answering_server_gives_failed_checks_not_exceptions(keys: dict[str, Any]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    checks = await run_checks(_config(keys), resolver_nameservers=[closed], outbound_ips=["127.0.0.1"])
    assert checks and not any(c.ok for c in checks if c.detail != "no key of its own; signed as d=a.test")


async def test_unusable_nameserver_setting_is_reported(keys: dict[str, Any]) -> None:
    checks = await run_checks(_config(keys), resolver_nameservers=["::1:53"], outbound_ips=["127.0.0.1"])
    failed = [c for c in checks if not c.ok and c.domain != "unsigned.test"]
    assert failed and all(c.detail.startswith("no usable DNS resolver: IPv6 addresses need") for c in failed)
    assert not any(c.ok for c in checks if c.what != "DKIM")


def test_format_table_aligns_plain_text() -> None:
    table = format_table(
        [
            Check("a.test", "SPF", True, "pass for 127.0.0.1"),
            Check("longer.b.test", "DMARC", False, "missing"),
        ]
    )
    assert table == (
        "DOMAIN         CHECK  RESULT  DETAIL\n"
        "a.test         SPF    ok      pass for 127.0.0.1\n"
        "longer.b.test  DMARC  FAIL    missing\n"
    )
