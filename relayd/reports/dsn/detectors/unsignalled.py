"""Auto-replies and mail without any bounce signal: claimed as no bounce.

A screen, not a reader: it comes after the formats that prove themselves (RFC 3464
records, Amazon SES JSON) and before the free-text readers, which would otherwise read
a "failed recipient" out of any mail that names an address. RFC 3834 auto-replies also
go out with a null sender, so ``Return-Path: <>`` alone proves little; an auto-reply
from a mailer daemon or with a bounce subject is still read as a bounce. Without any
bounce signal (delivery-status report, daemon sender, null sender, bounce subject), only
an unmistakable notice text lets the readers after it look.
"""

from __future__ import annotations

import re
from typing import Final

from relayd.reports.dsn.detection import NOT_A_BOUNCE, Detection, ParsedMessage

name: Final = "unsignalled"

_DAEMON_SENDER = re.compile(
    r"(?:^|[<\s\"])(?:mailer-daemon|mailer_daemon|mail-daemon|postmaster|mail\s+delivery\s+"
    r"(?:system|subsystem)|mmsc|ndr\b|system administrator)",
    re.IGNORECASE,
)
_BOUNCE_SUBJECT = re.compile(
    r"undeliver|undelivered|delivery\s+(?:status|failure|failed|notification|problem|report)|"
    r"returned\s+mail|failure\s+notice|mail\s+delivery|non[- ]?delivery|could\s+not\s+be\s+delivered|"
    r"delivery\s+has\s+failed|mail\s+system\s+error|returned\s+to\s+sender|error\s+sending|"
    r"mail\s+failure|loop\s+alert|nondeliverable|could\s+not\s+send|message\s+not\s+delivered|"
    r"rejected|bounced?\b|delayed\s+mail|warning:\s+message",
    re.IGNORECASE,
)
_BOUNCE_BODY = re.compile(
    r"could\s+not\s+be\s+delivered|delivery\s+(?:to\s+the\s+following|has\s+failed|failed)|"
    r"undeliverable|was\s+not\s+delivered|permanent\s+(?:fatal\s+)?error|failed\s+permanently|"
    r"unable\s+to\s+deliver|couldn't\s+be\s+delivered|did\s+not\s+reach|could\s+not\s+deliver|"
    r"error\s+(?:delivering|sending)|wasn't\s+able\s+to\s+deliver|not\s+able\s+to\s+deliver|"
    r"trouble\s+delivering|rejected\s+by|returned\s+mail|delivery\s+problem",
    re.IGNORECASE,
)
_AUTOREPLY_SUBJECT = re.compile(
    r"^\s*(?:auto(?:matic)?[\s_-]*(?:reply|response|antwort)|out\s+of\s+(?:the\s+)?office|"
    r"away\b|on\s+vacation|vacation|abwesenheit|absence|réponse\s+automatique|auto:)",
    re.IGNORECASE,
)


def detect(parsed: ParsedMessage) -> Detection | None:
    """:data:`NOT_A_BOUNCE` for an auto-reply or signal-less mail, else None (read on)."""
    headers = parsed.headers
    sender_text = " ".join(headers.get(field, "") for field in ("from", "sender"))
    subject = headers.get("subject", "")
    daemon_from = bool(_DAEMON_SENDER.search(sender_text))
    daemonish = daemon_from or headers.get("return-path", "").strip() == "<>"
    bounce_subject = bool(_BOUNCE_SUBJECT.search(subject))
    autoreply = _is_autoreply(headers, subject) and not daemon_from and not bounce_subject
    unsignalled = autoreply or not (parsed.is_report or daemonish or bounce_subject)
    if unsignalled and (autoreply or not _BOUNCE_BODY.search(parsed.notice)):
        return NOT_A_BOUNCE
    return None


def _is_autoreply(headers: dict[str, str], subject: str) -> bool:
    """RFC 3834 Auto-Submitted: auto-replied, vendor autoreply headers, or subject words."""
    auto = headers.get("auto-submitted", "").strip().lower()
    if auto.startswith("auto-replied"):
        return True
    if any(field in headers for field in ("x-autoreply", "x-autorespond", "x-autoresponder")):
        return True
    if headers.get("precedence", "").strip().lower() == "auto_reply":
        return True
    return bool(_AUTOREPLY_SUBJECT.search(subject))
