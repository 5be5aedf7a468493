"""``classify(raw) -> DsnReport``: is this a bounce, for whom, and why.

Pure: no config, no store, no secret, no I/O; never raises. The message is taken apart
once (:func:`relayd.reports.dsn.detection.read`), then the detectors of
:data:`relayd.reports.dsn.detectors.DETECTORS` are tried in order, most authoritative
first, as in flufl.bounce's registry; the first with a verdict wins. A message that no
detector claims is a DSN without recipients if it is a delivery-status report, else no
DSN at all.

The reason of each recipient comes from :mod:`relayd.reports.dsn.judge`, the same for
every detector.
"""

from __future__ import annotations

import dataclasses
import logging
import re

from relayd.reports.dsn import message
from relayd.reports.dsn.detection import read
from relayd.reports.dsn.detectors import DETECTORS
from relayd.reports.dsn.model import NOT_A_DSN, DsnReport

log = logging.getLogger(__name__)


def classify(raw: bytes) -> DsnReport:
    """Classify one message (bytes as received, CRLF or LF). Never raises."""
    try:
        return _classify(raw)
    except Exception:  # pragma: no cover - defensive: bad input gives a result
        log.debug("dsn classification failed", exc_info=True)
        return NOT_A_DSN


def _classify(raw: bytes) -> DsnReport:
    parsed = read(raw)
    if parsed is None:
        return NOT_A_DSN
    original = parsed.original
    message_id = _msgid(parsed.headers.get("message-id"))
    original_message_id = _msgid(message.header_text(original.get("message-id"))) if original else None
    base = DsnReport(
        is_dsn=False,
        message_id=message_id,
        original_message_id=original_message_id,
        original_headers=parsed.anatomy.original,
    )
    for detector in DETECTORS:
        found = detector.detect(parsed)
        if found is None:
            continue
        if not found.recipients:
            return base
        return dataclasses.replace(
            base,
            is_dsn=True,
            recipients=found.recipients,
            reporting_mta=found.reporting_mta,
            notes=found.notes,
        )
    return dataclasses.replace(base, is_dsn=parsed.is_report)


def _msgid(value: str | None) -> str | None:
    if not value:
        return None
    value = value.strip()
    match = re.search(r"<[^<>\s]+>", value)
    return match.group(0) if match else (value or None)
