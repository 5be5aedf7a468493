"""What a bounce detector reads, what it answers, and the interface every detector fits.

After flufl.bounce's ``_interfaces.py``: one detector per bounce format, each a pure
function of a message that was read once (:class:`ParsedMessage`), tried in the order of
:data:`relayd.reports.dsn.detectors.DETECTORS`. A detector answers in one of three ways:

* ``None``: not its format, the next detector is tried;
* a :class:`Detection` with recipients: this is a bounce for them, the search stops;
* :data:`NOT_A_BOUNCE`: its format, and not a bounce (an Amazon SES complaint, an
  auto-reply), the search stops and the message is reported as no DSN.

:func:`read` takes a message apart once for all of them: its anatomy
(:func:`relayd.reports.dsn.message.dissect`), the returned message's headers, the
delivery-status records and the addresses of the parties.
"""

from __future__ import annotations

import email.message
import re
from dataclasses import dataclass
from typing import Final, Protocol

from relayd.reports.dsn import heuristics, limits, message, rfc3464
from relayd.reports.dsn.model import BouncedRecipient


@dataclass(frozen=True, slots=True)
class ParsedMessage:
    """One message as every detector reads it, taken apart once by :func:`read`.

    ``original`` is the returned message's header block parsed (None when the bounce
    returns nothing); ``records`` the per-recipient blocks of its delivery-status parts
    (and of DSN fields pasted into the notice); ``reporting_mta`` the first Reporting-MTA
    among them; ``parties`` the addresses of the parties to the bounce (its From, To,
    Reply-To, Sender, Return-Path, and the original's From, Sender, Reply-To,
    Return-Path), which are never the failed recipient.
    """

    raw: bytes
    anatomy: message.Anatomy
    original: email.message.Message | None
    records: tuple[rfc3464.StatusRecord, ...]
    reporting_mta: str | None
    parties: frozenset[str]

    @property
    def headers(self) -> dict[str, str]:
        """The bounce's own top-level header fields (name lower-cased, first value wins)."""
        return self.anatomy.headers

    @property
    def notice(self) -> str:
        """The human-readable text before any returned message."""
        return self.anatomy.notice

    @property
    def is_report(self) -> bool:
        """A ``multipart/report; report-type=delivery-status`` or a delivery-status part."""
        return (self.anatomy.report_type or "").lower() == "delivery-status" or bool(
            self.anatomy.status_texts
        )


@dataclass(frozen=True, slots=True)
class Detection:
    """A detector's verdict: the failed recipients (empty: not a bounce) and report facts."""

    recipients: tuple[BouncedRecipient, ...]
    reporting_mta: str | None = None
    notes: tuple[str, ...] = ()


#: The verdict of a detector that knows the format and finds no bounce in it.
NOT_A_BOUNCE: Final = Detection(recipients=())


class Detector(Protocol):
    """One bounce format. ``detect`` is pure and never raises on any message."""

    @property
    def name(self) -> str:
        """Short name of the format, for logs and tests."""

    def detect(self, parsed: ParsedMessage) -> Detection | None:
        """The verdict on ``parsed``, or None when the message is not in this format."""


#: DSN fields pasted into a text notice. ``[^\S\n]*``, not ``\s*``: after ``^`` in
#: MULTILINE mode ``\s*`` would run over every following blank line from every line
#: start (quadratic in a run of newlines); the match it finds is the same.
_PASTED_FIELDS = re.compile(r"^[^\S\n]*(?:final|original)-recipient\s*:", re.IGNORECASE | re.MULTILINE)


def read(raw: bytes) -> ParsedMessage | None:
    """Take ``raw`` apart for the detectors, or None if it is no message at all.

    At most :data:`~relayd.reports.dsn.limits.MAX_RECIPIENTS` records are kept.
    """
    anatomy = message.dissect(raw)
    if anatomy is None:
        return None
    original = _original_fields(anatomy.original)
    records: list[rfc3464.StatusRecord] = []
    reporting_mta: str | None = None
    texts = list(anatomy.status_texts)
    if _PASTED_FIELDS.search(anatomy.notice):
        texts.append(anatomy.notice)
    for text in texts:
        per_message, found = rfc3464.parse(text)
        records.extend(found[: limits.MAX_RECIPIENTS - len(records)])
        reporting_mta = reporting_mta or rfc3464.split_type(per_message.get("reporting-mta"))[1]
    return ParsedMessage(
        raw=raw,
        anatomy=anatomy,
        original=original,
        records=tuple(records),
        reporting_mta=reporting_mta,
        parties=frozenset(_party_addresses(anatomy.headers, original)),
    )


def _addresses(value: str) -> set[str]:
    return set(heuristics.addresses_in(value))


def _original_fields(original: bytes | None) -> email.message.Message | None:
    if not original:
        return None
    return message.parse_message(original)


def _party_addresses(headers: dict[str, str], original: email.message.Message | None) -> set[str]:
    """Addresses of the parties to the bounce: never the failed recipient."""
    found: set[str] = set()
    for name in ("from", "to", "reply-to", "sender", "return-path"):
        found |= _addresses(headers.get(name, ""))
    if original is not None:
        for name in ("from", "sender", "reply-to", "return-path"):
            found |= _addresses(message.header_text(original.get(name)))
    return found
