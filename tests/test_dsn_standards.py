"""Reason rules that follow the standards rather than one corpus's phrases.

The enhanced status code decides when it is specific (RFC 3463); a generic one (x.0.0,
x.1.0, 5.7.1) leaves the decision to the text; a hard verdict needs evidence that the
mailbox itself is gone, and a temporary code is never that evidence.
"""

from __future__ import annotations

import pytest

from relayd.reports.dsn import heuristics, reasons, smtptext
from relayd.reports.dsn.reasons import Evidence, classify_reply, decide, is_hard


@pytest.mark.parametrize(
    ("status", "text", "reason"),
    [
        ("5.1.1", "550 5.1.1 mailbox unavailable", "userunknown"),
        ("5.1.2", "550 5.1.2 bad destination system address", "hostunknown"),
        ("5.1.10", "550 5.1.10 recipient address has null MX", "notaccept"),
        ("5.2.2", "552 5.2.2 over the limit", "mailboxfull"),
        ("5.3.4", "552 5.3.4 too large", "mesgtoobig"),
        ("5.1.6", "550 5.1.6 gone", "hasmoved"),
        ("4.4.7", "delivery time expired", "expired"),
    ],
)
def test_specific_status_code_decides(status: str, text: str, reason: str) -> None:
    assert decide(Evidence(status=status, diagnostic=text, action="failed", diagnostic_type="smtp")) == reason


def test_generic_address_status_is_not_a_missing_mailbox() -> None:
    # RFC 3463 X.1.0 is "other address status": here the sender is the refused address.
    reason, hard = classify_reply(550, "5.1.0", "<news@sender.example> sender rejected")
    assert (reason, hard) == ("rejected", False)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org", "blocked"),
        ("Message rejected as spam by Content Filtering.", "spamdetected"),
        ("Virus found in message: Eicar-Test-Signature", "virusdetected"),
        ("<a@example.net>: Relay access denied", "norelaying"),
        ("Must issue a STARTTLS command first", "securityerror"),
    ],
)
def test_text_decides_when_the_code_is_generic(text: str, reason: str) -> None:
    command = "DATA" if reason in {"spamdetected", "virusdetected"} else "RCPT"
    assert classify_reply(554, "5.7.1", text, command) == (reason, False)


@pytest.mark.parametrize(
    "text",
    [
        "550 5.1.1 <a@example.net>: Recipient address rejected: User unknown; blocked using zen.spamhaus.org",
        "550 5.1.2 Sender address rejected: Domain not found",
        "550 No such user here - your host is listed in a DNS blocklist",
    ],
)
def test_policy_words_keep_a_missing_mailbox_verdict_soft(text: str) -> None:
    ev = Evidence(status=smtptext.enhanced_code(text), diagnostic=text, action="failed", command="RCPT")
    reason = decide(ev)
    assert not is_hard(reason, ev.status, "550", "failed"), reason


@pytest.mark.parametrize("reason", ["userunknown", "hostunknown", "hasmoved", "notaccept"])
def test_temporary_code_is_never_hard(reason: str) -> None:
    assert is_hard(reason, "5.0.0", "550", "failed")
    assert not is_hard(reason, "4.4.4", "450", "failed")
    assert not is_hard(reason, None, None, "delayed")


def test_temporary_failure_given_up_is_expired() -> None:
    ev = Evidence(status="4.7.1", diagnostic="451 4.7.1 Please try again later", action="failed")
    assert decide(ev) == "expired"
    # ... unless the text names the cause, or the server refused to talk at all
    blocked = Evidence(
        status="4.7.1", diagnostic="451 4.7.1 Client host blocked using bl.spamcop.net", action="failed"
    )
    assert decide(blocked) == "blocked"
    greeting = Evidence(status="4.7.1", diagnostic="421 4.7.1 try later", action="failed", command="CONN")
    assert decide(greeting) == "blocked"
    # a delayed (not failed) report keeps its cause
    assert (
        decide(Evidence(status="4.2.2", diagnostic="452 4.2.2 Mailbox full", action="delayed"))
        == "mailboxfull"
    )


def test_folded_in_reply_to_names_the_command() -> None:
    text = "said: 550\n    Requested action not taken: mailbox unavailable (in\n    reply to RCPT TO command)"
    assert smtptext.smtp_command(text) == "RCPT"
    assert smtptext.smtp_command("host x[192.0.2.1] refused to talk to me: 554 go away") == "CONN"


def test_sendmail_size_reply_turned_into_5_2_2_is_a_size_problem() -> None:
    ev = Evidence(status="5.2.2", diagnostic="552 Message exceeds maximum fixed size", action="failed")
    assert decide(ev) == "mesgtoobig"
    assert reasons.decide(Evidence(status="5.2.2", diagnostic="552 5.2.2 Mailbox full")) == "mailboxfull"


def test_truncated_echo_of_an_address_is_not_another_recipient() -> None:
    notice = (
        "The address to which the message has not yet been delivered is:\n\n"
        "  oskar@users.example.net\n"
        "    Delay reason: SMTP error from remote mail server after RCPT TO:<oskar@users.example.net>:\n"
        "    452 4.2.2 <oskar@users.exam\n"
    )
    hits = heuristics.scan_notice(notice, set())
    assert [hit.address for hit in hits] == ["oskar@users.example.net"]
    assert "452 4.2.2" in hits[0].context
