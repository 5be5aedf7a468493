"""Result type of ARF complaint parsing."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ArfReport:
    """What :func:`relayd.reports.arf.parse` found in one message.

    ``is_arf`` is true for RFC 5965 feedback reports, Hotmail's older JMRP forwards and
    plain forwarded complaints (``format`` says which). ``original_rcpt`` is the
    complaining recipient: Original-Rcpt-To, else Removal-Recipient, else the To: (or
    X-HmXmrOriginalRecipient) of the attached original; None when the report hides it.
    ``relayd_id`` is the ``X-Relayd-ID`` trace token of the attached original, which
    attribution verifies; ``original_headers`` is that original's header block.
    """

    is_arf: bool
    feedback_type: str | None = None
    original_rcpt: str | None = None
    original_mail_from: str | None = None
    reported_domain: str | None = None
    source_ip: str | None = None
    arrival_date: str | None = None
    original_message_id: str | None = None
    relayd_id: str | None = None
    original_headers: bytes | None = None
    user_agent: str | None = None
    format: str | None = None


NOT_ARF = ArfReport(is_arf=False)
