"""Why one recipient failed: status, reply code, SMTP command and reason, from what a detector found.

Every detector finds *who* in its own way (a delivery-status record, a JSON object, a
line of a notice); *why* is decided the same way for all of them here: the reason
comes from :func:`relayd.reports.dsn.reasons.decide` over the status code, reply code,
SMTP command and diagnostic text, the precise diagnostic first, the wider context of
the notice second.
"""

from __future__ import annotations

import re

from relayd.reports.dsn import heuristics, limits, reasons, smtptext
from relayd.reports.dsn.detection import Detection, ParsedMessage
from relayd.reports.dsn.model import BouncedRecipient
from relayd.reports.dsn.rfc3464 import StatusRecord

DELIVERY_ACTIONS = ("failed", "delayed", "delivered", "relayed", "expanded")


def prefer_status(status: str | None, diagnostic: str | None, reply: str | None = None) -> str | None:
    """Choose between the Status field and the code quoted in the diagnostic.

    After sisimai's ``status.Prefer``: the one whose class matches the reply code; a
    specific code over x.0.0 / x.y.0; the quoted code over codes that say little about
    the cause (4.4.7 expired, 4.7.0, 5.3.x, x.5.1/2/4/5 protocol codes); Sendmail and
    Postfix often write ``Status: 5.0.0`` while the remote said ``550 5.1.1``.
    """
    found = smtptext.enhanced_code(diagnostic)
    if not status:
        return found
    if not found or found == status:
        return status
    if reply and status[0] != found[0]:
        if reply[0] == status[0]:
            return status
        if reply[0] == found[0]:
            return found
    if status.endswith(".0.0"):
        return status if found.endswith(".0.0") else found
    if ".0" in status and ".0" not in found:
        return found
    if found.endswith(".0.0"):
        return status
    if (
        status in {"4.4.7", "4.7.0"}
        or status.startswith("5.3.")
        or status[1:4] in {".5.1", ".5.2", ".5.4", ".5.5"}
    ):
        return found
    if status == "5.1.1":
        return status if ".0" in found or found.startswith("5.5.") else found
    if status == "5.1.3" and found.startswith("5.7."):
        return found
    return status


def judge(
    status: str | None,
    diagnostic: str | None,
    action: str,
    diagnostic_type: str | None,
    context: str | None,
) -> tuple[str, reasons.Evidence]:
    """Decide the reason from the precise diagnostic first, the wider context second.

    ``diagnostic`` is the remote reply (Diagnostic-Code, or the reply paragraph of a
    text notice); ``context`` the notice text about this recipient. The context only
    gets a say when the diagnostic alone leaves the reason open, so boilerplate in a
    notice cannot outvote what the remote server said.
    """
    reply = smtptext.reply_code(diagnostic) or smtptext.reply_code(context)
    command = smtptext.smtp_command(diagnostic) or smtptext.smtp_command(context)
    status = prefer_status(prefer_status(status, diagnostic, reply), context, reply)
    if diagnostic_type is None and (reply or status):
        diagnostic_type = "smtp"
    ev = reasons.Evidence(
        status=status,
        reply_code=reply,
        diagnostic=diagnostic or context,
        action=action,
        command=command,
        diagnostic_type=diagnostic_type,
    )
    reason = reasons.decide(ev)
    if reason in {"onhold", "undefined"} and diagnostic and context and context != diagnostic:
        wider = reasons.Evidence(
            status=status,
            reply_code=reply,
            diagnostic=f"{diagnostic}\n{context}",
            action=action,
            command=command,
            diagnostic_type=diagnostic_type,
        )
        reason = reasons.decide(wider)
    if reason in {"onhold", "undefined"} and command == "MAIL":
        # A refusal of MAIL FROM that names no other cause is a refusal of the sender.
        reason = "rejected"
    return reason, ev


def from_record(record: StatusRecord, context: str | None) -> BouncedRecipient:
    """A recipient of an RFC 3464 per-recipient block; ``context`` is its notice text."""
    action = record.action if record.action in DELIVERY_ACTIONS else "failed"
    reason, ev = judge(record.status, record.diagnostic, action, record.diagnostic_type, context)
    return BouncedRecipient(
        address=record.address or "",
        action=action,
        status=ev.status,
        reason=reason,
        hard=reasons.is_hard(reason, ev.status, ev.reply_code, action),
        diagnostic=short(record.diagnostic or (heuristics.focus(context) if context else None)),
        reply_code=ev.reply_code,
        remote_mta=record.remote_mta,
        original_recipient=record.original_recipient,
        source="rfc3464",
    )


_DELAYED = re.compile(
    r"\bdelayed\b|will\s+(?:keep\s+)?(?:re)?try|will\s+be\s+retried|not\s+yet\s+been\s+delivered",
    re.IGNORECASE,
)


def from_text(hit: heuristics.TextHit, source: str) -> BouncedRecipient:
    """A recipient named in a free-text notice, judged on the paragraph that concerns it."""
    action = "delayed" if _DELAYED.search(hit.context) else "failed"
    focus = heuristics.focus(hit.context)
    reason, ev = judge(None, focus, action, None, hit.context)
    return BouncedRecipient(
        address=hit.address,
        action=action,
        status=ev.status,
        reason=reason,
        hard=reasons.is_hard(reason, ev.status, ev.reply_code, action),
        diagnostic=short(focus),
        reply_code=ev.reply_code,
        source=source,
    )


def text_detection(parsed: ParsedMessage, hits: list[heuristics.TextHit], source: str) -> Detection | None:
    """The verdict of a free-text detector: its first hits judged, or None when it found nobody.

    At most :data:`~relayd.reports.dsn.limits.MAX_RECIPIENTS` recipients are judged.
    """
    if not hits:
        return None
    return Detection(
        recipients=tuple(from_text(hit, source) for hit in hits[: limits.MAX_RECIPIENTS]),
        reporting_mta=parsed.reporting_mta,
    )


def short(text: str | None, limit: int = 500) -> str | None:
    """``text`` with its blanks collapsed and cut to ``limit`` characters, for display."""
    if not text:
        return None
    text = re.sub(r"\s+", " ", text[: limits.CONTEXT_LIMIT]).strip()
    return text[:limit] or None
