"""SMTP TLS reporting (RFC 8460), end to end on loopback.

A day of MX deliveries under an MTA-STS ``enforce`` policy: the preferred MX host presents a certificate
for another name (every session to it fails), the second one a right one (every session succeeds). The
daily job then reports that day (run here with tomorrow's clock, on relayd's own store and queue), and
relayd delivers the report to the ``mailto:`` rua of ``_smtp._tls.<domain>`` at a sink, where it is read
as RFC 8460 JSON. Then the pieces on their own: the rua record parser and the report's shape."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from email import message_from_bytes
from email.message import Message
from email.policy import default
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as AioSMTP
from aiosmtpd.smtp import Envelope, Session

from relayd.app.reload import load_signer
from relayd.config import load
from relayd.queue.routing import make_resolver
from relayd.queue.shards import shard_path
from relayd.queue.store import QueueStore
from relayd.queue.transport.tlsrpt import ReportSender, parse_rua, report_json
from relayd.store import open_store
from relayd.store.models import TlsSessionCount
from tests.dnszone import PolicyServer, Zone
from tests.harness import Relayd, Sink, message, wait_until

DOMAIN = "recipient.test"
CA = trustme.CA()


@dataclass
class Recorder:
    delivered: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: AioSMTP, session: Session, envelope: Envelope) -> str:
        with self.lock:
            self.delivered.append(envelope.rcpt_tos[0])
        return "250 2.0.0 OK"


def _port_free_on(*hosts: str) -> int:
    """A port free on every one of ``hosts`` (the MX hosts share ``[delivery] port``)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = int(s.getsockname()[1])
        with contextlib.ExitStack() as stack:
            try:
                for host in hosts[1:]:
                    t = stack.enter_context(socket.socket())
                    t.bind((host, port))
            except OSError:
                continue
        return port
    raise RuntimeError("no common free port")


def _tls_sink(host: str, port: int, name: str) -> tuple[Controller, Recorder]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    CA.issue_cert(name).configure_cert(ctx)
    recorder = Recorder()
    return Controller(recorder, hostname=host, port=port, tls_context=ctx, require_starttls=False), recorder


@pytest.fixture
def reports() -> Iterator[Sink]:
    with Sink() as s:
        yield s


def _report_part(data: bytes) -> tuple[Message, dict[str, Any]]:
    msg = message_from_bytes(data, policy=default)
    parts = [p for p in msg.walk() if p.get_content_type() == "application/tlsrpt+gzip"]
    assert len(parts) == 1, msg
    payload = parts[0].get_payload(decode=True)
    assert isinstance(payload, bytes)
    return msg, json.loads(gzip.decompress(payload))


def test_a_days_successes_and_failures_are_reported_to_the_mailto_rua(tmp_path: Path, reports: Sink) -> None:
    CA.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    port = _port_free_on("127.0.0.1", "127.0.0.2")
    wrong, wrong_seen = _tls_sink("127.0.0.2", port, "someone-else.test")
    right, right_seen = _tls_sink("127.0.0.1", port, f"mx2.{DOMAIN}")
    https = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    CA.issue_cert(f"mta-sts.{DOMAIN}").configure_cert(https)
    with Zone() as zone, PolicyServer(https) as policy:
        zone.set(DOMAIN, "MX", f"10 mx1.{DOMAIN}.", f"20 mx2.{DOMAIN}.")
        zone.set(f"mx1.{DOMAIN}", "A", "127.0.0.2")
        zone.set(f"mx2.{DOMAIN}", "A", "127.0.0.1")
        zone.set(f"mta-sts.{DOMAIN}", "A", policy.address)
        zone.set(f"_mta-sts.{DOMAIN}", "TXT", '"v=STSv1; id=1;"')
        zone.set(f"_smtp._tls.{DOMAIN}", "TXT", '"v=TLSRPTv1; rua=mailto:tls-reports@reports.test"')
        policy.serve(f"version: STSv1\nmode: enforce\nmx: *.{DOMAIN}\nmax_age: 86400\n")
        relayd = Relayd(
            tmp_path,
            routes={"reports.test": reports.port},
            extra=(
                f'port = {port}\nnameservers = ["127.0.0.1:{zone.port}"]\ntls_ca_file = "{tmp_path}/ca.pem"\n'
                "messages_per_connection = 1"  # one session per message: the counts are exact
            ),
        )
        relayd.config.write_text(relayd.config.read_text().replace('mode = "routes"', 'mode = "mx"'))
        wrong.start()
        right.start()
        try:
            with relayd:
                for who in ("ann", "bob", "cyd"):
                    assert relayd.submit(message("to report"), to=[f"{who}@{DOMAIN}"])[0] == 250
                assert wait_until(lambda: len(right_seen.delivered) == 3), relayd.log_text()[-2000:]
                assert relayd.stop() == 0  # a clean stop adds the last counts to the store
        finally:
            wrong.stop()
            right.stop()
        assert wrong_seen.delivered == []
        today = datetime.now(UTC).date()
        # the daily job, with tomorrow's clock, on relayd's store and queue
        assert asyncio.run(_send_reports(relayd.config, datetime.now(UTC) + timedelta(days=1))) == (1, 0)
    with relayd:
        assert wait_until(lambda: reports.handler.count() == 1), relayd.log_text()[-2000:]
    [received] = reports.messages
    assert received.rcpt_tos == ["tls-reports@reports.test"]
    msg, report = _report_part(received.data)
    assert msg["TLS-Report-Domain"] == DOMAIN
    assert msg["TLS-Report-Submitter"] == "relayd.test"
    assert str(msg["Subject"]).startswith(f"Report Domain: {DOMAIN} Submitter: relayd.test Report-ID: <")
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "tlsrpt"
    assert report["organization-name"] == "relayd.test"
    assert report["date-range"] == {
        "start-datetime": f"{today.isoformat()}T00:00:00Z",
        "end-datetime": f"{today.isoformat()}T23:59:59Z",
    }
    assert (
        isinstance(report["report-id"], str) and report["contact-info"] == "postmaster@bounces.example.test"
    )
    assert len(report["policies"]) == 1
    entry = report["policies"][0]
    assert entry["policy"] == {
        "policy-type": "sts",
        "policy-string": ["version: STSv1", "mode: enforce", f"mx: *.{DOMAIN}", "max_age: 86400"],
        "policy-domain": DOMAIN,
        "mx-host": [f"*.{DOMAIN}"],
    }
    assert entry["summary"] == {"total-successful-session-count": 3, "total-failure-session-count": 3}
    assert entry["failure-details"] == [
        {
            "result-type": "certificate-host-mismatch",
            "receiving-mx-hostname": f"mx1.{DOMAIN}",
            "receiving-ip": "127.0.0.2",
            "failed-session-count": 3,
        }
    ]


async def _send_reports(config: Path, now: datetime) -> tuple[int, int]:
    """Run the report job twice at ``now``: (reports queued, reports queued by the second run)."""
    cfg = load(config)
    store = await open_store(cfg.store.backend, cfg.store.path, cfg.store.dsn)
    queue = QueueStore(shard_path(cfg.queue.path, 0))
    await queue.open()
    try:
        sender = ReportSender(lambda: cfg, store, queue, load_signer(cfg), make_resolver(cfg.delivery))
        return await sender.send_due(now), await sender.send_due(now)  # the day is claimed once
    finally:
        await queue.close()
        await store.close()


@pytest.mark.parametrize(
    ("records", "ruas"),
    [
        (["v=TLSRPTv1; rua=mailto:a@example.com"], ["mailto:a@example.com"]),
        (
            ["v=TLSRPTv1;rua=mailto:a@example.com,https://r.example.com/tlsrpt"],
            ["mailto:a@example.com", "https://r.example.com/tlsrpt"],
        ),
        (["v=spf1 -all", "v=TLSRPTv1; rua=mailto:a@example.com"], ["mailto:a@example.com"]),
        (["v=TLSRPTv1; rua=mailto:a@example.com", "v=TLSRPTv1; rua=mailto:b@example.com"], []),
        (["v=TLSRPTv2; rua=mailto:a@example.com"], []),
        (["v=TLSRPTv1;"], []),
    ],
)
def test_rua_record(records: list[str], ruas: list[str]) -> None:
    assert parse_rua(records) == ruas


def test_report_sums_sessions_per_policy() -> None:
    day = date(2026, 12, 6)
    sts = '{"mx-host": ["mx.example.com"], "policy-string": ["version: STSv1", "mode: testing"]}'
    tlsa = '{"mx-host": ["mx.example.com"], "policy-string": ["3 1 1 ab"]}'
    counts = [
        TlsSessionCount(day, "example.com", "sts", sts, "", "", "", 7),
        TlsSessionCount(
            day, "example.com", "sts", sts, "certificate-expired", "mx.example.com", "192.0.2.1", 2
        ),
        TlsSessionCount(
            day, "example.com", "sts", sts, "starttls-not-supported", "mx.example.com", "192.0.2.2", 1
        ),
        TlsSessionCount(day, "example.com", "tlsa", tlsa, "", "", "", 4),
    ]
    report = report_json(counts, "example.com", day, "relay.example", "postmaster@relay.example")
    policies: Any = report["policies"]
    by_type = {p["policy"]["policy-type"]: p for p in policies}
    assert by_type["sts"]["summary"] == {
        "total-successful-session-count": 7,
        "total-failure-session-count": 3,
    }
    assert [d["result-type"] for d in by_type["sts"]["failure-details"]] == [
        "certificate-expired",
        "starttls-not-supported",
    ]
    assert by_type["tlsa"]["summary"] == {
        "total-successful-session-count": 4,
        "total-failure-session-count": 0,
    }
    assert by_type["tlsa"]["failure-details"] == []
