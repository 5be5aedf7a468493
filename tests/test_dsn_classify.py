"""Unit tests of the DSN classifier: reason table, status preference, parsers, contract."""

from __future__ import annotations

import dataclasses

import pytest

from relayd.reports.dsn import BouncedRecipient, DsnReport, classify, classify_reply, rfc3464, smtptext
from relayd.reports.dsn.reasons import Evidence, decide, is_hard

DSN = b"""\
From: Mail Delivery System <MAILER-DAEMON@mx.example.net>
To: bounce+abc@bounces.example.test
Subject: Undelivered Mail Returned to Sender
Message-ID: <report-1@mx.example.net>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B"

--B
Content-Type: text/plain

I'm sorry to have to inform you that your message could not be delivered.

--B
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.net

Final-Recipient: rfc822; Someone@Example.ORG
Original-Recipient: rfc822; someone@example.org
Action: failed
Status: 5.0.0
Remote-MTA: dns; mx.example.org
Diagnostic-Code: smtp; 550 5.1.1 <someone@example.org>: Recipient address
    rejected: User unknown in local recipient table

Final-Recipient: rfc822; full@example.org
Action: delayed
Status: 4.2.2
Diagnostic-Code: smtp; 452 4.2.2 Mailbox full

--B
Content-Type: text/rfc822-headers

From: news@acme.example.test
To: someone@example.org
Message-ID: <orig-1@acme.example.test>
X-Relayd-ID: tok123

--B--
"""


def test_rfc3464_report_fields() -> None:
    report = classify(DSN)
    assert report.is_dsn
    assert report.message_id == "<report-1@mx.example.net>"
    assert report.original_message_id == "<orig-1@acme.example.test>"
    assert report.original_headers is not None and b"X-Relayd-ID: tok123" in report.original_headers
    first, second = report.recipients
    assert first.address == "someone@example.org"
    assert (first.action, first.status, first.reason, first.hard) == ("failed", "5.1.1", "userunknown", True)
    assert first.reply_code == "550"
    assert first.remote_mta == "mx.example.org"
    assert (second.action, second.reason, second.hard) == ("delayed", "mailboxfull", False)


def test_crlf_gives_the_same_answer() -> None:
    assert classify(DSN.replace(b"\n", b"\r\n")) == classify(DSN)


def test_report_is_frozen() -> None:
    report = classify(DSN)
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.is_dsn = False  # type: ignore[misc]
    assert isinstance(report, DsnReport)
    assert all(isinstance(r, BouncedRecipient) for r in report.recipients)


def test_delivered_report_is_not_hard() -> None:
    raw = DSN.replace(b"Action: failed", b"Action: delivered").replace(b"Status: 5.0.0", b"Status: 2.0.0")
    first = classify(raw).recipients[0]
    assert (first.action, first.reason, first.hard) == ("delivered", "delivered", False)


def test_exim_text_bounce() -> None:
    raw = b"""\
From: Mail Delivery System <Mailer-Daemon@mx.example.net>
To: sender@example.test
Subject: Mail delivery failed: returning message to sender

A message that you sent could not be delivered to one or more of its
recipients. This is a permanent error. The following address(es) failed:

  gone@example.org
    SMTP error from remote mail server after RCPT TO:<gone@example.org>:
    host mx.example.org [192.0.2.1]: 550 5.1.1 <gone@example.org>... User unknown
  full@example.org
    SMTP error from remote mail server after RCPT TO:<full@example.org>:
    host mx.example.org [192.0.2.1]: 552 5.2.2 <full@example.org>... Mailbox full

------ This is a copy of the message, including all the headers. ------

From: sender@example.test
To: gone@example.org, full@example.org
Message-ID: <orig@example.test>
X-Relayd-ID: abc

body
"""
    report = classify(raw)
    assert [(r.address, r.reason, r.hard) for r in report.recipients] == [
        ("gone@example.org", "userunknown", True),
        ("full@example.org", "mailboxfull", False),
    ]
    assert report.original_message_id == "<orig@example.test>"
    assert report.original_headers is not None and b"X-Relayd-ID: abc" in report.original_headers


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00\xff\xfe garbage",
        b"Subject: hello\n\nJust a note, see you tomorrow.\n",
        b"From: a@example.org\nAuto-Submitted: auto-replied\nSubject: Out of office\n\n"
        b"I am away until Monday.\n",
    ],
    ids=["empty", "binary", "plain-mail", "vacation"],
)
def test_non_bounces(raw: bytes) -> None:
    report = classify(raw)
    assert not report.is_dsn
    assert report.recipients == ()


@pytest.mark.parametrize(
    ("code", "enhanced", "text", "reason", "hard"),
    [
        (550, "5.1.1", "<a@b.example>: Recipient address rejected: User unknown", "userunknown", True),
        (550, None, "No such user here", "filtered", False),
        (552, "5.2.2", "Mailbox full", "mailboxfull", False),
        (554, "5.7.1", "Service unavailable; client host blocked using zen.spamhaus.org", "blocked", False),
        (550, "5.7.26", "This message does not pass authentication checks", "authfailure", False),
        (421, "4.7.0", "Try again later, closing connection.", "securityerror", False),
        (556, "5.1.10", "Recipient address has null MX", "notaccept", True),
        (450, "4.3.2", "System not accepting network messages", "notaccept", False),
        (550, "5.1.6", "Mailbox has moved", "hasmoved", True),
        (550, "5.1.2", "Host unknown", "hostunknown", True),
        (552, "5.3.4", "Message size exceeds fixed limit", "mesgtoobig", False),
        (550, "5.7.1", "Message rejected as spam", "spamdetected", False),
        (451, "4.7.1", "Please try again slower", "speeding", False),
    ],
)
def test_classify_reply(code: int, enhanced: str | None, text: str, reason: str, hard: bool) -> None:
    assert classify_reply(code, enhanced, text) == (reason, hard)


def test_classify_reply_knows_the_command() -> None:
    assert classify_reply(550, None, "No such user here", command="RCPT") == ("userunknown", True)
    assert classify_reply(550, None, "No such user here", command="DATA") == ("filtered", False)


def test_filter_after_data_is_not_user_unknown() -> None:
    # sisimai's rule: "user unknown" answering DATA comes from a content filter.
    ev = Evidence(status="5.0.0", reply_code="550", diagnostic="550 User unknown", command="DATA")
    assert decide(ev) == "filtered"
    assert decide(dataclasses.replace(ev, command="RCPT")) == "userunknown"


def test_hard_only_for_address_reasons() -> None:
    assert is_hard("userunknown", "5.1.1", "550")
    assert not is_hard("notaccept", "4.3.2", "450")
    assert is_hard("notaccept", "5.1.10", "556")
    for reason in ("mailboxfull", "blocked", "spamdetected", "filtered", "expired", "undefined"):
        assert not is_hard(reason, "5.0.0", "550")


def test_rfc3464_parse_runs_blocks_together() -> None:
    text = (
        "Reporting-MTA: dns; a.example\n"
        "Final-Recipient: rfc822; one@example.org\nAction: failed\nStatus: 5.2.2\n"
        "Final-Recipient: rfc822; two@example.org\nAction: error\nStatus: 5.1.1 (unknown)\n"
    )
    per_message, records = rfc3464.parse(text)
    assert per_message["reporting-mta"] == "dns; a.example"
    assert [(r.address, r.action, r.status) for r in records] == [
        ("one@example.org", "failed", "5.2.2"),
        ("two@example.org", "failed", "5.1.1"),
    ]


def test_smtptext_ignores_ip_addresses() -> None:
    text = "host mx.example.org [192.0.2.153]: 550 5.1.1 <a@b>... User unknown (in reply to RCPT TO command)"
    assert smtptext.enhanced_code(text) == "5.1.1"
    assert smtptext.reply_code(text) == "550"
    assert smtptext.smtp_command(text) == "RCPT"
    assert smtptext.enhanced_code("connect to 52.101.42.17 failed") is None
