"""Which message, account, list and recipient a report is about: attribution by our own tokens only.

Attribution trusts only our own HMAC'd tokens (:mod:`relayd.core.tokens`), never what a report *says*:

1. a token is found: the VERP return path ``bounce+<token>@`` the report was sent to, an ``X-Relayd-ID``
   (purpose "trace") or VERP address in the returned original headers, or, for a human-forwarded
   complaint, any of those or the unsubscribe token anywhere in the forwarded content;
2. its (queue id, index) is looked up in the sent ledger;
3. its MAC is verified against the *ledger's* address for its purpose.

A token passing all three vouches for one (account, list, address). Anything else (no token, unknown
message, bad MAC) attributes nothing; :class:`Miss` says which, for the ``unattributed`` event.

Cost is bounded whatever a report contains: at most :data:`MAX_CANDIDATES` distinct tokens are looked up,
at most :data:`SCAN_LIMIT` bytes of content are searched, and the patterns run in linear time.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from relayd.core.address import AddressError, normalize
from relayd.core.tokens import parse_token, verify_token
from relayd.reports.dsn import DsnReport
from relayd.reports.dsn.message import parse_message
from relayd.store import SentLedger, SentRecord

log = logging.getLogger(__name__)

__all__ = [
    "MAX_CANDIDATES",
    "SCAN_LIMIT",
    "Attribution",
    "Candidate",
    "Miss",
    "attribute",
    "content_candidates",
    "dsn_candidates",
    "same_address",
    "tokens_in",
]

_TOKEN = rb"[a-z2-7]{16}-[0-9]{1,6}-[a-z2-7]{16}"
#: ``X-Relayd-ID:`` header, also when a human's mail client quoted it (``> X-Relayd-ID: ...``) or folded it.
#: The quote prefix never spans a line break: ``^[>\s]*`` would run over every following blank line from
#: every line start (quadratic in a run of newlines); it finds the same tokens.
_TRACE_RE = re.compile(rb"^[> \t\r\f\v]*X-Relayd-ID:[ \t]*(?:\r?\n[ \t]+)?(" + _TOKEN + rb")", re.I | re.M)
_VERP_RE = re.compile(rb"bounce\+(" + _TOKEN + rb")@", re.I)
#: the unsubscribe link (``/u/<token>``) and mailto (``unsubscribe+<token>@``) in the footer of every mail
_UNSUB_RE = re.compile(rb"(?:unsubscribe\+|/u/)(" + _TOKEN + rb")", re.I)

#: How many distinct tokens one report may make us look up: a report stuffed with tokens (or junk shaped
#: like them) costs at most this many ledger reads.
MAX_CANDIDATES = 8
#: How much decoded content of a forwarded complaint is searched for tokens.
SCAN_LIMIT = 2_000_000


@dataclass(frozen=True, slots=True)
class Candidate:
    purpose: str  # "verp" | "trace" | "unsub"
    token: str
    where: str  # "envelope" | "original-headers" | "content"


@dataclass(frozen=True, slots=True)
class Attribution:
    """A report tied to one accepted recipient by a verified token."""

    record: SentRecord
    purpose: str
    where: str


@dataclass(slots=True)
class Miss:
    """Why no candidate attributed the report (for the ``unattributed`` event)."""

    tried: int = 0
    unknown: int = 0
    bad_mac: int = 0
    seen: set[tuple[str, str]] = field(default_factory=set)

    def why(self) -> str:
        if self.bad_mac:
            return "bad token"
        if self.unknown:
            return "unknown message"
        return "no token"


def tokens_in(data: bytes | None, where: str, *, unsub: bool = False) -> list[Candidate]:
    """Our tokens in ``data``: trace headers, then VERP addresses, then (``unsub``) unsubscribe links."""
    if not data:
        return []
    found = [Candidate("trace", m.group(1).decode().lower(), where) for m in _TRACE_RE.finditer(data)]
    found += [Candidate("verp", m.group(1).decode().lower(), where) for m in _VERP_RE.finditer(data)]
    if unsub:
        found += [Candidate("unsub", m.group(1).decode().lower(), where) for m in _UNSUB_RE.finditer(data)]
    return found


async def attribute(
    ledger: SentLedger, secret: bytes, candidates: Iterable[Candidate], miss: Miss | None = None
) -> Attribution | None:
    """The first candidate whose token is in the ledger and verifies against the ledger's address."""
    miss = miss if miss is not None else Miss()
    for cand in candidates:
        if (cand.purpose, cand.token) in miss.seen:
            continue
        if miss.tried >= MAX_CANDIDATES:
            break
        miss.seen.add((cand.purpose, cand.token))
        ref = parse_token(cand.token)
        if ref is None:
            continue
        miss.tried += 1
        record = await ledger.lookup_sent(ref.queue_id, ref.index)
        if record is None:
            miss.unknown += 1
            continue
        if verify_token(secret, cand.purpose, cand.token, record.address) is None:
            miss.bad_mac += 1
            log.info("report token for %s-%d has a bad MAC (%s)", ref.queue_id, ref.index, cand.where)
            continue
        return Attribution(record, cand.purpose, cand.where)
    return None


def dsn_candidates(report: DsnReport, raw: bytes, verp_token: str | None) -> Iterator[Candidate]:
    """Envelope VERP token first; then tokens in the returned original (some MTAs bounce to the From,
    not to the return path); then, for bounces that paste the original into text, the whole message."""
    if verp_token:
        yield Candidate("verp", verp_token.lower(), "envelope")
    yield from tokens_in(report.original_headers, "original-headers")
    yield from tokens_in(raw[:SCAN_LIMIT], "content")


def content_candidates(raw: bytes) -> Iterator[Candidate]:
    """Tokens anywhere in a forwarded message: every part decoded (base64, quoted-printable), because a
    human's mail client re-encodes what it forwards."""
    yield from tokens_in(raw[:SCAN_LIMIT], "content", unsub=True)
    msg = parse_message(raw)
    if msg is None:
        return
    budget = SCAN_LIMIT
    for n, part in enumerate(msg.walk()):
        if n > 200 or budget <= 0:
            return
        if part.is_multipart():
            continue
        try:
            payload = part.get_payload(decode=True)
        except Exception:
            continue
        if isinstance(payload, bytes) and payload:
            chunk = payload[:budget]
            budget -= len(chunk)
            yield from tokens_in(chunk, "content", unsub=True)


def same_address(a: str | None, b: str) -> bool:
    """Whether a report's address ``a`` is ``b``, as the listener normalised ``b`` when it was sent."""
    if not a:
        return False
    return _norm(a) == _norm(b)


def _norm(address: str) -> str:
    try:
        return normalize(address.strip().strip("<>"))
    except AddressError:
        return address.strip().strip("<>").lower()
