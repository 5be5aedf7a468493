"""Result types of DSN classification.

Frozen dataclasses so that a report can cross module (and thread) lines without anyone
mutating it; the inbound listener, the CLI and the attribution step all read the
same object.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class BouncedRecipient:
    """One recipient named by a bounce, with what happened to it and why.

    ``reason`` is a sisimai (v5) reason name (see DESIGN.md); ``hard`` is true only when
    the address itself is permanently bad (userunknown, hostunknown, hasmoved, or
    notaccept with a permanent code), so suppression can act on it at once.
    ``source`` says which parser found the recipient (``rfc3464``, ``text``, ``json``,
    ``flufl`` for the flufl.bounce fallback, ``original`` when only the returned
    message's To: named it): a caller may trust the first ones more.
    """

    address: str
    action: str
    status: str | None
    reason: str
    hard: bool
    diagnostic: str | None = None
    reply_code: str | None = None
    remote_mta: str | None = None
    original_recipient: str | None = None
    source: str = "rfc3464"


@dataclass(frozen=True, slots=True)
class DsnReport:
    """What :func:`relayd.reports.dsn.classify` found in one message.

    ``is_dsn`` is false for anything that is not a delivery report (auto-replies,
    complaints, provider notifications that are not bounces, plain mail, junk).
    ``original_headers`` is the header block of the returned original message when the
    bounce carries one, so attribution can look for ``X-Relayd-ID`` or a VERP token.
    """

    is_dsn: bool
    recipients: tuple[BouncedRecipient, ...] = ()
    message_id: str | None = None
    original_message_id: str | None = None
    original_headers: bytes | None = None
    reporting_mta: str | None = None
    notes: tuple[str, ...] = field(default=())


NOT_A_DSN = DsnReport(is_dsn=False)
