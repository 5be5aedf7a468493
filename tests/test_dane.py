"""DANE (RFC 7672) on MX delivery, end to end on loopback: a DNS server answering MX, A and TLSA, with the
AD bit (what a validating resolver sets on DNSSEC-signed data) where the test says so, and TLS sinks
whose certificates come from a private CA that relayd does NOT trust: DANE needs no CA store."""

from __future__ import annotations

import hashlib
import json
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from aiosmtpd.controller import Controller
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.dnszone import Zone
from tests.harness import RELAYD, Relayd, TlsRecorder, free_port, message, wait_until

DOMAIN = "dane.test"
MX = "mx.dane.test"
CA = trustme.CA()
OTHER_CA = trustme.CA()


@dataclass
class World:
    zone: Zone
    sink: TlsRecorder
    sink_port: int
    leaf: x509.Certificate
    tmp: Path

    def relayd(self) -> Relayd:
        relayd = Relayd(
            self.tmp,
            routes={"routed.test": self.sink_port},
            retry_schedule='["1h"]',
            extra=f'port = {self.sink_port}\nnameservers = ["127.0.0.1:{self.zone.port}"]',
        )
        relayd.config.write_text(relayd.config.read_text().replace('mode = "routes"', 'mode = "mx"'))
        return relayd

    def tlsa(self, record: str, *, ad: bool = True) -> None:
        self.zone.set(f"_25._tcp.{MX}", "TLSA", record, ad=ad)


def _spki_sha256(cert: x509.Certificate) -> str:
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def _ca_sha256(ca: trustme.CA) -> str:
    der = x509.load_pem_x509_certificate(ca.cert_pem.bytes()).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def _world(tmp: Path, name: str, *, starttls: bool = True) -> Iterator[World]:
    """The sink serves a certificate for ``name`` from CA, with CA's own certificate in the chain (as a
    DANE-TA server must send it, RFC 7672 §3.1.2); without ``starttls`` it offers no STARTTLS."""
    issued = CA.issue_cert(name)
    chain = tmp / "chain.pem"
    chain.write_bytes(
        issued.private_key_pem.bytes() + issued.cert_chain_pems[0].bytes() + CA.cert_pem.bytes()
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(chain)
    leaf = x509.load_pem_x509_certificate(issued.cert_chain_pems[0].bytes())
    recorder = TlsRecorder()
    port = free_port()
    controller = Controller(
        recorder,
        hostname="127.0.0.1",
        port=port,
        tls_context=ctx if starttls else None,
        require_starttls=False,
    )
    with Zone() as zone:
        zone.set(DOMAIN, "MX", f"10 {MX}.", ad=True)
        zone.set(MX, "A", "127.0.0.1", ad=True)
        controller.start()
        try:
            yield World(zone, recorder, port, leaf, tmp)
        finally:
            controller.stop()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    yield from _world(tmp_path, MX)


@pytest.fixture
def wrong_name_world(tmp_path: Path) -> Iterator[World]:
    yield from _world(tmp_path, "somewhere-else.test")


@pytest.fixture
def plaintext_world(tmp_path: Path) -> Iterator[World]:
    yield from _world(tmp_path, MX, starttls=False)


def _submit(relayd: Relayd, rcpt: str) -> str:
    code, resp = relayd.submit(message("dane"), to=[rcpt])
    assert code == 250, resp
    return resp.decode().rsplit(" ", 1)[1]


def _deferred_reply(relayd: Relayd, queue_id: str, rcpt: str) -> str:
    def row() -> dict[str, object]:
        out = relayd.cli("queue", "show", "--json", queue_id)
        assert out.returncode == 0, out.stderr
        return next(r for r in json.loads(out.stdout)["recipients"] if r["address"] == rcpt)

    assert wait_until(lambda: int(str(row()["attempts"])) >= 1), relayd.log_text()[-2000:]
    assert row()["state"] not in ("delivered", "failed")
    return str(row()["last_reply"])


def test_dane_ee_match_is_delivered_without_any_trusted_ca(wrong_name_world: World) -> None:
    world = wrong_name_world  # DANE-EE checks neither the name nor the issuer (RFC 7672 §3.1.1)
    world.tlsa(f"3 1 1 {_spki_sha256(world.leaf)}")
    with world.relayd() as relayd:
        _submit(relayd, f"ann@{DOMAIN}")
        assert wait_until(lambda: len(world.sink.delivered) == 1), relayd.log_text()[-2000:]
    assert world.sink.delivered == [(f"ann@{DOMAIN}", True)]


def test_dane_ee_mismatch_is_deferred_and_nothing_is_sent(world: World) -> None:
    world.tlsa(f"3 1 1 {hashlib.sha256(b'another key').hexdigest()}")
    with world.relayd() as relayd:
        qid = _submit(relayd, f"ann@{DOMAIN}")
        reply = _deferred_reply(relayd, qid, f"ann@{DOMAIN}")
        assert "4.7.5" in reply and "no TLSA record matches" in reply
    assert world.sink.mail_from == []


def test_tlsa_without_the_ad_bit_is_ignored(world: World) -> None:
    world.tlsa(f"3 1 1 {hashlib.sha256(b'another key').hexdigest()}", ad=False)
    with world.relayd() as relayd:
        _submit(relayd, f"ann@{DOMAIN}")
        assert wait_until(lambda: len(world.sink.delivered) == 1), relayd.log_text()[-2000:]
    assert world.sink.delivered == [(f"ann@{DOMAIN}", True)]  # opportunistic TLS, as without DANE


def test_tlsa_of_an_insecure_mx_is_ignored(world: World) -> None:
    world.zone.set(DOMAIN, "MX", f"10 {MX}.", ad=False)  # the MX could be forged: its TLSA says nothing
    world.tlsa(f"3 1 1 {hashlib.sha256(b'another key').hexdigest()}")
    with world.relayd() as relayd:
        _submit(relayd, f"ann@{DOMAIN}")
        assert wait_until(lambda: len(world.sink.delivered) == 1), relayd.log_text()[-2000:]
    assert not world.zone.asked(f"_25._tcp.{MX}", "TLSA")


def test_dane_ta_with_the_mx_name_is_delivered(world: World) -> None:
    world.tlsa(f"2 0 1 {_ca_sha256(CA)}")
    with world.relayd() as relayd:
        _submit(relayd, f"ann@{DOMAIN}")
        assert wait_until(lambda: len(world.sink.delivered) == 1), relayd.log_text()[-2000:]
    assert world.sink.delivered == [(f"ann@{DOMAIN}", True)]


def test_dane_ta_with_another_name_is_deferred(wrong_name_world: World) -> None:
    world = wrong_name_world
    world.tlsa(f"2 0 1 {_ca_sha256(CA)}")
    with world.relayd() as relayd:
        qid = _submit(relayd, f"ann@{DOMAIN}")
        reply = _deferred_reply(relayd, qid, f"ann@{DOMAIN}")
        assert "4.7.5" in reply and "does not verify" in reply
    assert world.sink.mail_from == []


def test_dane_ta_naming_another_ca_is_deferred(world: World) -> None:
    world.tlsa(f"2 0 1 {_ca_sha256(OTHER_CA)}")
    with world.relayd() as relayd:
        qid = _submit(relayd, f"ann@{DOMAIN}")
        assert "4.7.5" in _deferred_reply(relayd, qid, f"ann@{DOMAIN}")
    assert world.sink.mail_from == []


def test_dane_wins_over_mta_sts(world: World) -> None:
    world.zone.set(f"_mta-sts.{DOMAIN}", "TXT", '"v=STSv1; id=1;"')
    world.tlsa(f"3 1 1 {_spki_sha256(world.leaf)}")
    with world.relayd() as relayd:
        _submit(relayd, f"ann@{DOMAIN}")
        assert wait_until(lambda: len(world.sink.delivered) == 1), relayd.log_text()[-2000:]
    assert not world.zone.asked(f"_mta-sts.{DOMAIN}", "TXT")


def test_check_config_says_dane_is_off_without_nameservers(tmp_path: Path) -> None:
    def dane_lines(extra: str) -> list[str]:
        relayd = Relayd(tmp_path, routes={"example.test": 9}, extra=extra)
        relayd.config.write_text(relayd.config.read_text().replace('mode = "routes"', 'mode = "mx"'))
        out = subprocess.run(
            [*RELAYD, "check-config", "--config", str(relayd.config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        return [line for line in out.stderr.splitlines() if "DANE is off" in line]

    [line] = dane_lines("")
    assert "delivery.nameservers: warning:" in line
    assert dane_lines('nameservers = ["127.0.0.1:53"]') == []


#: records RFC 7672 §3.1.3 says SMTP must not use: PKIX-TA(0) and PKIX-EE(1)
_UNUSABLE = (
    f"0 0 1 {hashlib.sha256(b'a public CA').hexdigest()}",
    f"1 1 1 {hashlib.sha256(b'a key').hexdigest()}",
)


def test_unusable_tlsa_without_starttls_is_deferred_and_nothing_is_sent(plaintext_world: World) -> None:
    world = plaintext_world  # [delivery] tls is "may": without the TLSA RRset this would go in plaintext
    world.zone.set(f"_25._tcp.{MX}", "TLSA", *_UNUSABLE, ad=True)
    with world.relayd() as relayd:
        qid = _submit(relayd, f"ann@{DOMAIN}")
        reply = _deferred_reply(relayd, qid, f"ann@{DOMAIN}")
        assert "4.7.5" in reply and "TLS level encrypt not met: STARTTLS not offered" in reply, reply
    assert world.sink.mail_from == []


def test_unusable_tlsa_is_delivered_over_tls_with_any_certificate(wrong_name_world: World) -> None:
    world = wrong_name_world  # a certificate for another name, from a CA relayd does not trust
    world.zone.set(f"_25._tcp.{MX}", "TLSA", *_UNUSABLE, ad=True)
    with world.relayd() as relayd:
        _submit(relayd, f"ann@{DOMAIN}")
        assert wait_until(lambda: len(world.sink.delivered) == 1), relayd.log_text()[-2000:]
    assert world.sink.delivered == [(f"ann@{DOMAIN}", True)]
    assert world.sink.mail_from == [True]


def test_tlsa_of_an_mx_host_with_an_unvalidated_address_is_ignored(world: World) -> None:
    world.zone.set(MX, "A", "127.0.0.1", ad=False)  # a forged address could lead anywhere (§2.2.1)
    world.tlsa(f"3 1 1 {hashlib.sha256(b'another key').hexdigest()}")
    with world.relayd() as relayd:
        _submit(relayd, f"ann@{DOMAIN}")
        assert wait_until(lambda: len(world.sink.delivered) == 1), relayd.log_text()[-2000:]
    assert world.sink.delivered == [(f"ann@{DOMAIN}", True)]  # opportunistic TLS, as without DANE
    assert not world.zone.asked(f"_25._tcp.{MX}", "TLSA")
