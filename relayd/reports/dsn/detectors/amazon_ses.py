"""Amazon SES JSON notifications, delivered by SNS as mail.

SES sends Bounce, Complaint and Delivery notifications as a JSON body, sometimes
wrapped in an SNS envelope whose "Message" is itself JSON. Only "Bounce" names failed
recipients (``source="json"``); a Complaint or a Delivery is claimed as no bounce, so
the free-text readers never read a recipient out of its JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final

from relayd.reports.dsn import heuristics, judge, reasons
from relayd.reports.dsn.detection import NOT_A_BOUNCE, Detection, ParsedMessage
from relayd.reports.dsn.model import BouncedRecipient

name: Final = "amazon-ses"


def detect(parsed: ParsedMessage) -> Detection | None:
    """The bounced recipients of a Bounce notification, :data:`NOT_A_BOUNCE` for any other."""
    kind, bounces = ses_notification(parsed.anatomy.body_text)
    if kind is None:
        return None
    if kind != "Bounce" or not bounces:
        return NOT_A_BOUNCE
    return Detection(
        recipients=tuple(_from_json(item) for item in bounces),
        reporting_mta="amazonses.com",
        notes=("amazon-ses-json",),
    )


def _from_json(item: JsonBounce) -> BouncedRecipient:
    action = (item.action or ("failed" if item.permanent else "delayed")).lower()
    reason, ev = judge.judge(item.status, item.diagnostic, action, "smtp", None)
    return BouncedRecipient(
        address=item.address,
        action=action,
        status=ev.status,
        reason=reason,
        hard=reasons.is_hard(reason, ev.status, ev.reply_code, action),
        diagnostic=judge.short(item.diagnostic),
        reply_code=ev.reply_code,
        remote_mta=item.remote_mta,
        source="json",
    )


@dataclass(frozen=True, slots=True)
class JsonBounce:
    """One bounced recipient of an Amazon SES notification."""

    address: str
    status: str | None
    diagnostic: str | None
    action: str | None
    permanent: bool
    remote_mta: str | None


def ses_notification(body: str) -> tuple[str | None, list[JsonBounce]]:
    """(notificationType, bounced recipients) of an SES JSON notification, else (None, []).

    SES delivers Bounce, Complaint and Delivery notifications via SNS as a JSON body,
    sometimes wrapped in an SNS envelope whose "Message" is itself JSON. Only "Bounce"
    carries failed recipients; Complaint and Delivery are not DSNs.
    """
    start = body.find("{")
    if start < 0 or (
        '"notificationType"' not in body and '"eventType"' not in body and '"Message"' not in body
    ):
        return None, []
    # Sendmail breaks over-long lines with "!\n " (RFC 5322 line limit); undo that first.
    text = body[start:].replace("!\n ", "")
    try:
        data, _ = json.JSONDecoder().raw_decode(text)
    except (ValueError, RecursionError):
        return None, []
    if isinstance(data, dict) and isinstance(data.get("Message"), str):
        try:
            data = json.loads(data["Message"])
        except (ValueError, RecursionError):
            return None, []
    if not isinstance(data, dict):
        return None, []
    kind = data.get("notificationType") or data.get("eventType")
    if not isinstance(kind, str):
        return None, []
    bounce = data.get("bounce")
    if kind != "Bounce" or not isinstance(bounce, dict):
        return kind, []
    permanent = str(bounce.get("bounceType", "")).lower() == "permanent"
    remote = bounce.get("remoteMtaIp")
    out = []
    for item in bounce.get("bouncedRecipients") or []:
        if not isinstance(item, dict):
            continue
        found = heuristics.addresses_in(str(item.get("emailAddress", "")))
        if not found:
            continue
        out.append(
            JsonBounce(
                address=found[0],
                status=str(item["status"]) if item.get("status") else None,
                diagnostic=str(item["diagnosticCode"]) if item.get("diagnosticCode") else None,
                action=str(item["action"]) if item.get("action") else None,
                permanent=permanent,
                remote_mta=str(remote) if remote else None,
            )
        )
    return kind, out
