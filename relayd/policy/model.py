"""The values that flow through the policy pipeline.

A rule looks at one recipient (RCPT stage) or at one submitted message (DATA stage) and either has no
opinion (``None``) or returns a :class:`Verdict` naming itself, the reason and the exact SMTP reply. The first
verdict wins; the pipeline records every drop as an event with its reason (DESIGN.md: ``suppressed:<reason>``,
``discard``, ``spamtrap``, ``cap``, ``no_consent``, ``suspended``; and ``spamtrap:optin``, a trap hit by a
confirmation mail, which counts against nobody). A content rule looks at the message itself, before any
recipient rule, and refuses it whole or has no opinion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from email.message import Message
from enum import Enum
from typing import Protocol


class Action(Enum):
    ACCEPT = "accept"
    REJECT = "reject"  # 5xx to the client for this recipient
    DROP = "drop"  # accept, but never deliver (spam traps: telling the sender which address is a trap helps
    #              list-washers, so a trap gets the same 250 as a real address)
    DEFER = "defer"  # 4xx: try again later (our storage failed)


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    rule: str  # "suppression"
    reason: str  # "suppressed:hard_bounce", "cap", ...
    reply: str  # "550 5.7.1 <a@example.test>: suppressed (hard_bounce)"


@dataclass(frozen=True, slots=True)
class RcptRequest:
    """One RCPT TO of an authenticated account, before the message (and so its list) is known."""

    account: str
    address: str
    now: datetime


@dataclass(frozen=True, slots=True)
class MessageRequest:
    """One message at the end of DATA: who sends it, to whom, for which list."""

    queue_id: str
    account: str
    mail_from: str
    recipients: tuple[str, ...]
    list_name: str | None
    campaign: str | None
    now: datetime
    caps: dict[int, int] = field(default_factory=dict)  # window seconds -> most sends


class RcptRule(Protocol):
    name: str

    async def check(self, req: RcptRequest) -> Verdict | None: ...


class MessageRule(Protocol):
    """A rule over all recipients of a message at once (one store round trip per message, not per rcpt)."""

    name: str

    async def check(self, req: MessageRequest, recipients: tuple[str, ...]) -> dict[str, Verdict]: ...


@dataclass(frozen=True, slots=True)
class ContentRequest:
    """One message's content at the end of DATA, before anything is counted or rewritten.

    ``headers`` is the top-level header block as the stdlib parses it (``policy=compat32``); ``raw`` the
    content as submitted (dot-unstuffed); ``optin`` whether it is a confirmation mail (X-Relayd-Optin)."""

    account: str
    headers: Message
    raw: bytes
    optin: bool


class ContentRule(Protocol):
    """A rule over the message itself: it refuses the whole message (its verdict's reply is the answer to
    DATA) or has no opinion. No I/O: the content is all it reads."""

    name: str

    def check(self, req: ContentRequest) -> Verdict | None: ...
