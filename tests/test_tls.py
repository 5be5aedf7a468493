"""STARTTLS on submission: TLS 1.2+ only, modern ciphers, certificate reload on SIGHUP.

Old protocol versions are tried twice: with the ``openssl s_client`` CLI, and with Python's ssl on a client
context capped at TLS 1.1 with ``@SECLEVEL=0`` ciphers (Debian's OpenSSL 3 refuses to even offer TLS 1.0/1.1
at its default security level, so without SECLEVEL=0 a "refused" would prove nothing about relayd).
"""

from __future__ import annotations

import shutil
import signal
import smtplib
import ssl
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.harness import PASSWORD, Relayd, Sink, wait_until

CA = trustme.CA()


def write_cert(tmp: Path, name: str) -> None:
    cert = CA.issue_cert(name, "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(tmp / "cert.pem")
    cert.private_key_pem.write_to_path(tmp / "key.pem")
    (tmp / "key.pem").chmod(0o600)  # relayd refuses a TLS key others can read


@pytest.fixture(scope="module")
def tls_relayd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relayd]:
    tmp = tmp_path_factory.mktemp("tls")
    write_cert(tmp, "first.relayd.test")
    extra = f'tls_cert = "{tmp}/cert.pem"\ntls_key = "{tmp}/key.pem"\nplaintext_auth = "never"'
    with Sink() as sink, Relayd(tmp, routes={"example.test": sink.port}, submission_extra=extra) as relayd:
        yield relayd


def client_context(*, maximum: ssl.TLSVersion | None = None, weak: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    CA.configure_trust(ctx)
    ctx.check_hostname = False  # the certificate names change on purpose
    with warnings.catch_warnings():  # ssl deprecates TLS 1.0/1.1, which is the point of trying them
        warnings.simplefilter("ignore", DeprecationWarning)
        if weak:
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.set_ciphers("ALL:@SECLEVEL=0")
        if maximum is not None:
            ctx.maximum_version = maximum
    return ctx


def peer_name(relayd: Relayd, ctx: ssl.SSLContext | None = None) -> tuple[str, str, str]:
    """(subject alt name, TLS version, cipher) of what relayd serves after STARTTLS."""
    with smtplib.SMTP("127.0.0.1", relayd.port, timeout=10) as s:
        s.starttls(context=ctx or client_context())
        assert isinstance(s.sock, ssl.SSLSocket)
        cert = s.sock.getpeercert()
        assert cert is not None
        alt = cert.get("subjectAltName", ())
        names = [str(pair[1]) for pair in alt if isinstance(pair, tuple) and pair[0] == "DNS"]
        cipher = s.sock.cipher()
        assert cipher is not None
        version = s.sock.version()
        assert version is not None
        s.ehlo("app.test")
        s.login("acme", PASSWORD)  # AUTH works over the new session
        return names[0], version, cipher[0]


@pytest.mark.parametrize("maximum", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1], ids=["tls1.0", "tls1.1"])
def test_old_tls_versions_are_refused(tls_relayd: Relayd, maximum: ssl.TLSVersion) -> None:
    with pytest.raises(ssl.SSLError):
        peer_name(tls_relayd, client_context(maximum=maximum, weak=True))


def test_tls12_and_13_get_forward_secret_aead_ciphers(tls_relayd: Relayd) -> None:
    _, version, cipher = peer_name(tls_relayd, client_context(maximum=ssl.TLSVersion.TLSv1_2, weak=True))
    assert version == "TLSv1.2" and cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA" in cipher)
    _, version, cipher = peer_name(tls_relayd)
    assert version == "TLSv1.3" and cipher.startswith("TLS_")


def test_tls12_cbc_and_rsa_key_exchange_are_not_offered(tls_relayd: Relayd) -> None:
    ctx = client_context(maximum=ssl.TLSVersion.TLSv1_2, weak=True)
    ctx.set_ciphers("AES128-SHA:AES256-SHA:ECDHE-RSA-AES128-SHA:AES128-GCM-SHA256:@SECLEVEL=0")
    with pytest.raises(ssl.SSLError):
        peer_name(tls_relayd, ctx)


@pytest.mark.parametrize(
    ("flag", "accepted"), [("-tls1", False), ("-tls1_1", False), ("-tls1_2", True), ("-tls1_3", True)]
)
def test_openssl_s_client(tls_relayd: Relayd, flag: str, accepted: bool) -> None:
    openssl = shutil.which("openssl")
    assert openssl is not None, "the openssl CLI is needed (.ci/run installs it)"
    cmd = [openssl, "s_client", "-starttls", "smtp", "-connect", f"127.0.0.1:{tls_relayd.port}", flag]
    if flag in ("-tls1", "-tls1_1"):
        cmd += ["-cipher", "ALL:@SECLEVEL=0"]  # else OpenSSL 3 will not even offer them
    out = subprocess.run(cmd, input=b"QUIT\r\n", capture_output=True, timeout=20)
    text = out.stdout.decode(errors="replace")
    negotiated = "Cipher is (NONE)" not in text and "New, TLSv1." in text
    assert negotiated == accepted, text[-600:] + out.stderr.decode(errors="replace")[-600:]


def test_certificate_is_reloaded_on_sighup(tls_relayd: Relayd) -> None:
    assert peer_name(tls_relayd)[0] == "first.relayd.test"
    write_cert(tls_relayd.tmp, "second.relayd.test")
    assert tls_relayd.proc is not None
    tls_relayd.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: peer_name(tls_relayd)[0] == "second.relayd.test", timeout=10)
    # a broken pair refuses the reload and the served certificate stays
    (tls_relayd.tmp / "key.pem").write_text("not a key\n")
    tls_relayd.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "reload refused" in tls_relayd.log_text(), timeout=10)
    assert peer_name(tls_relayd)[0] == "second.relayd.test"
