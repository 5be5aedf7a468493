"""What an operator sees: check-config's warnings and its complete list of problems, and the daemon's log
(an accepted line for every accepted message, listeners announced, no library deprecation noise)."""

from __future__ import annotations

import base64
import socket
import subprocess
from pathlib import Path
from typing import BinaryIO

from relayd.edge.smtp.accept import CLIENT_GONE_NOTE
from tests.harness import PASSWORD, RELAYD, Relayd, Sink, message, wait_until

ROOT = Path(__file__).resolve().parent.parent


def check_config(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RELAYD, "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=config.parent,
        timeout=60,
    )


def set_public_url(relayd: Relayd, url: str) -> None:
    lines = relayd.config.read_text().splitlines()
    [i] = [n for n, line in enumerate(lines) if line.startswith("public_url = ")]
    lines[i] = f'public_url = "{url}"'
    relayd.config.write_text("\n".join(lines) + "\n")


# --- check-config -------------------------------------------------------------------------------------------


def test_check_config_warns_when_public_url_is_not_https(tmp_path: Path) -> None:
    relayd = Relayd(tmp_path, routes={"example.test": 9})
    key = f"{relayd.config}: http.public_url: warning:"

    set_public_url(relayd, "http://relay.example.com")
    out = check_config(relayd.config)
    assert out.returncode == 0, out.stderr
    [line] = [x for x in out.stderr.splitlines() if x.startswith(key)]
    assert "http://relay.example.com is not https://" in line and "RFC 8058" in line
    assert "loopback" not in line

    set_public_url(relayd, "https://relay.example.com")
    out = check_config(relayd.config)
    assert out.returncode == 0, out.stderr
    assert key not in out.stderr


def test_check_config_says_an_http_public_url_on_loopback_is_fine_for_a_test(tmp_path: Path) -> None:
    relayd = Relayd(tmp_path, routes={"example.test": 9})  # public_url = "http://127.0.0.1:PORT"
    out = check_config(relayd.config)
    assert out.returncode == 0, out.stderr
    [line] = [
        x for x in out.stderr.splitlines() if x.startswith(f"{relayd.config}: http.public_url: warning:")
    ]
    assert "is not https://" in line and "fine for a test on loopback" in line


def test_check_config_reports_schema_errors_and_missing_files_in_one_run(tmp_path: Path) -> None:
    key = tmp_path / "missing-dkim.pem"
    password = tmp_path / "missing-password"
    dkim = f'\n[[dkim]]\ndomain = "acme.example.test"\nselector = "s1"\nkey_file = "{key}"\n'
    accounts = f"""
[accounts.acme]
password_file = "{password}"
domains = ["acme.example.test"]

[accounts.broken]
domains = ["broken.example.test"]
colour = "blue"
"""
    relayd = Relayd(tmp_path, routes={"example.test": 9}, extra='speed = "fast"\n' + dkim, accounts=accounts)
    out = check_config(relayd.config)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.splitlines()
    # the schema errors ...
    assert f"{relayd.config}: delivery.speed: unknown key" in lines, lines
    assert f"{relayd.config}: accounts.broken.colour: unknown key" in lines, lines
    # ... and, in the same run, the files of the parts that validated
    assert f"{relayd.config}: dkim[0].key_file: no such file: {key}" in lines, lines
    assert f"{relayd.config}: accounts.acme.password_file: no such file: {password}" in lines, lines


# --- the daemon's log ---------------------------------------------------------------------------------------


def _reply(f: BinaryIO) -> str:
    """One (possibly multi-line) SMTP reply from a file made by ``socket.makefile('rb')``."""
    lines = []
    while True:
        line = f.readline()
        assert line, "connection closed by relayd"
        lines.append(line.decode())
        if line[3:4] != b"-":
            return "".join(lines)


def test_accepted_line_is_logged_when_the_client_hangs_up_before_the_250(tmp_path: Path, sink: Sink) -> None:
    with Relayd(tmp_path, routes={"example.test": sink.port}) as relayd:
        sock = socket.create_connection(("127.0.0.1", relayd.port), timeout=30)
        f = sock.makefile("rb")
        assert _reply(f).startswith("220")

        def command(line: str, want: str) -> None:
            sock.sendall(line.encode() + b"\r\n")
            reply = _reply(f)
            assert reply.startswith(want), (line, reply)

        command("EHLO app.example.test", "250")
        plain = base64.b64encode(f"\0acme\0{PASSWORD}".encode()).decode()
        command(f"AUTH PLAIN {plain}", "235")
        command("MAIL FROM:<app@acme.example.test>", "250")
        command("RCPT TO:<bob@example.test>", "250")
        command("DATA", "354")
        sock.sendall(message(subject="hung up") + b".\r\n")
        f.close()
        sock.close()  # at once: the 250 can never reach this client

        assert wait_until(lambda: CLIENT_GONE_NOTE in relayd.log_text()), relayd.log_text()[-3000:]
        [line] = [x for x in relayd.log_text().splitlines() if CLIENT_GONE_NOTE in x]
        assert ": accepted account=acme from=<app@acme.example.test> nrcpt=1" in line
        assert "it will send this message again" in line
        # accepted means accepted: the message is delivered like any other
        assert wait_until(lambda: sink.handler.count() == 1)
        assert b"Subject: hung up" in sink.messages[0].data


def test_accepted_line_of_a_client_that_waits_for_the_250_has_no_note(tmp_path: Path, sink: Sink) -> None:
    with Relayd(tmp_path, routes={"example.test": sink.port}) as relayd:
        code, resp = relayd.submit(message(), to=["bob@example.test"])
        assert code == 250, resp
        queue_id = resp.decode().rsplit(" ", 1)[1]
        assert wait_until(lambda: f"{queue_id}: accepted account=acme" in relayd.log_text())
        [line] = [x for x in relayd.log_text().splitlines() if f"{queue_id}: accepted" in x]
        assert CLIENT_GONE_NOTE not in line


def test_auth_leaves_no_deprecation_warning_in_the_log(tmp_path: Path, sink: Sink) -> None:
    with Relayd(tmp_path, routes={"example.test": sink.port}) as relayd:
        for _ in range(2):
            code, resp = relayd.submit(message(), to=["bob@example.test"])  # AUTH PLAIN each time
            assert code == 250, resp
        assert wait_until(lambda: relayd.log_text().count("authenticated as acme") == 2)
        assert wait_until(lambda: relayd.log_text().count(": accepted account=acme") == 2)
    log = relayd.log_text()
    assert "deprecated" not in log.lower(), [x for x in log.splitlines() if "deprecated" in x.lower()]


def test_inbound_listener_is_logged_at_start(tmp_path: Path) -> None:
    with Relayd(tmp_path, routes={"example.test": 9}) as relayd:
        want = f"inbound listening on ('127.0.0.1', {relayd.inbound_port})"
        assert wait_until(lambda: "relayd ready" in relayd.log_text())
        log = relayd.log_text()
        assert want in log, log
        assert f"submission listening on ('127.0.0.1', {relayd.port})" in log


# --- the example config -------------------------------------------------------------------------------------


def test_example_config_describes_what_exists() -> None:
    text = (ROOT / "conf" / "relayd.toml").read_text()
    assert "later release" not in text.lower()
    assert "coming in" not in text.lower()
