"""``bare_newline``: lines ending in a bare LF, as Python's ``smtplib.sendmail(..., msg.as_bytes())`` sends
them, are taken as CRLF lines (``normalize``, the default) or refuse the message (``reject``).

Real relayd processes and a real sink on loopback; smtplib for what apps do, raw bytes where smtplib would
dot-stuff or fix what is being tested. The smuggling payloads themselves run in both modes in
``tests/test_smuggling.py``.
"""

from __future__ import annotations

import re
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.harness import PASSWORD, Received, Relayd, Sink, split_delivered, wait_until

ROOT = Path(__file__).resolve().parent.parent
BARE = re.compile(rb"(?<!\r)\n|\r(?!\n)")
INBOUND_RCPT = "postmaster@bounces.example.test"


def _relayd(tmp: Path, sink: Sink, mode: str | None) -> Relayd:
    """relayd delivering to ``sink``; ``mode`` set in [submission] and [inbound], or left to the default."""
    if mode is None:
        return Relayd(tmp, routes={"example.test": sink.port})
    relayd = Relayd(tmp, routes={"example.test": sink.port}, submission_extra=f'bare_newline = "{mode}"')
    text = relayd.config.read_text()
    inbound = 'domains = ["bounces.example.test"]\n'
    assert text.count(inbound) == 1
    relayd.config.write_text(text.replace(inbound, f'{inbound}bare_newline = "{mode}"\n'))
    return relayd


@pytest.fixture(scope="module")
def normalizing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Relayd, Sink]]:
    """relayd with no ``bare_newline`` in its config: the default must be normalize."""
    with Sink() as sink, _relayd(tmp_path_factory.mktemp("normalize"), sink, None) as relayd:
        yield relayd, sink


@pytest.fixture(scope="module")
def rejecting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Relayd, Sink]]:
    with Sink() as sink, _relayd(tmp_path_factory.mktemp("reject"), sink, "reject") as relayd:
        yield relayd, sink


def _lf_message(marker: str, body: str) -> EmailMessage:
    msg = EmailMessage()  # default policy: as_bytes() ends every line with a bare LF
    msg["From"] = "App <app@acme.example.test>"
    msg["To"] = "Bob <bob@example.test>"
    msg["Subject"] = marker
    msg["Date"] = "Mon, 07 Dec 2026 12:00:00 +0000"
    msg["Message-ID"] = f"<{marker}@acme.example.test>"
    msg.set_content(body)
    return msg


def _sendmail(relayd: Relayd, raw: bytes, rcpt: str = "bob@example.test") -> None:
    with relayd.smtp() as s:
        s.login("acme", PASSWORD)
        s.sendmail("app@acme.example.test", [rcpt], raw)


def _raw_data(
    port: int, raw: bytes, *, rcpt: str = "bob@example.test", login: bool = True
) -> tuple[int, bytes]:
    """One transaction whose DATA is ``raw`` then ``CRLF . CRLF``, sent as is (no dot-stuffing, no line-end
    fixing, unlike smtplib's ``data``); the reply to it."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        if login:
            s.login("acme", PASSWORD)
        else:
            s.ehlo()
        assert s.mail("app@acme.example.test" if login else "")[0] == 250
        assert s.rcpt(rcpt)[0] == 250
        s.putcmd("DATA")
        assert s.getreply()[0] == 354
        s.send(raw + b"\r\n.\r\n")
        code, resp = s.getreply()
        assert s.noop()[0] == 250  # the session goes on either way
        return code, resp


def _delivered(sink: Sink, marker: str) -> Received:
    assert wait_until(lambda: any(marker.encode() in m.data for m in sink.messages)), marker
    got = [m for m in sink.messages if marker.encode() in m.data]
    assert len(got) == 1
    return got[0]


def _marker() -> str:
    return f"barelf-{time.time_ns()}"


def test_smtplib_sendmail_with_lf_only_lines_is_delivered_intact_with_crlf_only(
    normalizing: tuple[Relayd, Sink],
) -> None:
    relayd, sink = normalizing
    marker = _marker()
    msg = _lf_message(marker, "First line.\nSecond line, with some more words.\n\nAfter an empty line.\n")
    raw = msg.as_bytes()
    assert b"\r" not in raw and raw.count(b"\n") > 10  # what smtplib really sends: LF-only lines
    _sendmail(relayd, raw)
    got = _delivered(sink, marker)
    assert BARE.search(got.data) is None, "a bare CR or LF left relayd"
    _, kept, body = split_delivered(got.data)
    head, _, sent_body = raw.partition(b"\n\n")
    for field in head.split(b"\n"):  # every header field the app wrote arrives, now ending in CRLF
        assert field + b"\r\n" in kept, field
    expected = sent_body.replace(b"\n", b"\r\n")
    assert body.startswith(expected), body  # the text as sent; relayd's footer and imprint come after it
    assert b"ACME Ltd, 1 Test Street" in body[len(expected) :]


def test_dot_lines_sent_by_smtplib_arrive_as_content(normalizing: tuple[Relayd, Sink]) -> None:
    relayd, sink = normalizing
    marker = _marker()
    text = "before\n.\n.foo\n..two dots\nafter the dots\n"
    _sendmail(relayd, _lf_message(marker, text).as_bytes())  # smtplib dot-stuffs: "..", "..foo", "...two"
    got = _delivered(sink, marker)  # the sink dot-unstuffs what relayd's client dot-stuffed
    assert BARE.search(got.data) is None
    _, _, body = split_delivered(got.data)
    assert body.startswith(text.replace("\n", "\r\n").encode()), body  # nothing cut at the "." line


def test_a_dot_line_after_a_bare_lf_is_content_and_never_ends_the_message(
    normalizing: tuple[Relayd, Sink],
) -> None:
    relayd, sink = normalizing
    for ending in (b"\n.\r\n", b"\n.\n", b"\r\n.\n"):
        marker = _marker()
        head = f"From: <app@acme.example.test>\r\nSubject: {marker}\r\n\r\n".encode()
        code, resp = _raw_data(relayd.port, head + b"one" + ending + b"two\r\nthree")
        assert (code, resp[:5]) == (250, b"2.0.0"), (ending, resp)
        got = _delivered(sink, marker)
        _, _, body = split_delivered(got.data)
        # an unstuffed "." line is kept as "." (RFC 5321 4.5.2 only unstuffs a dot with more after it)
        assert body.startswith(b"one\r\n.\r\ntwo\r\nthree\r\n"), (ending, body)
        assert BARE.search(got.data) is None


def test_lf_only_message_longer_than_the_line_limit_is_read_line_by_line(
    normalizing: tuple[Relayd, Sink],
) -> None:
    relayd, sink = normalizing
    marker = _marker()
    body = b"".join(b"line %d of a message with no CR at all\n" % i for i in range(2000))  # ~80 KB, no CRLF
    head = f"From: <app@acme.example.test>\nSubject: {marker}\n\n".encode()
    code, resp = _raw_data(relayd.port, head + body + b"last")
    assert code == 250, resp
    _, _, delivered = split_delivered(_delivered(sink, marker).data)
    assert delivered.startswith(body.replace(b"\n", b"\r\n") + b"last\r\n")


def test_normalized_lines_keep_the_998_octet_limit(normalizing: tuple[Relayd, Sink]) -> None:
    relayd, sink = normalizing
    marker = _marker()
    head = f"From: <app@acme.example.test>\nSubject: {marker}\n\n".encode()
    code, resp = _raw_data(relayd.port, head + b"y" * 999 + b"\nshort")
    assert (code, resp[:5]) == (554, b"5.6.0"), resp
    assert b"998" in resp
    code, resp = _raw_data(relayd.port, head + b"y" * 998 + b"\nshort")
    assert code == 250, resp
    _delivered(sink, marker)  # the 998-octet one


def test_bare_cr_is_refused_in_normalize_mode_too(normalizing: tuple[Relayd, Sink]) -> None:
    relayd, sink = normalizing
    before = len(sink.messages)
    for raw in (
        b"Subject: x\r\n\r\nbare\rCR",
        b"Subject: x\n\nbare\rCR\nafter",
        b"Subject: x\r\n\r\ncr\r.\rdot",
    ):
        code, resp = _raw_data(relayd.port, raw)
        assert (code, resp[:5]) == (554, b"5.5.2"), (raw, resp)
    time.sleep(0.3)
    assert len(sink.messages) == before


def test_nul_is_refused_in_normalize_mode_too(normalizing: tuple[Relayd, Sink]) -> None:
    relayd, _ = normalizing
    code, resp = _raw_data(relayd.port, b"Subject: x\n\nnul\x00here\n")
    assert (code, resp[:5]) == (554, b"5.6.0"), resp


def test_reject_mode_refuses_smtplib_lf_only_lines_with_554_5_5_2(rejecting: tuple[Relayd, Sink]) -> None:
    relayd, sink = rejecting
    before = len(sink.messages)
    with pytest.raises(smtplib.SMTPDataError) as err:
        _sendmail(relayd, _lf_message(_marker(), "hello\n").as_bytes())
    assert (err.value.smtp_code, err.value.smtp_error[:5]) == (554, b"5.5.2")
    time.sleep(0.3)
    assert len(sink.messages) == before


def test_inbound_normalizes_bare_lf_by_default_and_rejects_when_told(
    normalizing: tuple[Relayd, Sink], rejecting: tuple[Relayd, Sink]
) -> None:
    raw = b"From: <mailer-daemon@example.net>\nSubject: a report\n\nsome text\n.\nmore\n"
    code, resp = _raw_data(normalizing[0].inbound_port, raw, rcpt=INBOUND_RCPT, login=False)
    assert code == 250, resp
    code, resp = _raw_data(rejecting[0].inbound_port, raw, rcpt=INBOUND_RCPT, login=False)
    assert (code, resp[:5]) == (554, b"5.5.2"), resp


def test_inbound_normalized_lines_keep_the_64_kib_limit(normalizing: tuple[Relayd, Sink]) -> None:
    port = normalizing[0].inbound_port
    head = b"From: <mailer-daemon@example.net>\nSubject: long\n\n"
    code, resp = _raw_data(port, head + b"z" * 65536 + b"\nend", rcpt=INBOUND_RCPT, login=False)
    assert code == 250, resp
    code, resp = _raw_data(port, head + b"z" * 65537 + b"\nend", rcpt=INBOUND_RCPT, login=False)
    assert (code, resp[:5]) == (554, b"5.6.0"), resp


def test_bare_newline_is_validated_and_documented(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[submission]\nbare_newline = "fix"\n\n[inbound]\nbare_newline = true\n')
    out = subprocess.run(
        [sys.executable, "-m", "relayd", "check-config", "--config", str(bad)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 2
    assert f"{bad}: submission.bare_newline: Input should be 'normalize' or 'reject'" in out.stderr
    assert f"{bad}: inbound.bare_newline: Input should be 'normalize' or 'reject'" in out.stderr
    example = (ROOT / "conf" / "relayd.toml").read_text()
    sections = example.split("\n[")
    for name in ("submission]", "inbound]"):
        (section,) = [s for s in sections if s.startswith(name)]
        assert '\n# bare_newline = "normalize"\n' in section, name
