"""``relayd check-config --dns`` on the inbound domains' MTA-STS and TLS-RPT records (RFC 8461, RFC 8460),
against the DNS server and the HTTPS policy server of tests/dnszone.py (certificates of a private CA that
``[delivery] tls_ca_file`` trusts).

``good.test`` publishes both, right; ``bare.test`` neither; ``bad.test`` a policy id whose policy cannot be
fetched and a rua record senders cannot use; ``skew.test`` an ``enforce`` policy that leaves out its MX.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from typing import Any

import pytest
import trustme

from relayd.cli.doctor import Check, format_table, run_checks
from relayd.config import Config
from tests.dnszone import PolicyServer, Zone

CA = trustme.CA()
INBOUND = ["good.test", "bare.test", "bad.test", "skew.test"]


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[Zone, PolicyServer]]:
    https = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    CA.issue_cert("mta-sts.good.test", "mta-sts.skew.test").configure_cert(https)
    with Zone() as zone, PolicyServer(https) as policy:
        policy.serve("version: STSv1\nmode: enforce\nmx: mx.good.test\nmax_age: 604800\n")
        for domain in INBOUND:
            zone.set(domain, "MX", f"10 mx.{domain}.")
            zone.set(f"mx.{domain}", "A", "127.0.0.1")
        for domain in ("good.test", "skew.test"):
            zone.set(f"_mta-sts.{domain}", "TXT", '"v=STSv1; id=20261207;"')
            zone.set(f"mta-sts.{domain}", "A", policy.address)
        zone.set(
            "_smtp._tls.good.test", "TXT", '"v=TLSRPTv1; rua=mailto:tls@good.test,https://r.good.test/tlsrpt"'
        )
        zone.set("_mta-sts.bad.test", "TXT", '"v=STSv1; id=1;"')  # and no mta-sts.bad.test host
        zone.set("_smtp._tls.bad.test", "TXT", '"v=TLSRPTv1; rua=ftp://r.bad.test/,mailto:nobody"')
        yield zone, policy


@pytest.fixture(scope="module")
def checks(world: tuple[Zone, PolicyServer], tmp_path_factory: pytest.TempPathFactory) -> list[Check]:
    zone, _ = world
    ca = tmp_path_factory.mktemp("ca") / "ca.pem"
    CA.cert_pem.write_to_path(str(ca))
    data: dict[str, Any] = {
        "server": {"hostname": "mx.good.test"},
        "inbound": {"domains": INBOUND},
        "delivery": {"nameservers": [f"127.0.0.1:{zone.port}"], "tls_ca_file": str(ca)},
        "accounts": {"acme": {"networks": ["127.0.0.1/32"], "domains": ["good.test"]}},
    }
    return asyncio.run(run_checks(Config.model_validate(data), outbound_ips=["127.0.0.1"]))


def _one(checks: list[Check], domain: str, what: str) -> Check:
    (check,) = [c for c in checks if c.domain == domain and c.what == what]
    return check


def test_published_records_pass(checks: list[Check], world: tuple[Zone, PolicyServer]) -> None:
    sts = _one(checks, "good.test", "MTA-STS")
    assert sts.ok and not sts.warning, sts
    assert sts.detail == "id=20261207 mode=enforce mx=mx.good.test"
    assert world[1].count() >= 1  # the policy was fetched, as a sender fetches it
    rpt = _one(checks, "good.test", "TLS-RPT")
    assert rpt.ok and not rpt.warning, rpt
    assert rpt.detail == "rua=mailto:tls@good.test,https://r.good.test/tlsrpt"


def test_missing_records_are_warnings(checks: list[Check]) -> None:
    for what in ("MTA-STS", "TLS-RPT"):
        check = _one(checks, "bare.test", what)
        assert check.ok and check.warning and check.detail.startswith("none:"), check


def test_unfetchable_policy_and_unusable_rua_are_warnings(checks: list[Check]) -> None:
    sts = _one(checks, "bad.test", "MTA-STS")
    assert sts.ok and sts.warning and sts.detail.startswith("id=1, but no policy senders can use:"), sts
    rpt = _one(checks, "bad.test", "TLS-RPT")
    assert rpt.ok and rpt.warning, rpt
    assert "ftp://r.bad.test/: neither mailto: nor https:" in rpt.detail
    assert "mailto:nobody: not a mail address" in rpt.detail


def test_enforce_policy_leaving_out_an_mx_fails(checks: list[Check]) -> None:
    sts = _one(checks, "skew.test", "MTA-STS")
    assert not sts.ok, sts
    assert sts.detail == "id=20261207 mode=enforce mx=mx.good.test does not cover MX mx.skew.test"


def test_table_shows_warnings_as_warn(checks: list[Check]) -> None:
    lines = format_table(checks).splitlines()
    assert any(line.split()[:3] == ["bare.test", "MTA-STS", "WARN"] for line in lines), lines
    assert any(line.split()[:3] == ["good.test", "TLS-RPT", "ok"] for line in lines), lines
    assert any(line.split()[:3] == ["skew.test", "MTA-STS", "FAIL"] for line in lines), lines


def test_without_a_resolver_no_transport_rows() -> None:
    cfg = Config.model_validate({"inbound": {"domains": ["good.test"]}})
    checks = asyncio.run(run_checks(cfg, resolver_nameservers=["::1:53"], outbound_ips=["127.0.0.1"]))
    assert [c.what for c in checks] == ["MX"] and not checks[0].ok
