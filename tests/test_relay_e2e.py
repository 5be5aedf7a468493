"""End to end through real peers: smtplib and swaks submit, aiosmtpd and Postfix's smtp-sink receive."""

from __future__ import annotations

import email
import re
import subprocess
from pathlib import Path

from relayd.core.tokens import verify_token, verp_token
from tests.harness import PASSWORD, PostfixSink, Relayd, Sink, message, split_delivered, wait_until


def _secret(tmp: Path) -> bytes:
    return bytes.fromhex((tmp / "secret.key").read_text().strip())


def _app_fields_intact(delivered: bytes, sent: bytes) -> tuple[dict[str, list[bytes]], bytes, bytes]:
    """Assert every header field the application wrote arrived byte for byte, in order, and relayd added
    exactly its own; return (the added fields, the delivered body, the body as sent)."""
    added, headers, body = split_delivered(delivered)
    sent_head, _, sent_body = sent.partition(b"\r\n\r\n")
    assert headers == sent_head + b"\r\n"
    assert sorted(added) == [
        "feedback-id",
        "list-unsubscribe",
        "list-unsubscribe-post",
        "received",
        "x-relayd-id",
    ]
    return added, body, sent_body


def test_smtplib_message_arrives_byte_exact_with_verp_sender(tmp_path: Path, sink: Sink) -> None:
    body = (
        "Line one.\r\n.leading dot survives\r\n..two dots\r\nUnicode: gr\u00fc\u00dfe\r\n"
        + "x" * 900
        + "\r\n"
    )
    msg = message("byte exact", body)
    with Relayd(tmp_path, routes={"example.test": sink.port}) as relayd:
        code, resp = relayd.submit(msg, to=["bob@example.test"])
        assert code == 250 and re.match(rb"2\.0\.0 Ok: queued as [a-z2-7]{16}$", resp), resp
        assert wait_until(lambda: sink.handler.count() == 1)
    got = sink.messages[0]
    _, delivered_body, sent_body = _app_fields_intact(got.data, msg)
    # the body arrives byte for byte, followed only by the unsubscribe footer and imprint
    assert delivered_body.startswith(sent_body)
    footer = delivered_body[len(sent_body) :].decode()
    url = rf"http://127\.0\.0\.1:{relayd.http_port}/u/[a-z0-9-]+"
    assert re.fullmatch(rf"\r\n\r\n-- \r\nUnsubscribe: {url}\r\nACME Ltd, 1 Test Street\r\n", footer), footer
    assert got.rcpt_tos == ["bob@example.test"]
    token = verp_token(got.mail_from)
    assert got.mail_from.endswith("@bounces.example.test") and token is not None
    ref = verify_token(_secret(tmp_path), "verp", token, "bob@example.test")
    assert ref is not None and ref.queue_id == resp.decode().rsplit(" ", 1)[1]
    assert verify_token(_secret(tmp_path), "verp", token, "mallory@example.test") is None


def test_each_recipient_gets_its_own_verp_transaction(tmp_path: Path, sink: Sink) -> None:
    rcpts = ["a@example.test", "b@example.test", "c@example.test"]
    with Relayd(tmp_path, routes={"example.test": sink.port}) as relayd:
        code, _ = relayd.submit(message(), to=rcpts)
        assert code == 250
        assert wait_until(lambda: sink.handler.count() == 3)
    by_rcpt = {m.rcpt_tos[0]: m for m in sink.messages}
    assert sorted(by_rcpt) == rcpts
    senders = {m.mail_from for m in sink.messages}
    assert len(senders) == 3, "VERP: one return path per recipient"
    for rcpt, m in by_rcpt.items():
        tok = verp_token(m.mail_from)
        assert tok is not None and verify_token(_secret(tmp_path), "verp", tok, rcpt) is not None


def test_swaks_submission_to_postfix_smtp_sink(tmp_path: Path) -> None:
    with PostfixSink() as psink, Relayd(tmp_path, routes={"example.test": psink.port}) as relayd:
        body = "Sent by swaks.\nSecond line.\n"
        data = (
            "From: app@acme.example.test\nTo: carol@example.test\nSubject: via swaks\n"
            "Message-ID: <swaks-1@acme.example.test>\n\n" + body
        )
        out = subprocess.run(
            [
                "swaks",
                "--server",
                f"127.0.0.1:{relayd.port}",
                "--from",
                "app@acme.example.test",
                "--to",
                "carol@example.test",
                "--auth",
                "PLAIN",
                "--auth-user",
                "acme",
                "--auth-password",
                PASSWORD,
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
        # smtp-sink creates its dump file when the transaction starts: read it once relayd has the 250
        assert wait_until(lambda: "status=delivered" in relayd.log_text())
        assert wait_until(lambda: len(psink.dumps()) == 1)
        dump = psink.dumps()[0].decode()
    mail_args = re.search(r"^X-Mail-Args: (.*)$", dump, re.M)
    assert mail_args and re.match(
        r"<bounce\+[a-z2-7]{16}-0-[a-z2-7]{16}@bounces\.example\.test>", mail_args.group(1)
    )
    assert re.search(r"^X-Rcpt-Args: <carol@example.test>", dump, re.M)
    parsed = email.message_from_string(dump.split("(smtp-sink)", 1)[1].split("\n", 2)[2])
    assert parsed["Subject"] == "via swaks"
    assert parsed["Message-ID"] == "<swaks-1@acme.example.test>"
    payload = parsed.get_payload()
    assert payload.startswith(body)  # the body as sent, then the footer relayd appends
    assert (
        f"Unsubscribe: http://127.0.0.1:{relayd.http_port}/u/" in payload
        and "ACME Ltd, 1 Test Street" in payload
    )
    assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_delivery_survives_restart_and_graceful_stop(tmp_path: Path, sink: Sink) -> None:
    """Mail queued while the receiving side is down is delivered after a clean restart of relayd, and the
    copy made then (from the stored message: the rewrite kept in memory is gone) is what a first attempt
    makes: the application's fields and body byte for byte, relayd's fields, the footer with this
    recipient's link, a trace token that verifies for this recipient."""
    with Sink() as down:
        port = down.port
    relayd = Relayd(tmp_path, routes={"example.test": port}, queue_extra="")
    relayd.start()
    msg = message("queued while down", "Body line.\r\n.dot line\r\n")
    code, resp = relayd.submit(msg, to=["dave@example.test"])
    assert code == 250
    queue_id = resp.decode().rsplit(" ", 1)[1]
    assert relayd.stop() == 0
    relayd.config.write_text(relayd.config.read_text().replace(f"127.0.0.1:{port}", f"127.0.0.1:{sink.port}"))
    with relayd:
        assert wait_until(lambda: sink.handler.count() == 1)
    [got] = sink.messages
    assert got.rcpt_tos == ["dave@example.test"]
    added, body, sent_body = _app_fields_intact(got.data, msg)
    assert body.startswith(sent_body)
    [link] = re.findall(rb"Unsubscribe: (http://\S+/u/([a-z0-9-]+))\r\n", body[len(sent_body) :])
    assert link[0] in added["list-unsubscribe"][0]
    assert verify_token(_secret(tmp_path), "unsub", link[1].decode(), "dave@example.test") is not None
    trace = added["x-relayd-id"][0].split(b":", 1)[1].strip().decode()
    ref = verify_token(_secret(tmp_path), "trace", trace, "dave@example.test")
    assert ref is not None and ref.queue_id == queue_id
