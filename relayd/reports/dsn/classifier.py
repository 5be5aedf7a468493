"""``classify(raw) -> DsnReport``: is this a bounce, for whom, and why.

Pure: no config, no store, no secret, no I/O; never raises. The order is that of
flufl.bounce's registry, most authoritative first, stop at the first that finds
recipients:

1. RFC 3464 ``message/delivery-status`` parts (and DSN fields pasted into the text);
2. Amazon SES JSON bounce notifications;
3. the generic free-text reader of :mod:`relayd.reports.dsn.heuristics`;
4. flufl.bounce's detectors (``source="flufl"``, marked as the weakest evidence);
5. the returned message's To: when the notice is clearly a bounce but names nobody.

The reason of each recipient then comes from :func:`relayd.reports.dsn.reasons.decide` over the
status code, reply code, SMTP command and diagnostic text.
"""

from __future__ import annotations

import dataclasses
import email.message
import logging
import re

from relayd.reports.dsn import fallback, heuristics, limits, message, reasons, rfc3464, smtptext
from relayd.reports.dsn.model import NOT_A_DSN, BouncedRecipient, DsnReport

log = logging.getLogger(__name__)

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
_DELIVERY_ACTIONS = ("failed", "delayed", "delivered", "relayed", "expanded")
#: DSN fields pasted into a text notice. ``[^\S\n]*``, not ``\s*``: after ``^`` in
#: MULTILINE mode ``\s*`` would run over every following blank line from every line
#: start (quadratic in a run of newlines); the match it finds is the same.
_PASTED_FIELDS = re.compile(r"^[^\S\n]*(?:final|original)-recipient\s*:", re.IGNORECASE | re.MULTILINE)


def classify(raw: bytes) -> DsnReport:
    """Classify one message (bytes as received, CRLF or LF). Never raises."""
    try:
        return _classify(raw)
    except Exception:  # pragma: no cover - defensive: bad input gives a result
        log.debug("dsn classification failed", exc_info=True)
        return NOT_A_DSN


def _addresses(value: str) -> set[str]:
    return set(heuristics.addresses_in(value))


def _original_fields(original: bytes | None) -> email.message.Message | None:
    if not original:
        return None
    return message.parse_message(original)


def _classify(raw: bytes) -> DsnReport:
    anatomy = message.dissect(raw)
    if anatomy is None:
        return NOT_A_DSN
    headers = anatomy.headers
    original = _original_fields(anatomy.original)
    message_id = _msgid(headers.get("message-id"))
    original_message_id = _msgid(message.header_text(original.get("message-id"))) if original else None
    base = DsnReport(
        is_dsn=False,
        message_id=message_id,
        original_message_id=original_message_id,
        original_headers=anatomy.original,
    )

    records: list[rfc3464.StatusRecord] = []
    reporting_mta: str | None = None
    texts = list(anatomy.status_texts)
    if _PASTED_FIELDS.search(anatomy.notice):
        texts.append(anatomy.notice)
    for text in texts:
        per_message, found = rfc3464.parse(text)
        records.extend(found[: limits.MAX_RECIPIENTS - len(records)])
        reporting_mta = reporting_mta or rfc3464._typed(per_message.get("reporting-mta"))[1]

    sender_text = " ".join(headers.get(name, "") for name in ("from", "sender"))
    subject = headers.get("subject", "")
    daemon_from = bool(_DAEMON_SENDER.search(sender_text))
    # RFC 3834 auto-replies also go out with a null sender, so <> alone proves little.
    daemonish = daemon_from or headers.get("return-path", "").strip() == "<>"
    bounce_subject = bool(_BOUNCE_SUBJECT.search(subject))
    is_report = (anatomy.report_type or "").lower() == "delivery-status" or bool(anatomy.status_texts)

    if not records:
        kind, json_bounces = heuristics.ses_notification(anatomy.body_text)
        if kind is not None:
            if kind != "Bounce" or not json_bounces:
                return base
            return dataclasses.replace(
                base,
                is_dsn=True,
                recipients=tuple(_from_json(item) for item in json_bounces),
                reporting_mta="amazonses.com",
                notes=("amazon-ses-json",),
            )

    autoreply = _is_autoreply(headers, subject) and not daemon_from and not bounce_subject
    # Without any bounce signal, only an unmistakable notice text counts.
    unsignalled = autoreply or not (is_report or daemonish or bounce_subject)
    if not records and unsignalled and (autoreply or not _BOUNCE_BODY.search(anatomy.notice)):
        return base

    exclude = _party_addresses(headers, original)
    recipients: list[BouncedRecipient] = []
    if records:
        hits = {hit.address: hit.context for hit in heuristics.scan_notice(anatomy.notice, exclude)}
        seen: set[str] = set()
        for record in records:
            address = record.address
            if not address or address in seen:
                continue
            seen.add(address)
            context = hits.get(address) or (anatomy.notice if len(records) == 1 else None)
            recipients.append(_from_record(record, context))
    else:
        # Exim names the failed addresses in a header; trust it over the party filter.
        failed = heuristics.addresses_in(headers.get("x-failed-recipients", ""))
        hits_list = heuristics.scan_notice(anatomy.notice, exclude - set(failed))
        source = "text"
        if failed:
            by_address = {hit.address: hit for hit in hits_list}
            context = anatomy.notice
            hits_list = [by_address.get(a) or heuristics.TextHit(a, context) for a in failed]
        if not hits_list:
            hits_list = [
                heuristics.TextHit(address, anatomy.notice)
                for address in fallback.recipients(raw)
                if address not in exclude
            ]
            source = "flufl"
        if not hits_list and original is not None:
            targets = _addresses(" ".join(message.header_text(original.get(n)) for n in ("to", "cc")))
            hits_list = [heuristics.TextHit(address, anatomy.notice) for address in sorted(targets - exclude)]
            source = "original"
        for hit in hits_list[: limits.MAX_RECIPIENTS]:
            recipients.append(_from_text(hit, source))
    if not recipients:
        return dataclasses.replace(base, is_dsn=is_report)
    return dataclasses.replace(
        base,
        is_dsn=True,
        recipients=tuple(recipients),
        reporting_mta=reporting_mta,
    )


def _msgid(value: str | None) -> str | None:
    if not value:
        return None
    value = value.strip()
    match = re.search(r"<[^<>\s]+>", value)
    return match.group(0) if match else (value or None)


def _is_autoreply(headers: dict[str, str], subject: str) -> bool:
    """RFC 3834 Auto-Submitted: auto-replied, vendor autoreply headers, or subject words."""
    auto = headers.get("auto-submitted", "").strip().lower()
    if auto.startswith("auto-replied"):
        return True
    if any(name in headers for name in ("x-autoreply", "x-autorespond", "x-autoresponder")):
        return True
    if headers.get("precedence", "").strip().lower() == "auto_reply":
        return True
    return bool(_AUTOREPLY_SUBJECT.search(subject))


def _party_addresses(headers: dict[str, str], original: email.message.Message | None) -> set[str]:
    """Addresses of the parties to the bounce: never the failed recipient."""
    found: set[str] = set()
    for name in ("from", "to", "reply-to", "sender", "return-path"):
        found |= _addresses(headers.get(name, ""))
    if original is not None:
        for name in ("from", "sender", "reply-to", "return-path"):
            found |= _addresses(message.header_text(original.get(name)))
    return found


def _prefer_status(status: str | None, diagnostic: str | None, reply: str | None = None) -> str | None:
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


def _judge(
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
    status = _prefer_status(_prefer_status(status, diagnostic, reply), context, reply)
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


def _from_record(record: rfc3464.StatusRecord, context: str | None) -> BouncedRecipient:
    action = record.action if record.action in _DELIVERY_ACTIONS else "failed"
    reason, ev = _judge(record.status, record.diagnostic, action, record.diagnostic_type, context)
    return BouncedRecipient(
        address=record.address or "",
        action=action,
        status=ev.status,
        reason=reason,
        hard=reasons.is_hard(reason, ev.status, ev.reply_code, action),
        diagnostic=_short(record.diagnostic or (heuristics.focus(context) if context else None)),
        reply_code=ev.reply_code,
        remote_mta=record.remote_mta,
        original_recipient=record.original_recipient,
        source="rfc3464",
    )


_DELAYED = re.compile(
    r"\bdelayed\b|will\s+(?:keep\s+)?(?:re)?try|will\s+be\s+retried|not\s+yet\s+been\s+delivered",
    re.IGNORECASE,
)


def _from_text(hit: heuristics.TextHit, source: str) -> BouncedRecipient:
    action = "delayed" if _DELAYED.search(hit.context) else "failed"
    focus = heuristics.focus(hit.context)
    reason, ev = _judge(None, focus, action, None, hit.context)
    return BouncedRecipient(
        address=hit.address,
        action=action,
        status=ev.status,
        reason=reason,
        hard=reasons.is_hard(reason, ev.status, ev.reply_code, action),
        diagnostic=_short(focus),
        reply_code=ev.reply_code,
        source=source,
    )


def _from_json(item: heuristics.JsonBounce) -> BouncedRecipient:
    action = (item.action or ("failed" if item.permanent else "delayed")).lower()
    reason, ev = _judge(item.status, item.diagnostic, action, "smtp", None)
    return BouncedRecipient(
        address=item.address,
        action=action,
        status=ev.status,
        reason=reason,
        hard=reasons.is_hard(reason, ev.status, ev.reply_code, action),
        diagnostic=_short(item.diagnostic),
        reply_code=ev.reply_code,
        remote_mta=item.remote_mta,
        source="json",
    )


def _short(text: str | None, limit: int = 500) -> str | None:
    if not text:
        return None
    text = re.sub(r"\s+", " ", text[: limits.CONTEXT_LIMIT]).strip()
    return text[:limit] or None
