"""Not an open relay: every way in without the right credentials is refused, and nothing gets queued."""

from __future__ import annotations

import base64
import smtplib
import ssl
from pathlib import Path

import pytest
import trustme

from tests.harness import PASSWORD, Relayd, Sink, message, wait_until


def _queued(relayd: Relayd) -> str:
    out = relayd.cli("queue", "list", "--json")
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture
def relayd(tmp_path: Path, sink: Sink) -> Relayd:
    r = Relayd(tmp_path, routes={"example.test": sink.port, "outside.test": sink.port})
    r.start()
    yield r  # type: ignore[misc]
    r.kill()


def test_unauthenticated_mail_and_rcpt_are_refused(relayd: Relayd, sink: Sink) -> None:
    with relayd.smtp() as s:
        s.ehlo("spammer.test")
        assert s.mail("app@acme.example.test") == (530, b"5.7.0 Authentication required")
        code, _ = s.rcpt("victim@outside.test")
        assert code == 503  # no MAIL accepted, so no RCPT
        code, _ = s.docmd("DATA")
        assert code == 503
    assert _queued(relayd) == ""
    assert sink.handler.count() == 0


def test_wrong_password_is_refused(relayd: Relayd) -> None:
    with relayd.smtp() as s:
        with pytest.raises(smtplib.SMTPAuthenticationError) as exc:
            s.login("acme", "not-the-password")
        assert exc.value.smtp_code == 535
        assert exc.value.smtp_error.startswith(b"5.7.8")
        with pytest.raises(smtplib.SMTPAuthenticationError):
            s.login("nobody", PASSWORD)
        assert s.mail("app@acme.example.test")[0] == 530
    assert _queued(relayd) == ""


def test_auth_login_mechanism_works(relayd: Relayd) -> None:
    with relayd.smtp() as s:
        s.ehlo("app.test")
        assert s.docmd("AUTH", "LOGIN")[0] == 334
        assert s.docmd(base64.b64encode(b"acme").decode())[0] == 334
        assert s.docmd(base64.b64encode(PASSWORD.encode()).decode())[0] == 235
        assert s.mail("app@acme.example.test")[0] == 250


def test_sending_domain_must_belong_to_the_account(relayd: Relayd, sink: Sink) -> None:
    with relayd.smtp() as s:
        s.login("acme", PASSWORD)
        code, resp = s.mail("ceo@other.example.test")
        assert code == 553 and resp.startswith(b"5.7.1")
        code, resp = s.mail("ceo@bank.test")
        assert code == 553 and resp.startswith(b"5.7.1")
        assert s.docmd("MAIL", "FROM:<>")[0] in (501, 553)  # aiosmtpd itself refuses the null sender
    assert _queued(relayd) == ""
    assert sink.handler.count() == 0


def test_authenticated_relay_to_an_outside_domain_works(relayd: Relayd, sink: Sink) -> None:
    """The counterpart: the same outside domain is fine for an authenticated account."""
    assert relayd.submit(message(), to=["someone@outside.test"])[0] == 250
    assert wait_until(lambda: sink.handler.count() == 1)


def test_auth_before_starttls_is_refused_when_plaintext_auth_is_never(tmp_path: Path, sink: Sink) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("relayd.test", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(tmp_path / "cert.pem")
    cert.private_key_pem.write_to_path(tmp_path / "key.pem")
    (tmp_path / "key.pem").chmod(0o600)  # relayd refuses a TLS key others can read
    extra = f'tls_cert = "{tmp_path}/cert.pem"\ntls_key = "{tmp_path}/key.pem"\nplaintext_auth = "never"'
    with Relayd(tmp_path, routes={"example.test": sink.port}, submission_extra=extra) as relayd:
        with relayd.smtp() as s:
            s.ehlo("app.test")
            assert "starttls" in s.esmtp_features
            code, resp = s.docmd("AUTH", "PLAIN " + base64.b64encode(f"\0acme\0{PASSWORD}".encode()).decode())
            assert code == 538 and resp.startswith(b"5.7.11")
            assert s.mail("app@acme.example.test")[0] == 530
            ctx = ssl.create_default_context()
            ca.configure_trust(ctx)
            s.starttls(context=ctx)
            s.ehlo("app.test")
            s.login("acme", PASSWORD)
            assert s.mail("app@acme.example.test")[0] == 250
            assert s.rcpt("bob@example.test")[0] == 250
            assert s.data(message())[0] == 250
        assert wait_until(lambda: sink.handler.count() == 1)
        assert "with ESMTPSA" in sink.messages[0].data.decode().split("\r\n\r\n")[0]


def test_network_mapped_account_needs_no_auth(tmp_path: Path, sink: Sink) -> None:
    accounts = """
[accounts.internal]
domains = ["acme.example.test"]
networks = ["127.0.0.0/8"]
"""
    with (
        Relayd(tmp_path, routes={"example.test": sink.port}, accounts=accounts) as relayd,
        relayd.smtp() as s,
    ):
        s.ehlo("internal.test")
        assert s.mail("app@acme.example.test")[0] == 250
        s.rset()
        code, resp = s.mail("x@other.example.test")
        assert code == 553 and resp.startswith(b"5.7.1")
