"""The complaining recipient in every complaint-report layout that feedback loops send.

Each case builds one report the way a provider publishes it (RFC 5965 with
Original-Rcpt-To, without it and with the original attached as ``message/rfc822`` or only
its headers as ``text/rfc822-headers``, base64 or not, Yahoo's and AOL's ARF, Microsoft's
JMRP in its ARF and its older forwarded form) and asserts that ``parse`` names the
recipient, LF and CRLF alike; redacting reporters give None.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import pytest

from relayd.reports.arf import parse

ORIGINAL_HEADERS = """\
Received: from mta1.acme.example.test (mta1.acme.example.test [192.0.2.10])
Return-Path: <bounce+tok@bounces.acme.example.test>
From: Acme News <news@acme.example.test>
{to}Subject: December offers
Message-ID: <m1@acme.example.test>
X-Relayd-ID: r1.abcdef
"""


def _arf(
    fields: str, original: str, original_type: str = "message/rfc822", encoding: str | None = None
) -> bytes:
    body = original if encoding is None else base64.encodebytes(original.encode()).decode()
    cte = f"Content-Transfer-Encoding: {encoding}\n" if encoding else ""
    return f"""\
From: Feedback Loop <fbl@isp.example>
To: fbl@acme.example.test
Subject: Abuse report
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report; boundary="B"

--B
Content-Type: text/plain

This is an email abuse report for an email message received from IP 192.0.2.10.
--B
Content-Type: message/feedback-report

{fields}
--B
Content-Type: {original_type}
{cte}
{body}
--B--
""".encode()


def _original(to: str, body: bool = True) -> str:
    headers = ORIGINAL_HEADERS.format(to=to)
    return headers + ("\nBuy now\n" if body else "")


RFC5965_FIELDS = """\
Feedback-Type: abuse
User-Agent: SomeGenerator/1.0
Version: 1
Source-IP: 192.0.2.10
Arrival-Date: Thu, 8 Mar 2005 14:00:00 EDT"""


AOL_FIELDS = (
    "Feedback-Type: abuse\nUser-Agent: AOL SComp\nVersion: 0.1\nReceived-Date: Tue, 1 Dec 2026 10:00:00"
)


@dataclass(frozen=True)
class Variant:
    name: str
    raw: bytes
    expected: str | None


JMRP_ORIGINAL = _original("To: someone@acme.example.test\nX-HmXmrOriginalRecipient: reader@hotmail.example\n")

VARIANTS = [
    Variant(
        "rfc5965-original-rcpt-to",
        _arf(
            RFC5965_FIELDS + "\nOriginal-Rcpt-To: <Reader@Isp.Example>", _original("To: list@isp.example\n")
        ),
        "reader@isp.example",
    ),
    Variant(
        "rfc5965-original-rcpt-to-typed",
        _arf(RFC5965_FIELDS + "\nOriginal-Rcpt-To: rfc822; reader@isp.example", _original("")),
        "reader@isp.example",
    ),
    Variant(
        "rfc5965-to-of-attached-message",
        _arf(RFC5965_FIELDS, _original('To: "Reader, A." <reader@isp.example>\n')),
        "reader@isp.example",
    ),
    Variant(
        "rfc5965-rfc822-headers-only",
        _arf(RFC5965_FIELDS, _original("To: reader@isp.example\n", body=False), "text/rfc822-headers"),
        "reader@isp.example",
    ),
    Variant(
        "rfc5965-rfc822-headers-base64",
        _arf(
            RFC5965_FIELDS, _original("To: reader@isp.example\n", body=False), "text/rfc822-headers", "base64"
        ),
        "reader@isp.example",
    ),
    Variant(
        "rfc5965-undisclosed-to-delivered-to",
        _arf(
            RFC5965_FIELDS,
            _original("To: undisclosed-recipients:;\nDelivered-To: reader@isp.example\n"),
        ),
        "reader@isp.example",
    ),
    Variant(
        "rfc5965-undisclosed-to-x-original-to",
        _arf(RFC5965_FIELDS, _original("To: undisclosed-recipients:;\nX-Original-To: reader@isp.example\n")),
        "reader@isp.example",
    ),
    Variant(
        # Yahoo's Complaint Feedback Loop: RFC 5965, its own User-Agent, the original attached.
        "yahoo-cfl",
        _arf(
            "Feedback-Type: abuse\nUser-Agent: Yahoo!-Mail-Feedback/2.0\nVersion: 0.1\n"
            "Original-Mail-From: <bounce+tok@bounces.acme.example.test>\n"
            "Arrival-Date: Tue, 1 Dec 2026 10:00:00 +0000\nReported-Domain: acme.example.test\n"
            "Authentication-Results: mta.yahoo.example; dkim=pass header.d=acme.example.test",
            _original("To: reader@yahoo.example\n"),
        ),
        "reader@yahoo.example",
    ),
    Variant(
        # AOL's feedback loop as published: RFC 5965 with the recipient hidden in the original.
        "aol-redacted",
        _arf(
            AOL_FIELDS,
            _original("To: redacted@aol.example\n"),
        ),
        None,
    ),
    Variant(
        "aol-unredacted",
        _arf(
            AOL_FIELDS,
            _original("To: reader@aol.example\n"),
        ),
        "reader@aol.example",
    ),
    Variant(
        # Microsoft JMRP in ARF: the recipient in X-HmXmrOriginalRecipient of the original.
        "microsoft-jmrp-arf",
        _arf(
            "Feedback-Type: abuse\nUser-Agent: Microsoft JMRP\nVersion: 1.0\nSource-IP: 192.0.2.10",
            _original(
                "To: news-list@acme.example.test\nX-HmXmrOriginalRecipient: <reader@outlook.example>\n"
            ),
        ),
        "reader@outlook.example",
    ),
    Variant(
        # Hotmail's older JMRP forward: multipart/mixed, "complaint about message from <ip>".
        "hotmail-jmrp-forward",
        f"""\
From: staff@hotmail.example
To: fbl@acme.example.test
Subject: complaint about message from 192.0.2.10
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="J"

--J
Content-Type: text/plain

This is a complaint about a message.
--J
Content-Type: message/rfc822

{JMRP_ORIGINAL}
--J--
""".encode(),
        "reader@hotmail.example",
    ),
]


@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_original_recipient_found(variant: Variant, crlf: bool) -> None:
    raw = variant.raw.replace(b"\n", b"\r\n") if crlf else variant.raw
    report = parse(raw)
    assert report.is_arf
    assert report.original_rcpt == variant.expected
    assert report.relayd_id == "r1.abcdef"
