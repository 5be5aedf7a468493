"""The author of a message: the addresses of its From and Sender fields, read one way only.

Why apart from the From rule (:mod:`relayd.policy.rules.fromheader`): the rule checks these addresses
against the account, and the rewrite picks the DKIM ``d=`` that must align with the From domain
(:func:`relayd.policy.render.signing_domain`, RFC 7489 §3.1.1); both must read the same address out of
the same field.

Parsing is :func:`email.utils.getaddresses`, a linear scanner, on the unfolded value, at most
:data:`MAX_FIELD` characters; ``email.headerregistry`` is the stricter parser but super-linear on hostile
input (2 KB of ``"`` take 70 ms, 100 KB minutes). Since the point is that no receiver may read another
domain out of the field than we did (the parser differentials of Chen et al., "Composition Kills",
USENIX Security 2020), a value we can't read one way only is refused, not guessed: a quoted string or
comment that doesn't close, comments nested deeper than :data:`MAX_NESTING`, an entry without an
``@domain``, or a number of ``@`` outside quoted strings and comments that differs from the number of
addresses found (``x@acme.example@beta.example``, an obsolete route ``<@beta.example:x@acme.example>``).
A display name that looks like an address (``"ceo@beta.example" <x@acme.example>``) is a quoted string
and is fine: the address is acme's. An encoded word is not an address (RFC 2047 §5) and is never decoded
into one.
"""

from __future__ import annotations

import email.utils
from dataclasses import dataclass
from email.message import Message

__all__ = ["MAX_FIELD", "MAX_NESTING", "Mailbox", "author_domain", "field_values", "parse_mailboxes"]

#: Longest From or Sender value read (unfolded); longer is refused. Real ones are well under 200.
MAX_FIELD = 2048
#: Deepest comment nesting read: the stdlib scanner recurses once per level.
MAX_NESTING = 8


@dataclass(frozen=True, slots=True)
class Mailbox:
    """One address of a From or Sender field: the addr-spec, and its domain as written."""

    address: str
    domain: str


def field_values(headers: Message, name: str) -> list[str]:
    """Every ``name`` field of ``headers``, unfolded, as text (raw UTF-8 decoded, RFC 6532).

    ``raw_items`` rather than ``get_all``: compat32 turns a value with 8-bit octets into a
    ``Header`` object whose ``str()`` loses them."""
    wanted = name.lower()
    out = []
    for key, value in headers.raw_items():
        if key.lower() == wanted:
            text = str(value).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            out.append(text.replace("\r", "").replace("\n", ""))  # unfold (RFC 5322 §2.2.3)
    return out


def _at_signs(value: str) -> int | None:
    """``@`` outside quoted strings and comments; None when a quoted string or comment doesn't close or
    comments nest deeper than :data:`MAX_NESTING` (one linear pass, RFC 5322 §3.2.4, §3.2.2)."""
    ats = depth = 0
    quoted = escaped = False
    for ch in value:
        if escaped:
            escaped = False
        elif ch == "\\" and (quoted or depth):
            escaped = True
        elif quoted:
            quoted = ch != '"'
        elif ch == "(":
            depth += 1
            if depth > MAX_NESTING:
                return None
        elif depth:
            depth -= ch == ")"
        elif ch == '"':
            quoted = True
        elif ch == "@":
            ats += 1
    return None if quoted or depth or escaped else ats


def parse_mailboxes(value: str) -> tuple[Mailbox, ...] | None:
    """The addresses of a From or Sender value (groups flattened), or None when it can't be read one way
    only (see the module docstring): no address, an entry without a local part or domain, a count of
    ``@`` that doesn't match, an unclosed quote or comment, or a value over :data:`MAX_FIELD`."""
    if len(value) > MAX_FIELD:
        return None
    ats = _at_signs(value)
    if ats is None:
        return None
    try:
        pairs = email.utils.getaddresses([value])
    except (RecursionError, IndexError, ValueError):  # defensive: the scanner's own limits
        return None
    out = []
    for name, addr in pairs:
        if not name and not addr:
            continue  # an empty list element or an empty group (RFC 5322 §4.4 obs-mbox-list)
        local, at, domain = addr.rpartition("@")
        if not at or not local or not domain or domain not in value:
            return None  # getaddresses completes what it can't read (`x@[` becomes `x@[]`): no guessing
        out.append(Mailbox(addr, domain))
    if not out or len(out) != ats:
        return None
    return tuple(out)


def author_domain(headers: Message) -> str | None:
    """The domain of the (first) From address, or None when there is no From field, more than one, or
    one :func:`parse_mailboxes` can't read. What DKIM ``d=`` must align with (RFC 7489 §3.1.1)."""
    values = field_values(headers, "From")
    if len(values) != 1:
        return None
    mailboxes = parse_mailboxes(values[0])
    return mailboxes[0].domain if mailboxes else None
