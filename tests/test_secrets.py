"""Secrets: created 0600, refused when others may read them, never in a log line.

The log test runs a whole relayd life at ``--log-level debug`` (the most talkative setting, aiosmtpd's
command echo included): AUTH, a submission signed with a DKIM key, a delivery, a synchronous bounce (5xx at
the receiver) and an asynchronous one (a DSN to the VERP address), then searches the log for the password
(plain and as the AUTH PLAIN blob), the HMAC secret and the private key's PEM lines.
"""

from __future__ import annotations

import base64
import os
import smtplib
import stat
import subprocess
from pathlib import Path

import pytest

from tests.harness import PASSWORD, RELAYD, Relayd, Sink, message, wait_for_port, wait_until

DOMAIN = "acme.example.test"


def keygen(tmp: Path) -> Path:
    out = subprocess.run(
        [*RELAYD, "dkim", "keygen", "--domain", DOMAIN, "--selector", "s1", "--algorithm", "rsa"],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    (path,) = tmp.rglob("*.pem")
    return path


def dkim_config(key: Path) -> str:
    return f'\n[[dkim]]\ndomain = "{DOMAIN}"\nselector = "s1"\nkey_file = "{key}"\nalgorithm = "rsa"\n'


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def serve_exit(relayd: Relayd) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RELAYD, "serve", "--config", str(relayd.config)],
        cwd=relayd.tmp,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_secret_and_dkim_key_are_created_0600(tmp_path: Path, sink: Sink) -> None:
    key = keygen(tmp_path)
    assert mode(key) == 0o600
    with Relayd(tmp_path, routes={"example.test": sink.port}, extra=dkim_config(key)):
        assert mode(tmp_path / "secret.key") == 0o600


def test_readable_secret_refuses_to_start(tmp_path: Path, sink: Sink) -> None:
    relayd = Relayd(tmp_path, routes={"example.test": sink.port})
    secret = tmp_path / "secret.key"
    secret.write_text(os.urandom(32).hex() + "\n")
    for bits in (0o640, 0o604):
        secret.chmod(bits)
        out = serve_exit(relayd)
        assert out.returncode == 2, out.stderr[-2000:]
        assert f"{secret}: server.secret_file: readable by group or others" in out.stderr


def test_readable_dkim_key_refuses_to_start(tmp_path: Path, sink: Sink) -> None:
    key = keygen(tmp_path)
    relayd = Relayd(tmp_path, routes={"example.test": sink.port}, extra=dkim_config(key))
    for bits in (0o640, 0o644):
        key.chmod(bits)
        out = serve_exit(relayd)
        assert out.returncode == 2, out.stderr[-2000:]
        assert f"{key}: dkim.key_file: readable by group or others" in out.stderr
    key.chmod(0o600)
    with relayd:  # and a reload that meets a readable key keeps the running keys
        key.chmod(0o644)
        assert relayd.proc is not None
        relayd.proc.send_signal(1)  # SIGHUP
        assert wait_until(lambda: "reload refused" in relayd.log_text() and str(key) in relayd.log_text())


class DebugRelayd(Relayd):
    """relayd at ``--log-level debug``."""

    def start(self) -> DebugRelayd:
        with self.log.open("ab") as logf:
            self.proc = subprocess.Popen(
                [*RELAYD, "serve", "--log-level", "debug", "--config", str(self.config)],
                stdout=logf,
                stderr=logf,
                cwd=self.tmp,
            )
        wait_for_port(self.port, proc=self.proc)
        return self


def test_no_secret_reaches_the_log(tmp_path: Path, sink: Sink) -> None:
    key = keygen(tmp_path)
    sink.handler.script["gone@example.test"] = ["550 5.1.1 <gone@example.test>: no such user"]
    with DebugRelayd(tmp_path, routes={"example.test": sink.port}, extra=dkim_config(key)) as relayd:
        code, _ = relayd.submit(message(), to=["bob@example.test", "gone@example.test"])
        assert code == 250
        with relayd.smtp() as s:  # a wrong password, too: failures are logged
            s.ehlo("app.test")
            wrong = base64.b64encode(b"\0acme\0" + PASSWORD.encode() + b"-typo").decode()
            assert s.docmd("AUTH", "PLAIN " + wrong)[0] == 535
        assert wait_until(lambda: sink.handler.count() == 1)
        delivered = sink.messages[0]
        assert b"DKIM-Signature:" in delivered.data
        assert wait_until(lambda: "gone@example.test" in relayd.cli("suppress", "list").stdout)
        # an asynchronous bounce to the VERP address bob's copy went out with
        dsn = (
            f"From: MAILER-DAEMON@mx.example.test\r\nTo: {delivered.mail_from}\r\nSubject: failure\r\n"
            "MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=R\r\n"
            "\r\n--R\r\nContent-Type: text/plain\r\n\r\nfailed\r\n--R\r\n"
            "Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.test\r\n\r\n"
            "Final-Recipient: rfc822; bob@example.test\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n--R--\r\n"
        )
        with smtplib.SMTP("127.0.0.1", relayd.inbound_port, timeout=10) as s:
            s.sendmail("", [delivered.mail_from], dsn.encode())
        assert wait_until(lambda: "bob@example.test" in relayd.cli("suppress", "list").stdout)
        relayd.stop()
    log = relayd.log_text()
    assert "DEBUG" in log and "AUTH PLAIN <redacted>" in log  # the debug echo ran, and was blanked
    secret_hex = (tmp_path / "secret.key").read_text().strip()
    pem_lines = [
        line
        for line in key.read_text().splitlines()
        if line and not line.startswith("-----") and len(line) >= 16
    ]
    plain_blob = base64.b64encode(f"\0acme\0{PASSWORD}".encode()).decode()
    leaks = {
        "password": PASSWORD in log,
        "AUTH PLAIN blob": plain_blob in log or wrong in log,
        "secret": secret_hex in log or secret_hex[:16] in log,
        "DKIM key": any(line in log for line in pem_lines),
    }
    assert not any(leaks.values()), leaks


def test_readable_password_webhook_and_tls_key_files_refuse_to_start(tmp_path: Path) -> None:
    """Every secret file is held to the server secret's rule, and check-config says so too."""
    import trustme

    cert = trustme.CA().issue_cert("relayd.test", "127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    cert.private_key_pem.write_to_path(tmp_path / "key.pem")
    password = tmp_path / "acme.password"
    password.write_text("a long enough password\n")
    hook = tmp_path / "hook.secret"
    hook.write_text(os.urandom(16).hex() + "\n")
    accounts = (
        f'\n[accounts.acme]\npassword_file = "{password}"\ndomains = ["{DOMAIN}"]\n'
        f'webhooks = [{{ url = "http://127.0.0.1:9/hook", secret_file = "{hook}" }}]\n'
    )
    relayd = Relayd(
        tmp_path,
        routes={"example.test": 9},
        accounts=accounts,
        submission_extra=f'tls_cert = "{tmp_path}/cert.pem"\ntls_key = "{tmp_path}/key.pem"',
    )
    expected = {
        "accounts.acme.password_file": password,
        "accounts.acme.webhooks[0].secret_file": hook,
        "submission.tls_key": tmp_path / "key.pem",
    }
    for bits in (0o640, 0o604):
        for file in expected.values():
            file.chmod(bits)
        for command in ("check-config", "serve"):
            out = subprocess.run(
                [*RELAYD, command, "--config", str(relayd.config)],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert out.returncode == 2, (command, out.stderr[-2000:])
            for key, file in expected.items():
                want = f"{relayd.config}: {key}: {file} is readable by group or others (mode {bits:04o})"
                assert want in out.stderr, (command, want, out.stderr)
    for file in expected.values():
        file.chmod(0o600)
    out = subprocess.run(
        [*RELAYD, "check-config", "--config", str(relayd.config)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr


def test_rsa_dkim_key_under_2048_bits_refuses_to_start(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from relayd.mail.dkim import DkimKeyError, keygen

    key = tmp_path / "short.pem"
    pem = rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key.write_bytes(pem)
    key.chmod(0o600)
    relayd = Relayd(tmp_path, routes={"example.test": 9}, extra=dkim_config(key))
    out = serve_exit(relayd)
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"{key}: dkim.key_file: rsa key has 1024 bits, relayd needs at least 2048" in out.stderr
    out = subprocess.run(
        [*RELAYD, "check-config", "--config", str(relayd.config)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert f"{relayd.config}: dkim[0].key_file: {key}: dkim.key_file: rsa key has 1024 bits" in out.stderr
    with pytest.raises(DkimKeyError, match="at least 2048 bits"):
        keygen(DOMAIN, "s1", "rsa", tmp_path / "keys", bits=1024)
