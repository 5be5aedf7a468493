"""MTA-STS (RFC 8461) on MX delivery, end to end on loopback: a DNS server answering MX, A and the
``_mta-sts`` TXT record, an HTTPS policy server for ``mta-sts.<domain>`` found through that DNS server, and
TLS sinks with certificates of a private CA that relayd trusts through ``[delivery] tls_ca_file``.

Then the parser's rules on their own (version, mode, max_age cap, the leading-wildcard MX rule)."""

from __future__ import annotations

import contextlib
import json
import ssl
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from aiosmtpd.controller import Controller
from hypothesis import given
from hypothesis import strategies as st

from relayd.queue.transport.mtasts import (
    MAX_AGE_CAP,
    Mode,
    PolicyError,
    mx_matches,
    parse_policy,
    parse_txt,
)
from tests.dnszone import PolicyServer, Zone
from tests.harness import Relayd, TlsRecorder, free_port, message, wait_until

DOMAIN = "recipient.test"
MX = "mx1.recipient.test"
CA = trustme.CA()


@dataclass
class World:
    """Everything one test talks to: the zone, the policy server, the MX sink and relayd."""

    zone: Zone
    policy: PolicyServer
    sink: TlsRecorder
    sink_port: int
    tmp: Path

    def relayd(self, extra: str = "") -> Relayd:
        relayd = Relayd(
            self.tmp,
            routes={"routed.test": self.sink_port},
            retry_schedule='["1h"]',
            extra=(
                f'port = {self.sink_port}\nnameservers = ["127.0.0.1:{self.zone.port}"]\n'
                f'tls_ca_file = "{self.tmp}/ca.pem"\n{extra}'
            ),
        )
        relayd.config.write_text(relayd.config.read_text().replace('mode = "routes"', 'mode = "mx"'))
        return relayd

    def publish(self, policy_id: str, mode: str, *mx: str, max_age: int = 86400) -> None:
        self.zone.set(f"_mta-sts.{DOMAIN}", "TXT", f'"v=STSv1; id={policy_id};"')
        lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), f"max_age: {max_age}"]
        self.policy.serve("\n".join(lines) + "\n")


def _world(tmp: Path, sink_name: str) -> Iterator[World]:
    CA.cert_pem.write_to_path(str(tmp / "ca.pem"))
    sink_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    CA.issue_cert(sink_name).configure_cert(sink_ctx)
    https_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    CA.issue_cert(f"mta-sts.{DOMAIN}").configure_cert(https_ctx)
    recorder = TlsRecorder()
    port = free_port()
    controller = Controller(
        recorder, hostname="127.0.0.1", port=port, tls_context=sink_ctx, require_starttls=False
    )
    with Zone() as zone, PolicyServer(https_ctx) as policy:
        zone.set(DOMAIN, "MX", f"10 {MX}.")
        zone.set(MX, "A", "127.0.0.1")
        zone.set(f"mta-sts.{DOMAIN}", "A", policy.address)
        controller.start()
        try:
            yield World(zone, policy, recorder, port, tmp)
        finally:
            controller.stop()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    """The MX sink has a certificate for the MX host name."""
    yield from _world(tmp_path, MX)


@pytest.fixture
def wrong_cert_world(tmp_path: Path) -> Iterator[World]:
    """The MX sink's certificate names another host."""
    yield from _world(tmp_path, "other.example.test")


def _submit(relayd: Relayd, rcpt: str) -> str:
    code, resp = relayd.submit(message("mta-sts"), to=[rcpt])
    assert code == 250, resp
    return resp.decode().rsplit(" ", 1)[1]


def _show(relayd: Relayd, queue_id: str, rcpt: str) -> dict[str, object]:
    out = relayd.cli("queue", "show", "--json", queue_id)
    assert out.returncode == 0, out.stderr
    return next(r for r in json.loads(out.stdout)["recipients"] if r["address"] == rcpt)


def _deferred_reply(relayd: Relayd, queue_id: str, rcpt: str) -> str:
    assert wait_until(lambda: int(str(_show(relayd, queue_id, rcpt)["attempts"])) >= 1), relayd.log_text()[
        -2000:
    ]
    row = _show(relayd, queue_id, rcpt)
    assert row["state"] not in ("delivered", "failed")
    return str(row["last_reply"])


def _metrics(relayd: Relayd) -> str:
    url = f"http://127.0.0.1:{relayd.http_port}/metrics"
    return str(urllib.request.urlopen(url, timeout=10).read().decode())


# --- end to end ------------------------------------------------------------------------------------------


def test_enforce_with_a_listed_mx_and_a_matching_certificate_is_delivered(world: World) -> None:
    world.publish("20260101", "enforce", MX)
    with world.relayd() as relayd:
        _submit(relayd, f"ann@{DOMAIN}")
        assert wait_until(lambda: len(world.sink.delivered) == 1), relayd.log_text()[-2000:]
        assert 'relayd_mta_sts_total{mode="enforce",result="ok"}' in _metrics(relayd)
    assert world.sink.delivered == [(f"ann@{DOMAIN}", True)]
    assert world.policy.count() == 1


def test_enforce_with_a_policy_not_listing_the_mx_is_deferred(world: World) -> None:
    world.publish("20260101", "enforce", "mx.elsewhere.test", "*.other.test")
    with world.relayd() as relayd:
        qid = _submit(relayd, f"ann@{DOMAIN}")
        reply = _deferred_reply(relayd, qid, f"ann@{DOMAIN}")
        assert "4.7.5" in reply and "MTA-STS" in reply
    assert world.sink.mail_from == []


def test_enforce_with_a_certificate_for_another_name_is_deferred(wrong_cert_world: World) -> None:
    world = wrong_cert_world
    world.publish("20260101", "enforce", "*.recipient.test")  # the wildcard covers mx1.recipient.test
    with world.relayd() as relayd:
        qid = _submit(relayd, f"ann@{DOMAIN}")
        reply = _deferred_reply(relayd, qid, f"ann@{DOMAIN}")
        assert "4.7.5" in reply and "certificate verify failed" in reply
        assert 'relayd_mta_sts_total{mode="enforce",result="tls_failed"}' in _metrics(relayd)
    assert world.sink.mail_from == []  # nothing was sent in plaintext, nor over the failed TLS


def test_testing_mode_delivers_and_counts_the_failure(wrong_cert_world: World) -> None:
    world = wrong_cert_world
    world.publish("20260101", "testing", MX)
    with world.relayd() as relayd:
        _submit(relayd, f"ann@{DOMAIN}")
        assert wait_until(lambda: len(world.sink.delivered) == 1), relayd.log_text()[-2000:]
        assert 'relayd_mta_sts_total{mode="testing",result="tls_failed"} 1.0' in _metrics(relayd)
    assert world.sink.delivered == [(f"ann@{DOMAIN}", True)]  # opportunistic TLS, as configured


def test_a_changed_policy_id_is_fetched_again(world: World) -> None:
    world.publish("1", "enforce", MX)
    with world.relayd() as relayd:
        _submit(relayd, f"ann@{DOMAIN}")
        assert wait_until(lambda: len(world.sink.delivered) == 1)
        _submit(relayd, f"bob@{DOMAIN}")
        assert wait_until(lambda: len(world.sink.delivered) == 2)
        assert world.policy.count() == 1  # same id: the cached policy
        world.publish("2", "enforce", "mx.elsewhere.test")  # new id, and the MX is no longer listed
        qid = _submit(relayd, f"cyd@{DOMAIN}")
        assert "4.7.5" in _deferred_reply(relayd, qid, f"cyd@{DOMAIN}")
        assert world.policy.count() == 2
    assert [rcpt for rcpt, _ in world.sink.delivered] == [f"ann@{DOMAIN}", f"bob@{DOMAIN}"]


def test_the_cached_policy_survives_a_restart_and_a_stripped_txt_record(world: World) -> None:
    world.publish("1", "enforce", "mx.elsewhere.test")
    with world.relayd() as relayd:
        qid = _submit(relayd, f"ann@{DOMAIN}")
        assert "4.7.5" in _deferred_reply(relayd, qid, f"ann@{DOMAIN}")
    # an attacker strips the TXT record and blocks the policy host: the stored policy still holds
    world.zone.set(f"_mta-sts.{DOMAIN}", "TXT")
    world.policy.status = 404
    with world.relayd() as relayd:
        qid = _submit(relayd, f"bob@{DOMAIN}")
        assert "4.7.5" in _deferred_reply(relayd, qid, f"bob@{DOMAIN}")
    assert world.sink.mail_from == []
    assert world.policy.count() == 1


def test_a_redirect_is_not_followed_and_counts_as_no_policy(world: World) -> None:
    world.publish("1", "enforce", "mx.elsewhere.test")
    world.policy.status = 302
    with world.relayd() as relayd:
        _submit(relayd, f"ann@{DOMAIN}")
        assert wait_until(lambda: len(world.sink.delivered) == 1), relayd.log_text()[-2000:]
        assert 'relayd_mta_sts_fetches_total{result="failed"}' in _metrics(relayd)
    assert world.policy.count() == 1


def test_routes_never_look_up_a_policy(world: World) -> None:
    # routed.test has an enforce policy that lists no host, but its mail takes a configured route
    world.zone.set("_mta-sts.routed.test", "TXT", '"v=STSv1; id=1;"')
    world.publish("1", "enforce", "mx.elsewhere.test")
    with world.relayd() as relayd:
        _submit(relayd, "ann@routed.test")
        assert wait_until(lambda: len(world.sink.delivered) == 1), relayd.log_text()[-2000:]
    assert not world.zone.asked("_mta-sts.routed.test", "TXT")
    assert world.policy.count() == 0


def test_mta_sts_off_ignores_the_policy(world: World) -> None:
    world.publish("1", "enforce", "mx.elsewhere.test")
    with world.relayd("mta_sts = false") as relayd:
        _submit(relayd, f"ann@{DOMAIN}")
        assert wait_until(lambda: len(world.sink.delivered) == 1), relayd.log_text()[-2000:]
    assert not world.zone.asked(f"_mta-sts.{DOMAIN}", "TXT")


# --- the parser -------------------------------------------------------------------------------------------


def test_policy_is_parsed_with_crlf_and_unknown_keys() -> None:
    text = (
        "version: STSv1\r\nmode: enforce\r\nmx: mx1.Example.com\r\nmx: *.example.net\r\nfoo: bar\r\n"
        "max_age: 86400\r\n"
    )
    policy = parse_policy(text)
    assert policy.mode is Mode.ENFORCE
    assert policy.mx == ("mx1.example.com", "*.example.net")
    assert policy.max_age == 86400


def test_max_age_is_capped_at_one_year() -> None:
    policy = parse_policy("version: STSv1\nmode: testing\nmx: mx.example.com\nmax_age: 9999999999\n")
    assert policy.max_age == MAX_AGE_CAP == 31557600


@pytest.mark.parametrize(
    "text",
    [
        "mode: enforce\nmx: mx.example.com\nmax_age: 1\n",  # no version
        "version: STSv2\nmode: enforce\nmx: mx.example.com\nmax_age: 1\n",
        "version: STSv1\nmode: strict\nmx: mx.example.com\nmax_age: 1\n",
        "version: STSv1\nmode: enforce\nmax_age: 1\n",  # enforce without mx
        "version: STSv1\nmode: enforce\nmx: mx.example.com\nmax_age: -1\n",
        "version: STSv1\nmode: enforce\nmx: mx.example.com\nmax_age: 1e5\n",
        "version: STSv1\nmode: enforce\nmx: mx.example.com\n",  # no max_age
        "version: STSv1\nmode: enforce\nmx: *.*.example.com\nmax_age: 1\n",
        "version: STSv1\nmode: enforce\nmx: mx..example.com\nmax_age: 1\n",
        "version: STSv1\nmode enforce\nmx: mx.example.com\nmax_age: 1\n",  # no colon
    ],
    ids=[
        "no-version",
        "version-2",
        "bad-mode",
        "no-mx",
        "negative-age",
        "float-age",
        "no-age",
        "double-wildcard",
        "empty-label",
        "no-colon",
    ],
)
def test_bad_policies_are_refused(text: str) -> None:
    with pytest.raises(PolicyError):
        parse_policy(text)


def test_mode_none_needs_no_mx() -> None:
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 0\n").mode is Mode.NONE


@given(st.text(max_size=300))
def test_policy_parser_raises_only_policy_error(text: str) -> None:
    with contextlib.suppress(PolicyError):
        parse_policy(text)


@pytest.mark.parametrize(
    ("pattern", "host", "matches"),
    [
        ("mx.example.com", "mx.example.com", True),
        ("mx.example.com", "MX.Example.com.", True),
        ("mx.example.com", "mx2.example.com", False),
        ("*.example.com", "mx.example.com", True),
        ("*.example.com", "example.com", False),  # the wildcard is one whole label, never empty
        ("*.example.com", "a.b.example.com", False),  # and only the leftmost one
        ("*.example.com", "mxexample.com", False),
    ],
)
def test_mx_patterns_follow_the_leading_wildcard_rule(pattern: str, host: str, matches: bool) -> None:
    assert mx_matches(pattern, host) is matches


@pytest.mark.parametrize(
    ("records", "policy_id"),
    [
        (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
        (["v=STSv1;id=abc"], "abc"),
        (["v=spf1 -all", "v=STSv1; id=abc;"], "abc"),  # other TXT records are ignored
        (["v=STSv1; id=abc;", "v=STSv1; id=def;"], None),  # two records: no policy (§3.1)
        (["v=STSv1; id=has-dash;"], None),
        (["v=STSv1; id=" + "a" * 33 + ";"], None),
        (["v=STSv1;"], None),
        (["id=abc; v=STSv1;"], None),
    ],
)
def test_txt_record_id(records: list[str], policy_id: str | None) -> None:
    assert parse_txt(records) == policy_id
