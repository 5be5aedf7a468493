"""The values that cross the policy store's interfaces (:mod:`relayd.store.protocols`), and its errors.

Why apart from the Protocols: the policy rules, the feedback loop, the desk and the CLI build and read
these values without needing the interfaces, and both backends' row conversion
(:mod:`relayd.store.rows`) needs the values but not the interfaces.

:class:`Event`, :func:`utcnow` and :func:`as_utc` live in :mod:`relayd.core.models` (the queue and the
mail layer use them too); they are re-exported here because every store caller needs them.

Exceptions::

    StoreError               the backend failed; the caller's fault is a ValueError instead
     └── SchemaTooNewError   the database was migrated by a newer relayd; refuse to touch it
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from typing import Any

from relayd.core.errors import StorageError
from relayd.core.models import Event, as_utc, utcnow

__all__ = [
    "SCOPE_PRECEDENCE",
    "AccountState",
    "ApiKey",
    "ConsentRecord",
    "DmarcCount",
    "Event",
    "InboxItem",
    "MtaStsRecord",
    "Reason",
    "SchemaTooNewError",
    "Scope",
    "SendsContended",
    "SentRecord",
    "StoreError",
    "SuppressionEntry",
    "SuspendReason",
    "TlsSessionCount",
    "as_utc",
    "utcnow",
]


class StoreError(StorageError):
    """The storage backend failed (I/O, lock timeout, corruption). Retry later or fail with 4xx, never 5xx."""


class SendsContended(StoreError):
    """A message's sent-ledger write found a recipient's send cap used up since the cap was checked (another
    message to them was accepted meanwhile): nothing of it was written. Answer 451 (the client tries again
    and then finds the cap's real answer), never 5xx: the cap was free when this message asked."""


class SchemaTooNewError(StoreError):
    """The database schema is newer than this code knows; running on it could corrupt it."""


class Scope(StrEnum):
    """Whom a suppression entry protects the recipient from (DESIGN.md "Reasons and scopes")."""

    GLOBAL = "global"  # every account: hard bounces, spam traps
    ACCOUNT = "account"  # one sending account: complaints
    LIST = "list"  # one list of one account: unsubscribes


class Reason(StrEnum):
    """Why an address is suppressed; the value appears in replies: ``suppressed (hard_bounce)``."""

    HARD_BOUNCE = "hard_bounce"
    SOFT_BOUNCE_LIMIT = "soft_bounce_limit"
    COMPLAINT = "complaint"
    UNSUBSCRIBE = "unsubscribe"
    SPAMTRAP = "spamtrap"
    MANUAL = "manual"
    DISCARD = "discard"


class SuspendReason(StrEnum):
    """Why an account is suspended (DESIGN.md thresholds); add a member rather than passing free text."""

    COMPLAINT_RATE = "complaint_rate"
    HARD_BOUNCE_RATE = "hard_bounce_rate"
    SPAMTRAP = "spamtrap"
    MANUAL = "manual"


#: Order in which ``check`` picks among several matching entries for one address: the broadest scope wins,
#: because its reason (a hard bounce, a spam trap) says the most about the address.
SCOPE_PRECEDENCE: Mapping[Scope, int] = {Scope.GLOBAL: 0, Scope.ACCOUNT: 1, Scope.LIST: 2}


@dataclass(frozen=True, slots=True)
class SuppressionEntry:
    """One suppression: ``address`` must not receive mail within ``scope`` until ``expires_at`` (if any).

    The key is ``(address, scope, account, list)``: adding an entry with the same key replaces the old one.
    ``account`` is set for account and list scope, ``list`` only for list scope; anything else raises
    ``ValueError`` here, so an inconsistent entry never reaches a backend.
    """

    address: str
    scope: Scope
    account: str | None
    list: str | None
    reason: Reason
    source: str
    created_at: datetime
    expires_at: datetime | None = None

    def __post_init__(self) -> None:
        # The type checks keep this cheap for the common case: a 1 M-row import builds 1 M entries.
        if type(self.scope) is not Scope:
            object.__setattr__(self, "scope", Scope(self.scope))
        if type(self.reason) is not Reason:
            object.__setattr__(self, "reason", Reason(self.reason))
        if self.created_at.tzinfo is not UTC:
            object.__setattr__(self, "created_at", as_utc(self.created_at))
        if self.expires_at is not None and self.expires_at.tzinfo is not UTC:
            object.__setattr__(self, "expires_at", as_utc(self.expires_at))
        if not self.address:
            raise ValueError("suppression entry needs an address")
        if self.scope is Scope.GLOBAL and (self.account or self.list):
            raise ValueError("global suppression takes neither account nor list")
        if self.scope is Scope.ACCOUNT and (not self.account or self.list):
            raise ValueError("account suppression needs an account and no list")
        if self.scope is Scope.LIST and (not self.account or not self.list):
            raise ValueError("list suppression needs an account and a list")

    def is_active(self, now: datetime) -> bool:
        """True while the entry blocks mail: it has no expiry, or expires after ``now``."""
        return self.expires_at is None or self.expires_at > as_utc(now)

    def as_json(self) -> dict[str, Any]:
        """The entry as one JSON object: what ``relayd suppress list --json`` prints and what a store
        export carries (one shape, so an export can be read like a listing)."""
        return {
            "address": self.address,
            "scope": str(self.scope),
            "account": self.account,
            "list": self.list,
            "reason": str(self.reason),
            "source": self.source,
            "created_at": self.created_at.isoformat(),
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
        }


@dataclass(frozen=True, slots=True)
class AccountState:
    """Whether ``account`` may send. ``since`` is when the current (suspended or reinstated) state began."""

    account: str
    suspended: bool
    reason: SuspendReason | None
    details: str
    since: datetime


@dataclass(frozen=True, slots=True)
class SentRecord:
    """One accepted recipient: what a token's (queue id, index) stands for."""

    queue_id: str
    index: int
    account: str
    list: str | None
    address: str
    sent_at: datetime


@dataclass(frozen=True, slots=True)
class ConsentRecord:
    """Proof that ``address`` asked for the mail of ``list`` of ``account`` (DESIGN.md "Reasons and scopes").

    Double opt-in with proof (seeds/003, seeds/004): *when* (``confirmed_at``, microseconds, UTC), *from
    where* (``ip``; ``''`` when the channel had none) and *with what* (``user_agent``, ``None`` when
    unknown); ``source`` says which channel recorded it (``double-opt-in`` for the confirm page,
    ``csv:<file>`` for an import), ``evidence`` is a JSON object with whatever else that channel knew (the
    confirmation mail's queue id, the sign-up form). Key: ``(account, list, address)``; there is one record
    per key, and adding one with the same key replaces it. A consent is always for a named list: the unnamed
    list of an account has no configuration and so can't require consent.
    """

    account: str
    list: str
    address: str
    confirmed_at: datetime
    ip: str
    user_agent: str | None
    source: str
    evidence: str = "{}"

    def __post_init__(self) -> None:
        object.__setattr__(self, "confirmed_at", as_utc(self.confirmed_at))
        if not self.account or not self.list or not self.address:
            raise ValueError("a consent record needs an account, a list and an address")

    def as_json(self) -> dict[str, Any]:
        """The proof as one JSON object (``relayd consent list --json``, the tenant API): ``evidence`` as
        an object (text that is not JSON as ``{"text": ...}``), times in UTC with ``Z``."""
        try:
            evidence = json.loads(self.evidence)
        except ValueError:
            evidence = {"text": self.evidence}
        return {
            "account": self.account,
            "list": self.list,
            "address": self.address,
            "confirmed_at": self.confirmed_at.isoformat().replace("+00:00", "Z"),
            "ip": self.ip,
            "user_agent": self.user_agent,
            "source": self.source,
            "evidence": evidence,
        }


@dataclass(frozen=True, slots=True)
class MtaStsRecord:
    """An MTA-STS policy as fetched for ``domain`` (RFC 8461 §3.2), with the TXT ``policy_id`` it was
    fetched under; valid until ``fetched_at + max_age`` seconds."""

    domain: str
    policy_id: str
    mode: str  # enforce, testing, none
    mx: tuple[str, ...]
    max_age: int
    fetched_at: datetime

    @property
    def expires_at(self) -> datetime:
        return self.fetched_at + timedelta(seconds=self.max_age)


@dataclass(frozen=True, slots=True)
class TlsSessionCount:
    """TLS sessions of one UTC ``day`` to the MX hosts of policy ``domain`` under one policy (RFC 8460
    §4.4): successful ones (``result_type`` empty, no receiving host), or failed ones of one result type
    at one receiving host. ``policy`` is the policy's JSON (``policy-string`` and ``mx-host``)."""

    day: date
    domain: str
    policy_type: str  # sts, tlsa
    policy: str
    result_type: str
    receiving_mx: str
    receiving_ip: str
    sessions: int


@dataclass(frozen=True, slots=True)
class InboxItem:
    """One message kept for a person (relayd.desk.inbox): what a listing shows, and the raw bytes when
    asked for (``raw`` is None in listings). ``truncated``: only the first bytes of ``size`` were kept."""

    id: int
    received_at: datetime
    kind: str
    source: str
    mail_from: str
    from_header: str
    subject: str
    date_header: str
    note: str
    size: int
    truncated: bool
    state: str = "open"  # open, done
    done_at: datetime | None = None
    raw: bytes | None = None


@dataclass(frozen=True, slots=True)
class DmarcCount:
    """The rows of one DMARC aggregate report (RFC 7489 appendix C) about one source IP, added up:
    messages in all, passing SPF and DKIM (any domain), passing them aligned (what DMARC counts), and
    what the receiver did with the failing ones (quarantined, rejected)."""

    domain: str
    day: date
    org: str
    report_id: str
    source_ip: str
    total: int
    spf_pass: int
    dkim_pass: int
    spf_aligned: int
    dkim_aligned: int
    dmarc_pass: int  # SPF or DKIM aligned: the message passed DMARC
    quarantined: int
    rejected: int


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One API key of ``account``, as stored: never the key itself, only its SHA-256 (``key_hash``, hex).

    ``key_id`` is the public part of the key (it is written in the key and shown by ``list``), so a request
    finds its row with one indexed lookup and the secret part is compared in constant time against one hash.
    A revoked key keeps its row (``revoked_at`` set): the listing shows what existed and when it stopped.
    """

    key_id: str
    account: str
    key_hash: str
    name: str
    created_at: datetime
    revoked_at: datetime | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "created_at", as_utc(self.created_at))
        if self.revoked_at is not None:
            object.__setattr__(self, "revoked_at", as_utc(self.revoked_at))
        if not self.key_id or not self.account or not self.key_hash:
            raise ValueError("an API key needs an id, an account and a hash")
