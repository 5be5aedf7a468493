"""TLS reports (RFC 8460 §5.4) POSTed to an ``https:`` rua: an HTTPS receiver on loopback whose name the
test's DNS server resolves, with a certificate of a private CA that ``[delivery] tls_ca_file`` trusts.
The daily job runs in the test process on a store holding one day's counts."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trustme

from relayd.app.reload import load_signer
from relayd.config import load
from relayd.core import metrics
from relayd.queue.routing import make_resolver
from relayd.queue.shards import shard_path
from relayd.queue.store import QueueStore
from relayd.queue.transport.tlsrpt import ReportSender
from relayd.store import open_store
from relayd.store.models import TlsSessionCount
from tests.dnszone import Zone
from tests.harness import Relayd

DOMAIN = "recipient.test"
RECEIVER = "reports.test"
CA = trustme.CA()
OTHER_CA = trustme.CA()
POLICY = json.dumps({"mx-host": [f"*.{DOMAIN}"], "policy-string": ["version: STSv1", "mode: enforce"]})


@dataclass
class Post:
    path: str
    content_type: str
    body: bytes


@dataclass
class Receiver:
    """HTTPS on 127.0.0.1: records each POST and answers ``status`` (a 302 points at another path)."""

    context: ssl.SSLContext
    status: int = 200
    posts: list[Post] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0

    def serve(self) -> ThreadingHTTPServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with owner.lock:
                    owner.posts.append(Post(self.path, self.headers.get("Content-Type", ""), body))
                self.send_response(owner.status)
                if owner.status == 302:
                    self.send_header("Location", f"https://{RECEIVER}:{owner.port}/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return None

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        httpd.socket = self.context.wrap_socket(httpd.socket, server_side=True)
        self.port = int(httpd.server_address[1])
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        return httpd


def _context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(RECEIVER).configure_cert(ctx)
    return ctx


@pytest.fixture
def zone() -> Iterator[Zone]:
    with Zone() as z:
        z.set(RECEIVER, "A", "127.0.0.1")
        yield z


@contextlib.contextmanager
def _receiving(zone: Zone, receiver: Receiver) -> Iterator[Receiver]:
    httpd = receiver.serve()
    zone.set(f"_smtp._tls.{DOMAIN}", "TXT", f'"v=TLSRPTv1; rua=https://{RECEIVER}:{receiver.port}/tlsrpt"')
    try:
        yield receiver
    finally:
        httpd.shutdown()
        httpd.server_close()


def _config(tmp: Path, zone: Zone) -> Path:
    CA.cert_pem.write_to_path(str(tmp / "ca.pem"))
    relayd = Relayd(
        tmp,
        routes={"example.test": 9},
        extra=f'nameservers = ["127.0.0.1:{zone.port}"]\ntls_ca_file = "{tmp}/ca.pem"',
    )
    return relayd.config


async def _send(config: Path, day: date) -> tuple[int, int]:
    """One day's counts in the store, then the report job twice with the next day's clock: (reports sent
    by the first run, by the second)."""
    cfg = load(config)
    store = await open_store(cfg.store.backend, cfg.store.path, cfg.store.dsn)
    queue = QueueStore(shard_path(cfg.queue.path, 0))
    await queue.open()
    try:
        await store.add_tls_sessions(
            [
                TlsSessionCount(day, DOMAIN, "sts", POLICY, "", "", "", 5),
                TlsSessionCount(
                    day, DOMAIN, "sts", POLICY, "certificate-expired", f"mx1.{DOMAIN}", "192.0.2.1", 2
                ),
            ]
        )
        sender = ReportSender(lambda: cfg, store, queue, load_signer(cfg), make_resolver(cfg.delivery))
        now = datetime(day.year, day.month, day.day, 12, tzinfo=UTC) + timedelta(days=1)
        return await sender.send_due(now), await sender.send_due(now)  # the day is claimed once
    finally:
        await queue.close()
        await store.close()


def _counted(result: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "relayd_tlsrpt_reports_total", {"method": "https", "result": result}
    )
    return value or 0.0


def test_report_is_posted_gzipped_to_the_https_rua(tmp_path: Path, zone: Zone) -> None:
    day = datetime.now(UTC).date() - timedelta(days=1)
    before = _counted("sent")
    with _receiving(zone, Receiver(_context(CA))) as receiver:
        assert asyncio.run(_send(_config(tmp_path, zone), day)) == (1, 0)
        [post] = receiver.posts
    assert post.path == "/tlsrpt"
    assert post.content_type == "application/tlsrpt+gzip"
    report = json.loads(gzip.decompress(post.body))
    [entry] = report["policies"]
    assert entry["policy"]["policy-domain"] == DOMAIN
    assert entry["summary"] == {"total-successful-session-count": 5, "total-failure-session-count": 2}
    assert report["date-range"]["start-datetime"] == f"{day.isoformat()}T00:00:00Z"
    assert _counted("sent") == before + 1


@pytest.mark.parametrize(
    ("status", "ca", "requests"),
    [(500, CA, 1), (302, CA, 1), (200, OTHER_CA, 0)],
    ids=["server-error", "redirect-not-followed", "untrusted-certificate"],
)
def test_failed_post_is_counted_and_not_followed(
    tmp_path: Path, zone: Zone, status: int, ca: trustme.CA, requests: int
) -> None:
    day = datetime.now(UTC).date() - timedelta(days=1)
    before = _counted("failed")
    with _receiving(zone, Receiver(_context(ca), status=status)) as receiver:
        assert asyncio.run(_send(_config(tmp_path, zone), day)) == (0, 0)
        assert [p.path for p in receiver.posts] == ["/tlsrpt"] * requests  # nothing at /elsewhere
    assert _counted("failed") == before + 1
