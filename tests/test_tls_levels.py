"""TLS levels of delivery (``[delivery] tls``, ``[tls_policy]``): a destination that can't meet its level
is deferred with 4.7.5 and sees no MAIL FROM; one that can gets its mail.

The receiving sinks are aiosmtpd servers with certificates from a private CA (trustme) that relayd trusts
through ``[delivery] tls_ca_file``; routes point at 127.0.0.1, so a certificate for 127.0.0.1 is the right
one and a certificate for mx.example.test the wrong one."""

from __future__ import annotations

import json
import ssl
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as AioSMTP
from aiosmtpd.smtp import Envelope, Session

from relayd.config import load
from relayd.core.errors import ConfigError
from tests.harness import Relayd, free_port, message, wait_until


@dataclass
class Recorder:
    """What a sink saw: every MAIL FROM (and whether the session was encrypted then), every message."""

    mail_from: list[tuple[str, bool]] = field(default_factory=list)
    delivered: list[tuple[str, bool]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_MAIL(
        self, server: AioSMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        with self.lock:
            self.mail_from.append((address, session.ssl is not None))
        envelope.mail_from = address
        return "250 2.1.0 OK"

    async def handle_DATA(self, server: AioSMTP, session: Session, envelope: Envelope) -> str:
        with self.lock:
            self.delivered.append((envelope.rcpt_tos[0], session.ssl is not None))
        return "250 2.0.0 OK"


@dataclass
class TlsSink:
    port: int
    recorder: Recorder


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(tmp_path: Path, ca: trustme.CA) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def _sink(cert_ca: trustme.CA | None, name: str) -> Iterator[TlsSink]:
    """A sink offering STARTTLS with a certificate for ``name`` issued by ``cert_ca`` (None: no STARTTLS)."""
    ctx = None
    if cert_ca is not None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert_ca.issue_cert(name).configure_cert(ctx)
    recorder = Recorder()
    port = free_port()
    controller = Controller(
        recorder, hostname="127.0.0.1", port=port, tls_context=ctx, require_starttls=False
    )
    controller.start()
    try:
        yield TlsSink(port, recorder)
    finally:
        controller.stop()


@pytest.fixture
def right_sink(ca: trustme.CA) -> Iterator[TlsSink]:
    yield from _sink(ca, "127.0.0.1")


@pytest.fixture
def wrong_name_sink(ca: trustme.CA) -> Iterator[TlsSink]:
    yield from _sink(ca, "mx.example.test")


@pytest.fixture
def plain_sink() -> Iterator[TlsSink]:
    yield from _sink(None, "")


def _show(relayd: Relayd, queue_id: str) -> dict[str, dict[str, object]]:
    out = relayd.cli("queue", "show", "--json", queue_id)
    assert out.returncode == 0, out.stderr
    return {r["address"]: r for r in json.loads(out.stdout)["recipients"]}


def _submit(relayd: Relayd, rcpt: str) -> str:
    code, resp = relayd.submit(message("tls level"), to=[rcpt])
    assert code == 250, resp
    return resp.decode().rsplit(" ", 1)[1]


def _wait_deferred(relayd: Relayd, queue_id: str, rcpt: str) -> dict[str, object]:
    assert wait_until(lambda: int(str(_show(relayd, queue_id)[rcpt]["attempts"])) >= 1)
    return _show(relayd, queue_id)[rcpt]


def _metrics(relayd: Relayd) -> str:
    url = f"http://127.0.0.1:{relayd.http_port}/metrics"
    return str(urllib.request.urlopen(url, timeout=10).read().decode())


def _delivery(level: str, ca_file: Path | None = None, policy: str = "") -> str:
    lines = [f'tls = "{level}"']
    if ca_file is not None:
        lines.append(f'tls_ca_file = "{ca_file}"')
    if policy:
        lines.append(f"\n[tls_policy]\n{policy}")
    return "\n".join(lines)


def test_verify_with_a_wrong_name_is_deferred_and_nothing_is_sent(
    tmp_path: Path, ca_file: Path, wrong_name_sink: TlsSink
) -> None:
    extra = _delivery("verify", ca_file)
    with Relayd(
        tmp_path, routes={"example.test": wrong_name_sink.port}, extra=extra, retry_schedule='["1h"]'
    ) as relayd:
        qid = _submit(relayd, "bob@example.test")
        rcpt = _wait_deferred(relayd, qid, "bob@example.test")
        assert rcpt["state"] not in ("delivered", "failed")
        assert "4.7.5" in str(rcpt["last_reply"])
        assert "certificate verify failed" in str(rcpt["last_reply"])
        assert 'relayd_delivery_tls_total{level="verify",result="failed"}' in _metrics(relayd)
    assert wrong_name_sink.recorder.mail_from == []
    assert wrong_name_sink.recorder.delivered == []


def test_verify_with_the_right_certificate_is_delivered(
    tmp_path: Path, ca_file: Path, right_sink: TlsSink
) -> None:
    with Relayd(
        tmp_path, routes={"example.test": right_sink.port}, extra=_delivery("verify", ca_file)
    ) as relayd:
        qid = _submit(relayd, "bob@example.test")
        assert wait_until(lambda: len(right_sink.recorder.delivered) == 1)
        assert wait_until(lambda: _show(relayd, qid)["bob@example.test"]["state"] == "delivered")
        assert 'relayd_delivery_tls_total{level="verify",result="tls"}' in _metrics(relayd)
    assert right_sink.recorder.mail_from == [(right_sink.recorder.mail_from[0][0], True)]
    assert right_sink.recorder.delivered == [("bob@example.test", True)]


def test_verify_against_an_untrusted_ca_is_deferred(tmp_path: Path, wrong_name_sink: TlsSink) -> None:
    # no tls_ca_file: the system CA store does not know the test CA, whatever name the certificate has
    with Relayd(
        tmp_path,
        routes={"example.test": wrong_name_sink.port},
        extra=_delivery("verify"),
        retry_schedule='["1h"]',
    ) as relayd:
        qid = _submit(relayd, "bob@example.test")
        assert "4.7.5" in str(_wait_deferred(relayd, qid, "bob@example.test")["last_reply"])
    assert wrong_name_sink.recorder.mail_from == []


def test_encrypt_to_a_sink_without_starttls_is_deferred(tmp_path: Path, plain_sink: TlsSink) -> None:
    with Relayd(
        tmp_path,
        routes={"example.test": plain_sink.port},
        extra=_delivery("encrypt"),
        retry_schedule='["1h"]',
    ) as relayd:
        qid = _submit(relayd, "bob@example.test")
        rcpt = _wait_deferred(relayd, qid, "bob@example.test")
        assert "4.7.5" in str(rcpt["last_reply"])
        assert "STARTTLS not offered" in str(rcpt["last_reply"])
        assert 'relayd_delivery_tls_total{level="encrypt",result="not_offered"}' in _metrics(relayd)
    assert plain_sink.recorder.mail_from == []


def test_encrypt_delivers_over_an_unverified_certificate(tmp_path: Path, wrong_name_sink: TlsSink) -> None:
    with Relayd(
        tmp_path, routes={"example.test": wrong_name_sink.port}, extra=_delivery("encrypt")
    ) as relayd:
        _submit(relayd, "bob@example.test")
        assert wait_until(lambda: len(wrong_name_sink.recorder.delivered) == 1)
    assert wrong_name_sink.recorder.delivered == [("bob@example.test", True)]


def test_may_still_delivers_in_plaintext_without_starttls(tmp_path: Path, plain_sink: TlsSink) -> None:
    with Relayd(tmp_path, routes={"example.test": plain_sink.port}, extra=_delivery("may")) as relayd:
        _submit(relayd, "bob@example.test")
        assert wait_until(lambda: len(plain_sink.recorder.delivered) == 1)
    assert plain_sink.recorder.delivered == [("bob@example.test", False)]


def test_tls_policy_overrides_the_delivery_level_per_domain(
    tmp_path: Path, ca_file: Path, wrong_name_sink: TlsSink, plain_sink: TlsSink
) -> None:
    # [delivery] tls = "may" for everyone; the bank's subdomains must verify, and their sink can't
    extra = _delivery("may", ca_file, '".bank.test" = "verify"')
    routes = {"mail.bank.test": wrong_name_sink.port, "example.test": plain_sink.port}
    with Relayd(tmp_path, routes=routes, extra=extra, retry_schedule='["1h"]') as relayd:
        qid = _submit(relayd, "ann@mail.bank.test")
        _submit(relayd, "bob@example.test")
        assert wait_until(lambda: len(plain_sink.recorder.delivered) == 1)
        assert "4.7.5" in str(_wait_deferred(relayd, qid, "ann@mail.bank.test")["last_reply"])
    assert plain_sink.recorder.delivered == [("bob@example.test", False)]
    assert wrong_name_sink.recorder.mail_from == []


def test_bad_levels_are_config_errors_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "relayd.toml"
    path.write_text('[delivery]\ntls = "always"\n\n[tls_policy]\n"example.com" = "strict"\n')
    with pytest.raises(ConfigError) as err:
        load(path)
    problems = "\n".join(err.value.problems)
    assert f"{path}: delivery.tls: " in problems
    assert f"{path}: tls_policy.example.com: " in problems


def test_a_missing_ca_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "relayd.toml"
    path.write_text(f'[delivery]\ntls = "verify"\ntls_ca_file = "{tmp_path}/nope.pem"\n')
    with pytest.raises(ConfigError) as err:
        load(path)
    assert f"{path}: delivery.tls_ca_file: no such file: {tmp_path}/nope.pem" in err.value.problems
