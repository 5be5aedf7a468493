"""STARTTLS on the inbound listener (``[inbound] tls_cert``/``tls_key``): TLS 1.2+ only, as submission, the
certificate re-read on SIGHUP, and still no AUTH once the session is encrypted.

Real clients: swaks ``--tls`` and ``openssl s_client -starttls smtp``, against certificates from a private
CA made by trustme at test time."""

from __future__ import annotations

import shutil
import signal
import smtplib
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from relayd.config import load
from relayd.core.errors import ConfigError
from tests.harness import Relayd, Sink, wait_until

CA = trustme.CA()
_INBOUND = 'domains = ["bounces.example.test"]'


def write_cert(tmp: Path, name: str) -> None:
    cert = CA.issue_cert(name, "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(tmp / "in-cert.pem")
    cert.private_key_pem.write_to_path(tmp / "in-key.pem")
    (tmp / "in-key.pem").chmod(0o600)  # relayd refuses a TLS key others can read


def inbound_tls_relayd(tmp: Path, sink: Sink) -> Relayd:
    """A relayd whose inbound listener offers STARTTLS (greeting at once: swaks and s_client wait anyway)."""
    write_cert(tmp, "first.bounces.test")
    CA.cert_pem.write_to_path(tmp / "ca.pem")  # for swaks --tls-verify
    relayd = Relayd(tmp, routes={"example.test": sink.port})
    keys = f'{_INBOUND}\ntls_cert = "{tmp}/in-cert.pem"\ntls_key = "{tmp}/in-key.pem"\ngreet_wait = "0s"'
    relayd.config.write_text(relayd.config.read_text().replace(_INBOUND, keys))
    return relayd


@pytest.fixture(scope="module")
def relayd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relayd]:
    tmp = tmp_path_factory.mktemp("inbound-tls")
    with Sink() as sink, inbound_tls_relayd(tmp, sink) as r:
        yield r


def client_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    CA.configure_trust(ctx)
    return ctx


def served_name(relayd: Relayd) -> str:
    """The DNS name of the certificate the inbound listener serves after STARTTLS."""
    with smtplib.SMTP("127.0.0.1", relayd.inbound_port, timeout=10) as s:
        ctx = client_context()
        ctx.check_hostname = False  # the name changes on purpose
        s.starttls(context=ctx)
        assert isinstance(s.sock, ssl.SSLSocket)
        cert = s.sock.getpeercert()
        assert cert is not None
        alt = cert.get("subjectAltName", ())
        return next(str(pair[1]) for pair in alt if isinstance(pair, tuple) and pair[0] == "DNS")


def test_swaks_delivers_a_report_over_starttls(relayd: Relayd) -> None:
    swaks = shutil.which("swaks")
    assert swaks is not None, "swaks is needed (.ci/run installs it)"
    body = (
        "From: MAILER-DAEMON@mx.example.test\nTo: postmaster@bounces.example.test\nSubject: report over TLS\n"
        "Message-ID: <inbound-tls-1@mx.example.test>\n\nA report sent over STARTTLS.\n"
    )
    out = subprocess.run(
        [
            swaks,
            "--server",
            f"127.0.0.1:{relayd.inbound_port}",
            "--tls",
            "--tls-verify",
            "--tls-ca-path",
            str(relayd.tmp / "ca.pem"),
            "--tls-protocol",
            "tlsv1_2,tlsv1_3",
            "--from",
            "mailer-daemon@mx.example.test",
            "--to",
            "postmaster@bounces.example.test",
            "--helo",
            "mx.example.test",
            "--data",
            "-",
        ],
        input=body.encode(),
        capture_output=True,
        timeout=60,
    )
    text = out.stdout.decode(errors="replace")
    assert out.returncode == 0, text[-1500:] + out.stderr.decode(errors="replace")
    assert "=== TLS started with cipher TLSv1." in text, text[-1500:]
    assert (
        "~> MAIL FROM:<mailer-daemon@mx.example.test>" in text
    )  # the transaction itself ran inside TLS ("~>": encrypted)
    assert "<~  250 " in text.rsplit("~> .", 1)[1], text[-800:]


@pytest.mark.parametrize(
    ("flag", "accepted"), [("-tls1", False), ("-tls1_1", False), ("-tls1_2", True), ("-tls1_3", True)]
)
def test_openssl_s_client_starttls(relayd: Relayd, flag: str, accepted: bool) -> None:
    openssl = shutil.which("openssl")
    assert openssl is not None, "the openssl CLI is needed (.ci/run installs it)"
    cmd = [openssl, "s_client", "-starttls", "smtp", "-connect", f"127.0.0.1:{relayd.inbound_port}", flag]
    if flag in ("-tls1", "-tls1_1"):
        cmd += ["-cipher", "ALL:@SECLEVEL=0"]  # else OpenSSL 3 will not even offer them
    out = subprocess.run(cmd, input=b"QUIT\r\n", capture_output=True, timeout=20)
    text = out.stdout.decode(errors="replace")
    negotiated = "Cipher is (NONE)" not in text and "New, TLSv1." in text
    assert negotiated == accepted, text[-600:] + out.stderr.decode(errors="replace")[-600:]


def test_starttls_is_offered_and_auth_is_not_even_inside_tls(relayd: Relayd) -> None:
    with smtplib.SMTP("127.0.0.1", relayd.inbound_port, timeout=10) as s:
        s.ehlo("mx.example.test")
        assert s.has_extn("starttls")
        assert not s.has_extn("auth")
        ctx = client_context()
        ctx.check_hostname = False
        s.starttls(context=ctx)
        s.ehlo("mx.example.test")
        assert not s.has_extn("starttls")
        assert not s.has_extn("auth")
        assert s.docmd("AUTH", "PLAIN AGFjbWUAeA==")[0] == 502


def test_no_certificate_no_starttls(tmp_path: Path, sink: Sink) -> None:
    with (
        Relayd(tmp_path, routes={"example.test": sink.port}) as plain,
        smtplib.SMTP("127.0.0.1", plain.inbound_port, timeout=10) as s,
    ):
        s.ehlo("mx.example.test")
        assert not s.has_extn("starttls")


def test_inbound_certificate_is_reloaded_on_sighup(tmp_path: Path, sink: Sink) -> None:
    with inbound_tls_relayd(tmp_path, sink) as relayd:
        assert served_name(relayd) == "first.bounces.test"
        write_cert(tmp_path, "second.bounces.test")
        assert relayd.proc is not None
        relayd.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: served_name(relayd) == "second.bounces.test", timeout=10)
        # a broken pair refuses the reload and the served certificate stays
        (tmp_path / "in-key.pem").write_text("not a key\n")
        relayd.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "reload refused" in relayd.log_text(), timeout=10)
        assert served_name(relayd) == "second.bounces.test"


def test_inbound_tls_pair_and_key_permissions_are_checked(tmp_path: Path) -> None:
    write_cert(tmp_path, "mx.bounces.test")
    path = tmp_path / "relayd.toml"
    path.write_text(f'[inbound]\ntls_cert = "{tmp_path}/in-cert.pem"\n')
    with pytest.raises(ConfigError) as err:
        load(path)
    assert f"{path}: inbound: tls_cert and tls_key must be set together" in err.value.problems
    (tmp_path / "in-key.pem").chmod(0o644)
    path.write_text(f'[inbound]\ntls_cert = "{tmp_path}/in-cert.pem"\ntls_key = "{tmp_path}/in-key.pem"\n')
    with pytest.raises(ConfigError) as err:
        load(path)
    assert any(p.startswith(f"{path}: inbound.tls_key: ") and "chmod 600" in p for p in err.value.problems)
