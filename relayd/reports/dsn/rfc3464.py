"""RFC 3464 delivery-status fields: per-message and per-recipient blocks.

Reads the body of a ``message/delivery-status`` part (or DSN fields pasted into a text
notice, as Amazon WorkMail and forwarded bounces do) into :class:`StatusRecord` objects.
Tolerant of what real MTAs send:

* blocks not separated by a blank line (several recipients run together): a repeated
  Final-Recipient or Original-Recipient starts a new record;
* ``Action: error`` (OpenSMTPD) and other non-standard actions are mapped to RFC names;
* address types other than rfc822 (``x-unknown;``), angle brackets, trailing comments;
* folded lines and junk lines in between.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relayd.reports.dsn.limits import ADDRESS_FIELD_LIMIT, MAX_RECIPIENTS

_FIELD = re.compile(r"^([A-Za-z][A-Za-z0-9-]*)[ \t]*:[ \t]*(.*)$")
_RECIPIENT_KEYS = ("final-recipient", "original-recipient", "x-actual-recipient")
_PER_MESSAGE_KEYS = frozenset(
    {"reporting-mta", "received-from-mta", "arrival-date", "original-envelope-id", "dsn-gateway"}
)
#: The lookbehind starts a match only where a run of local-part characters starts: the
#: leftmost match is the same, but a long run without ``@`` is scanned once, not once
#: per character (quadratic).
_ADDRESS = re.compile(
    r"(?<![A-Za-z0-9!#$%&'*+/=?^_`{|}~.-])"
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)+"
)

#: Non-RFC Action values -> RFC 3464 names (OpenSMTPD writes "error", some write "failure").
_ACTIONS = {
    "failed": "failed",
    "failure": "failed",
    "error": "failed",
    "fail": "failed",
    "delayed": "delayed",
    "delivered": "delivered",
    "relayed": "relayed",
    "expanded": "expanded",
    "deliverable": "delivered",
    "deferred": "delayed",
    "expired": "failed",
}


@dataclass(frozen=True, slots=True)
class StatusRecord:
    """One per-recipient block; values are as given, addresses lower-cased."""

    final_recipient: str | None
    original_recipient: str | None
    action: str | None
    status: str | None
    diagnostic_type: str | None
    diagnostic: str | None
    remote_mta: str | None
    reporting_mta: str | None

    @property
    def address(self) -> str | None:
        """The recipient to report: Final-Recipient, else Original-Recipient."""
        return self.final_recipient or self.original_recipient


def fields(text: str) -> list[list[tuple[str, str]]]:
    """Blocks of (lower-cased name, unfolded value) pairs, split at blank lines.

    Folded lines are collected and joined once per field: appending each to the value
    so far would copy the value again for every line (quadratic in a long fold).
    """
    blocks: list[list[tuple[str, str]]] = []
    current: list[tuple[str, list[str]]] = []

    def close() -> None:
        blocks.append([(name, " ".join(parts)) for name, parts in current])
        current.clear()

    for line in text.split("\n"):
        if not line.strip():
            if current:
                close()
            continue
        if line[:1] in " \t" and current:
            current[-1][1].append(line.strip())
            continue
        match = _FIELD.match(line)
        if match:
            current.append((match.group(1).lower(), [match.group(2).strip()]))
    if current:
        close()
    return blocks


def extract_address(value: str | None) -> str | None:
    """``rfc822; <User@Example.org>`` -> ``user@example.org``; None if no address.

    Only the first :data:`~relayd.reports.dsn.limits.ADDRESS_FIELD_LIMIT` characters are read.
    """
    if not value:
        return None
    value = value[:ADDRESS_FIELD_LIMIT]
    if ";" in value:
        value = value.split(";", 1)[1]
    match = _ADDRESS.search(value)
    if not match:
        return None
    return match.group(0).strip(".").lower()


def split_type(value: str | None) -> tuple[str | None, str | None]:
    """``smtp; 550 ...`` -> ("smtp", "550 ..."); an untyped value keeps type None."""
    if not value:
        return None, None
    head, sep, tail = value.partition(";")
    if sep and re.fullmatch(r"[A-Za-z0-9-]{1,20}", head.strip()):
        return head.strip().lower(), tail.strip() or None
    return None, value.strip() or None


_STATUS_CODE = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})")


def normalise_status(value: str | None) -> str | None:
    """First enhanced status code in a Status value (``5.1.1 (user unknown)`` -> 5.1.1)."""
    if not value:
        return None
    match = _STATUS_CODE.search(value)
    if not match:
        return None
    return f"{match.group(1)}.{int(match.group(2))}.{int(match.group(3))}"


def parse(text: str) -> tuple[dict[str, str], list[StatusRecord]]:
    """Per-message fields and per-recipient records of a delivery-status body."""
    per_message: dict[str, str] = {}
    records: list[dict[str, str]] = []
    for block in fields(text):
        if not any(name in _RECIPIENT_KEYS for name, _ in block):
            for name, value in block:
                per_message.setdefault(name, value)
            continue
        current: dict[str, str] | None = None
        pending: list[tuple[str, str]] = []
        last_name = ""
        for name, value in block:
            if name in _RECIPIENT_KEYS and (current is None or name in current):
                previous = current
                current = {}
                records.append(current)
                if previous is not None and last_name == "original-recipient" and name == "final-recipient":
                    # "Original-Recipient" written just before the next "Final-Recipient"
                    # belongs to that next recipient.
                    current["original-recipient"] = previous.pop("original-recipient")
                # Fields written before the first recipient line (Amazon SES puts
                # Action first) belong to it, unless they are per-message fields.
                for pname, pvalue in pending:
                    if pname in _PER_MESSAGE_KEYS or pname.startswith("x-"):
                        per_message.setdefault(pname, pvalue)
                    else:
                        current.setdefault(pname, pvalue)
                pending = []
            if current is None:
                pending.append((name, value))
            else:
                current.setdefault(name, value)
            last_name = name
        for pname, pvalue in pending:
            per_message.setdefault(pname, pvalue)
    reporting = split_type(per_message.get("reporting-mta"))[1]
    out = []
    for record in records[:MAX_RECIPIENTS]:
        final = extract_address(record.get("final-recipient")) or extract_address(
            record.get("x-actual-recipient")
        )
        original = extract_address(record.get("original-recipient"))
        if not (final or original):
            continue
        action_raw = (record.get("action") or "").strip().lower().split(" ")[0].strip("();,")
        diag_type, diagnostic = split_type(record.get("diagnostic-code"))
        out.append(
            StatusRecord(
                final_recipient=final,
                original_recipient=original,
                action=_ACTIONS.get(action_raw, action_raw or None),
                status=normalise_status(record.get("status")),
                diagnostic_type=diag_type,
                diagnostic=diagnostic,
                remote_mta=split_type(record.get("remote-mta"))[1],
                reporting_mta=reporting,
            )
        )
    return per_message, out
