"""``parse(raw) -> ArfReport``: read a spam complaint (feedback loop report).

Formats, most structured first:

* RFC 5965 / RFC 6591 ``multipart/report; report-type=feedback-report``: a
  ``message/feedback-report`` part with Feedback-Type, Original-Rcpt-To, ... and the
  original as ``message/rfc822`` or ``text/rfc822-headers``;
* Hotmail's older JMRP forward (``staff@hotmail.com``, "complaint about message from
  <ip>"): ``multipart/mixed`` with the original attached, the recipient in its
  ``X-HmXmrOriginalRecipient``, no Feedback-Type (it is always a spam complaint);
* a plain forwarded complaint: a message that says "spam"/"abuse"/"complaint" and
  carries the original as an attachment or pasted headers.

Pure, never raises; anything else is ``is_arf=False``. Anyone can send us a complaint,
so parsing is linear in the input and reads at most the caps of
:mod:`relayd.reports.dsn.limits` (the readers are shared with the DSN parser).
"""

from __future__ import annotations

import email.message
import logging
import re

from relayd.reports.arf.model import NOT_ARF, ArfReport
from relayd.reports.dsn import heuristics, limits, message, rfc3464

log = logging.getLogger(__name__)

_FEEDBACK_TYPES = frozenset({"message/feedback-report"})
_ORIGINAL_TYPES = frozenset(
    {"message/rfc822", "message/global", "text/rfc822-headers", "message/rfc822-headers"}
)
_JMRP_SUBJECT = re.compile(r"complaint about message from\s+([0-9a-fA-F.:]+)", re.IGNORECASE)
_COMPLAINT_WORDS = re.compile(r"\b(?:spam|abuse|complaint|junk|unsolicited|phishing)\b", re.IGNORECASE)
_BOUNCE_SENDER = re.compile(r"mailer-daemon|postmaster|mail delivery", re.IGNORECASE)
_HIDDEN = re.compile(r"redacted|undisclosed|^x+@|^\*+@", re.IGNORECASE)
_RELAYD_ID = re.compile(rb"^X-Relayd-ID:[ \t]*(.+(?:\n[ \t]+.+)*)", re.IGNORECASE | re.MULTILINE)


def parse(raw: bytes) -> ArfReport:
    """Parse one complaint message (bytes as received, CRLF or LF). Never raises."""
    try:
        return _parse(raw)
    except Exception:  # pragma: no cover - defensive: bad input gives a result
        log.debug("arf parsing failed", exc_info=True)
        return NOT_ARF


def _parse(raw: bytes) -> ArfReport:
    msg = message.parse_message(message.normalise_newlines(raw))
    if msg is None:
        return NOT_ARF
    report_fields: dict[str, str] = {}
    original: bytes | None = None
    texts: list[str] = []
    has_status = False
    for part in _leaves(msg):
        ctype = part.get_content_type()
        if ctype in _FEEDBACK_TYPES and not report_fields:
            for block in rfc3464.fields(message.status_text(part)):
                for name, value in block:
                    report_fields.setdefault(name, value)
        elif ctype in ("message/delivery-status", "message/global-delivery-status"):
            has_status = True
        elif ctype in _ORIGINAL_TYPES:
            if original is None:
                original = message.embedded_headers(part)
        elif ctype.startswith("text/") and original is None:
            texts.append(message.part_text(part))

    subject = message.header_text(msg.get("subject"))
    sender = message.header_text(msg.get("from"))
    if report_fields.get("feedback-type") or _param(msg, "report-type") == "feedback-report":
        fmt = "rfc5965"
        feedback_type = (report_fields.get("feedback-type") or "abuse").strip().lower() or None
    elif original is not None and _JMRP_SUBJECT.search(subject):
        fmt, feedback_type = "hotmail-jmrp", "abuse"
    else:
        # A plain forward: the subject must call it a complaint, and it must not be a
        # bounce (bounces quote spam-filter verdicts too).
        if not _COMPLAINT_WORDS.search(subject) or has_status or _BOUNCE_SENDER.search(sender):
            return NOT_ARF
        if original is None:
            _, original = message.split_returned("\n".join(texts)[: limits.PART_LIMIT])
        if original is None:
            return NOT_ARF
        fmt, feedback_type = "forwarded", "abuse"

    orig_msg = message.parse_message(original) if original else None
    source_ip = report_fields.get("source-ip")
    if source_ip is None and fmt == "hotmail-jmrp":
        match = _JMRP_SUBJECT.search(subject)
        source_ip = match.group(1) if match else None
    return ArfReport(
        is_arf=True,
        feedback_type=feedback_type,
        original_rcpt=_original_rcpt(report_fields, orig_msg),
        original_mail_from=_first_address(report_fields.get("original-mail-from"))
        or _first_address(_header(orig_msg, "return-path")),
        reported_domain=(report_fields.get("reported-domain") or "").strip().lower() or None,
        source_ip=(source_ip or "").strip() or None,
        arrival_date=(report_fields.get("arrival-date") or report_fields.get("received-date") or "").strip()
        or None,
        original_message_id=_msgid(_header(orig_msg, "message-id")),
        relayd_id=_relayd_id(original),
        original_headers=original,
        user_agent=(report_fields.get("user-agent") or "").strip() or None,
        format=fmt,
    )


def _leaves(msg: email.message.Message) -> list[email.message.Message]:
    """Parts in order, not descending into attached messages."""
    out: list[email.message.Message] = []
    stack = [msg]
    while stack and len(out) < 200:
        part = stack.pop(0)
        if part.get_content_maintype() == "multipart" and part.is_multipart():
            payload = part.get_payload()
            if isinstance(payload, list):
                stack = [p for p in payload if isinstance(p, email.message.Message)] + stack
            continue
        out.append(part)
    return out


def _param(msg: email.message.Message, name: str) -> str | None:
    try:
        value = msg.get_param(name)
    except Exception:
        return None
    return value.strip().lower() if isinstance(value, str) else None


def _header(msg: email.message.Message | None, name: str) -> str:
    return message.header_text(msg.get(name)) if msg is not None else ""


def _first_address(value: str | None) -> str | None:
    found = heuristics.addresses_in(value or "")
    return found[0] if found else None


def _visible(value: str | None) -> str | None:
    """The first address in ``value`` unless the reporter has hidden it."""
    address = _first_address(value)
    if address is None or _HIDDEN.search(address) or _HIDDEN.search(value or ""):
        return None
    return address


def _original_rcpt(fields: dict[str, str], original: email.message.Message | None) -> str | None:
    """Original-Rcpt-To, else Removal-Recipient, else the original's recipient headers."""
    for name in ("original-rcpt-to", "removal-recipient"):
        if fields.get(name):
            return _visible(fields[name])
    for name in ("x-hmxmroriginalrecipient", "to", "delivered-to", "x-original-to"):
        value = _header(original, name)
        if _first_address(value) is None:
            # "To: undisclosed-recipients:;" (a Bcc delivery) names nobody: the receiving
            # system's Delivered-To / X-Original-To may still do so.
            continue
        # An address the reporter redacted stays hidden: no later header is read for it.
        return _visible(value)
    return None


def _msgid(value: str) -> str | None:
    match = re.search(r"<[^<>\s]+>", value)
    return match.group(0) if match else (value.strip() or None)


def _relayd_id(original: bytes | None) -> str | None:
    if not original:
        return None
    match = _RELAYD_ID.search(original)
    if not match:
        return None
    value = re.sub(rb"\s+", b"", match.group(1))
    return value.decode("ascii", "replace") or None
