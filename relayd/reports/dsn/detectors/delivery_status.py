"""RFC 3464 ``message/delivery-status`` records: the most authoritative evidence, tried first.

The records were read from the delivery-status parts (and from DSN fields pasted into a
text notice, as Amazon WorkMail and forwarded bounces do) when the message was taken
apart (:func:`relayd.reports.dsn.rfc3464.parse`). Each recipient is judged on its
Status and Diagnostic-Code, with the notice paragraph that names it as wider context:
the whole notice when the report names a single recipient.
"""

from __future__ import annotations

from typing import Final

from relayd.reports.dsn import heuristics, judge
from relayd.reports.dsn.detection import Detection, ParsedMessage
from relayd.reports.dsn.model import BouncedRecipient

name: Final = "rfc3464"


def detect(parsed: ParsedMessage) -> Detection | None:
    """One recipient per distinct Final-Recipient (else Original-Recipient), in report order."""
    if not parsed.records:
        return None
    hits = {hit.address: hit.context for hit in heuristics.scan_notice(parsed.notice, parsed.parties)}
    seen: set[str] = set()
    recipients: list[BouncedRecipient] = []
    for record in parsed.records:
        address = record.address
        if not address or address in seen:
            continue
        seen.add(address)
        context = hits.get(address) or (parsed.notice if len(parsed.records) == 1 else None)
        recipients.append(judge.from_record(record, context))
    return Detection(recipients=tuple(recipients), reporting_mta=parsed.reporting_mta)
