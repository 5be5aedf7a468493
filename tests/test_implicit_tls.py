"""Implicit TLS on submission (``[submission] listen_tls``, RFC 8314 §3.3: port 465, TLS from the first byte).

Real clients only: swaks ``--tls-on-connect`` and Python's ``smtplib.SMTP_SSL``, against certificates made
by trustme at test time. The listener shares the STARTTLS certificate, and both follow a SIGHUP reload.
"""

from __future__ import annotations

import hashlib
import signal
import smtplib
import socket
import ssl
import subprocess
import tomllib
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.harness import (
    PASSWORD,
    RELAYD,
    Relayd,
    Sink,
    config_text,
    free_port,
    message,
    wait_for_port,
    wait_until,
)

CA = trustme.CA()


def write_cert(tmp: Path, name: str) -> str:
    """Write a certificate for ``name`` (and 127.0.0.1) and its key (mode 0600); return its SHA-256."""
    cert = CA.issue_cert(name, "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(tmp / "cert.pem")
    cert.private_key_pem.write_to_path(tmp / "key.pem")
    (tmp / "key.pem").chmod(0o600)  # relayd refuses a TLS key others can read
    CA.cert_pem.write_to_path(tmp / "ca.pem")  # for swaks --tls-verify
    der = ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())
    return hashlib.sha256(der).hexdigest()


class TlsRelayd(Relayd):
    """A relayd with a STARTTLS listener (``port``) and an implicit-TLS one (``tls_port``)."""

    def __init__(self, tmp: Path, sink: Sink, server_extra: str = "", submission_extra: str = "") -> None:
        self.tls_port = free_port()
        self.fingerprint = write_cert(tmp, "first.relayd.test")
        extra = (
            f'tls_cert = "{tmp}/cert.pem"\ntls_key = "{tmp}/key.pem"\n'
            f'listen_tls = ["127.0.0.1:{self.tls_port}"]\nplaintext_auth = "never"\n{submission_extra}'
        )
        super().__init__(
            tmp, routes={"example.test": sink.port}, submission_extra=extra, server_extra=server_extra
        )

    def start(self) -> TlsRelayd:
        super().start()
        wait_for_port(self.tls_port, proc=self.proc)
        return self


@pytest.fixture(scope="module")
def sink() -> Iterator[Sink]:
    with Sink() as s:
        yield s


@pytest.fixture(scope="module")
def relayd(tmp_path_factory: pytest.TempPathFactory, sink: Sink) -> Iterator[TlsRelayd]:
    with TlsRelayd(tmp_path_factory.mktemp("implicit-tls"), sink) as r:
        yield r


def client_context(*, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    CA.configure_trust(ctx)
    ctx.check_hostname = False  # the certificate names change on purpose
    if maximum is not None:
        with warnings.catch_warnings():  # ssl deprecates TLS 1.0/1.1, which is the point of trying them
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.set_ciphers("ALL:@SECLEVEL=0")
            ctx.maximum_version = maximum
    return ctx


def served_fingerprint(sock: object) -> str:
    assert isinstance(sock, ssl.SSLSocket)
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def implicit_tls_fingerprint(relayd: TlsRelayd) -> str:
    """SHA-256 of the certificate a new implicit-TLS connection is served (after an AUTH over it)."""
    with smtplib.SMTP_SSL("127.0.0.1", relayd.tls_port, context=client_context(), timeout=10) as s:
        s.login("acme", PASSWORD)
        return served_fingerprint(s.sock)


def starttls_fingerprint(relayd: TlsRelayd) -> str:
    with smtplib.SMTP("127.0.0.1", relayd.port, timeout=10) as s:
        s.starttls(context=client_context())
        return served_fingerprint(s.sock)


def test_swaks_tls_on_connect_with_auth_plain_reaches_the_sink(relayd: TlsRelayd, sink: Sink) -> None:
    before = sink.handler.count()
    data = (
        "From: app@acme.example.test\nTo: dave@example.test\nSubject: via swaks on 465\n"
        "Message-ID: <swaks-465@acme.example.test>\n\nSent over implicit TLS.\n"
    )
    out = subprocess.run(
        [
            "swaks",
            "--tls-on-connect",
            "--tls-verify",
            "--tls-ca-path",
            str(relayd.tmp / "ca.pem"),
            "--server",
            f"127.0.0.1:{relayd.tls_port}",
            "--auth",
            "PLAIN",
            "--auth-user",
            "acme",
            "--auth-password",
            PASSWORD,
            "--from",
            "app@acme.example.test",
            "--to",
            "dave@example.test",
            "--data",
            "-",
        ],
        input=data,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "250 2.0.0 Ok: queued as" in out.stdout
    assert wait_until(lambda: sink.handler.count() == before + 1)
    delivered = sink.messages[-1]
    assert delivered.rcpt_tos == ["dave@example.test"]
    assert b"Sent over implicit TLS." in delivered.data
    # the session was TLS and authenticated from the start: the trace line says so (RFC 3848)
    assert b"(relayd) with ESMTPSA id" in delivered.data


def test_smtp_ssl_client_trusting_the_ca_submits(relayd: TlsRelayd, sink: Sink) -> None:
    before = sink.handler.count()
    with smtplib.SMTP_SSL("127.0.0.1", relayd.tls_port, context=client_context(), timeout=30) as s:
        s.login("acme", PASSWORD)
        s.sendmail("app@acme.example.test", ["erin@example.test"], message("over SMTP_SSL"))
    assert wait_until(lambda: sink.handler.count() == before + 1)
    assert sink.messages[-1].rcpt_tos == ["erin@example.test"]


def test_ehlo_on_the_tls_port_offers_auth_but_not_starttls(relayd: TlsRelayd) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", relayd.tls_port, context=client_context(), timeout=10) as s:
        code, _ = s.ehlo("app.test")
        assert code == 250
        assert not s.has_extn("starttls")
        assert set(s.esmtp_features["auth"].split()) == {"LOGIN", "PLAIN"}
        assert s.docmd("STARTTLS")[0] == 454  # not offered, so not started either (RFC 3207 §4)
        assert s.noop()[0] == 250  # and the session goes on, still encrypted
    # the plain port (plaintext_auth = "never") still offers STARTTLS and keeps AUTH behind it
    with smtplib.SMTP("127.0.0.1", relayd.port, timeout=10) as s:
        s.ehlo("app.test")
        assert s.has_extn("starttls") and not s.has_extn("auth")


def test_tls_port_refuses_tls_1_1_like_starttls(relayd: TlsRelayd) -> None:
    with pytest.raises(ssl.SSLError):
        smtplib.SMTP_SSL(
            "127.0.0.1", relayd.tls_port, context=client_context(maximum=ssl.TLSVersion.TLSv1_1), timeout=10
        )


def test_implicit_tls_listener_is_logged_at_start(relayd: TlsRelayd) -> None:
    assert f"submission (implicit TLS) listening on ('127.0.0.1', {relayd.tls_port})" in relayd.log_text()


def test_new_certificate_is_served_after_sighup(relayd: TlsRelayd) -> None:
    """Last in this module: it replaces the module relayd's certificate."""
    first = relayd.fingerprint
    assert implicit_tls_fingerprint(relayd) == first == starttls_fingerprint(relayd)
    second = write_cert(relayd.tmp, "second.relayd.test")
    assert second != first
    assert relayd.proc is not None
    relayd.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: implicit_tls_fingerprint(relayd) == second, timeout=10)
    assert starttls_fingerprint(relayd) == second  # both listeners serve the one certificate
    # a pair that does not load refuses the reload; the implicit-TLS port keeps serving the last good one
    (relayd.tmp / "key.pem").write_text("not a key\n")
    relayd.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "reload refused" in relayd.log_text(), timeout=10)
    assert implicit_tls_fingerprint(relayd) == second


def test_two_workers_share_the_tls_port(tmp_path: Path, sink: Sink) -> None:
    before = sink.handler.count()
    with TlsRelayd(tmp_path, sink, server_extra="workers = 2") as relayd:
        # each accepting process bound the port (SO_REUSEPORT): without it the second bind fails
        assert wait_until(lambda: relayd.log_text().count("submission (implicit TLS) listening on") == 2)
        for i in range(10):
            with smtplib.SMTP_SSL("127.0.0.1", relayd.tls_port, context=client_context(), timeout=30) as s:
                s.login("acme", PASSWORD)
                s.sendmail("app@acme.example.test", [f"w{i}@example.test"], message(f"worker {i}"))
        assert wait_until(lambda: sink.handler.count() == before + 10)


def closed_by_peer(sock: socket.socket) -> bool:
    """True when relayd closes the connection (FIN or RST) before the socket's timeout."""
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


def test_clients_stalled_in_the_handshake_are_limited_per_ip(tmp_path: Path, sink: Sink) -> None:
    """A connection that never sends its ClientHello holds a handshake slot of its client, not more: past
    ``max_connections_per_ip`` the next one is closed at once, and a slot given back serves a real client."""
    with TlsRelayd(tmp_path, sink, submission_extra="max_connections_per_ip = 3") as relayd:
        stalled = [socket.create_connection(("127.0.0.1", relayd.tls_port), timeout=10) for _ in range(3)]
        try:
            with socket.create_connection(("127.0.0.1", relayd.tls_port), timeout=10) as extra:
                assert closed_by_peer(extra)
            assert "implicit TLS connection closed: 421 4.7.0 Too many connections from your address" in (
                relayd.log_text()
            )
        finally:
            for sock in stalled:
                sock.close()

        def real_client_served() -> bool:
            try:
                return implicit_tls_fingerprint(relayd) == relayd.fingerprint
            except (OSError, smtplib.SMTPException):
                return False

        assert wait_until(real_client_served, timeout=10)


def test_check_config_requires_a_certificate_for_listen_tls(tmp_path: Path) -> None:
    conf = tmp_path / "relayd.toml"
    conf.write_text(
        config_text(
            tmp_path,
            port=free_port(),
            routes={"example.test": 9},
            submission_extra='listen_tls = ["127.0.0.1:4465"]',
        )
    )
    out = subprocess.run(
        [*RELAYD, "check-config", "--config", str(conf)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"{conf}: submission.listen_tls: implicit TLS needs a certificate" in out.stdout + out.stderr


def test_example_password_is_refused_when_only_the_tls_listener_is_public(tmp_path: Path) -> None:
    example = tomllib.loads((Path(__file__).resolve().parent.parent / "conf" / "relayd.toml").read_text())[
        "accounts"
    ]["acme"]["password_hash"]
    write_cert(tmp_path, "relayd.test")
    extra = f'tls_cert = "{tmp_path}/cert.pem"\ntls_key = "{tmp_path}/key.pem"\nlisten_tls = ["0.0.0.0:4465"]'
    accounts = f'[accounts.acme]\npassword_hash = "{example}"\ndomains = ["acme.example.test"]\n'
    conf = tmp_path / "relayd.toml"
    conf.write_text(
        config_text(
            tmp_path, port=free_port(), routes={"example.test": 9}, submission_extra=extra, accounts=accounts
        )
    )
    out = subprocess.run(
        [*RELAYD, "check-config", "--config", str(conf)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"{conf}: accounts.acme.password_hash: still the example password" in out.stderr
    assert "0.0.0.0:4465" in out.stderr
