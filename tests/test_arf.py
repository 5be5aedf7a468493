"""ARF complaint parsing over the corpus (LF and CRLF) and a few synthetic reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from relayd.reports.arf import ArfReport, parse
from tests.test_dsn_corpus import CORPUS, _labels, _to_crlf

pytestmark = pytest.mark.skipif(not (CORPUS / "labels.jsonl").exists(), reason="corpus not present")

ARF_LABELS = [label for label in _labels() if label["kind"] == "arf"]


def _expected_rcpts(label: dict[str, Any]) -> set[str]:
    names = set(label.get("original_rcpt") or [])
    for rcpt in label["recipients"]:
        if rcpt["address"] in names:
            names |= set(rcpt.get("aliases", []))
    return names


@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
@pytest.mark.parametrize("label", ARF_LABELS, ids=lambda label: Path(label["file"]).stem)
def test_corpus_sample(label: dict[str, Any], crlf: bool) -> None:
    raw = (CORPUS / label["file"]).read_bytes()
    report = parse(_to_crlf(raw) if crlf else raw)
    assert report.is_arf
    assert report.feedback_type == label["feedback_type"]
    expected = _expected_rcpts(label)
    if expected:
        assert report.original_rcpt in expected
    else:
        assert report.original_rcpt is None


def test_bounces_and_other_mail_are_not_arf() -> None:
    for label in _labels():
        if label["kind"] == "arf":
            continue
        assert not parse((CORPUS / label["file"]).read_bytes()).is_arf, label["file"]


REPORT = b"""\
From: fbl@isp.example
To: abuse@acme.example.test
Subject: FW: complaint
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report; boundary="X"

--X
Content-Type: text/plain

This is an abuse report.
--X
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: SomeGenerator/1.0
Version: 1
Original-Mail-From: <bounce+tok@bounces.acme.example.test>
Original-Rcpt-To: <Reader@Isp.Example>
Arrival-Date: Thu, 8 Mar 2005 14:00:00 EDT
Reported-Domain: acme.example.test
Source-IP: 192.0.2.10

--X
Content-Type: message/rfc822

From: news@acme.example.test
To: reader@isp.example
Subject: News
Message-ID: <m1@acme.example.test>
X-Relayd-ID: r1.abc
 def

Hello
--X--
"""


def test_synthetic_report_all_fields() -> None:
    report = parse(REPORT)
    assert report == ArfReport(
        is_arf=True,
        feedback_type="abuse",
        original_rcpt="reader@isp.example",
        original_mail_from="bounce+tok@bounces.acme.example.test",
        reported_domain="acme.example.test",
        source_ip="192.0.2.10",
        arrival_date="Thu, 8 Mar 2005 14:00:00 EDT",
        original_message_id="<m1@acme.example.test>",
        relayd_id="r1.abcdef",
        original_headers=report.original_headers,
        user_agent="SomeGenerator/1.0",
        format="rfc5965",
    )
    assert report.original_headers is not None and report.original_headers.startswith(b"From: news@")
    assert parse(REPORT.replace(b"\n", b"\r\n")) == report


def test_hidden_recipient_is_none() -> None:
    raw = REPORT.replace(b"Original-Rcpt-To: <Reader@Isp.Example>\n", b"").replace(
        b"To: reader@isp.example", b"To: undisclosed-recipients:;"
    )
    report = parse(raw)
    assert report.is_arf
    assert report.original_rcpt is None


def test_removal_recipient_is_used() -> None:
    raw = REPORT.replace(b"Original-Rcpt-To: <Reader@Isp.Example>", b"Removal-Recipient: gone@isp.example")
    assert parse(raw).original_rcpt == "gone@isp.example"


def test_plain_forwarded_complaint() -> None:
    raw = b"""\
From: Reader <reader@isp.example>
To: abuse@acme.example.test
Subject: Spam from your network
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="Y"

--Y
Content-Type: text/plain

Please stop sending me this.
--Y
Content-Type: message/rfc822

From: news@acme.example.test
To: reader@isp.example
X-Relayd-ID: r2.xyz

Buy now
--Y--
"""
    report = parse(raw)
    assert (report.is_arf, report.format, report.feedback_type) == (True, "forwarded", "abuse")
    assert report.original_rcpt == "reader@isp.example"
    assert report.relayd_id == "r2.xyz"


def test_cli_json(tmp_path: Path) -> None:
    path = tmp_path / "report.eml"
    path.write_bytes(REPORT)
    proc = subprocess.run(
        [sys.executable, "-m", "relayd", "arf", "parse", "--json", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert list(data) == [
        "file",
        "is_arf",
        "feedback_type",
        "original_rcpt",
        "original_mail_from",
        "reported_domain",
        "source_ip",
        "arrival_date",
        "original_message_id",
        "relayd_id",
    ]
    assert data["relayd_id"] == "r1.abcdef"
