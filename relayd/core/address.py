"""Mailbox address normalisation: one canonical string per mailbox.

Why: suppression, send caps, consent and events are keyed by address. If ``Alice@Example.TEST`` and
``alice@example.test`` were different keys, an unsubscribe recorded from one spelling would not stop mail to
the other. Every address is therefore passed through :func:`normalize` once, at the edge (RCPT TO, CSV import,
the CLI, DSN/ARF attribution), and the store compares plain strings.

Decisions:

* **The whole address is lower-cased, local part included.** RFC 5321 section 2.4 says the local part MAY be
  case-sensitive, but no mailbox provider that matters treats it so, and every ESP we model (see
  ``shared/seeds/``) folds case. Folding errs on the side of *not* mailing someone who asked not to be mailed.
* **The domain is IDNA-encoded to A-labels** (``bücher.example`` -> ``xn--bcher-kva.example``) with the
  ``idna`` package (IDNA 2008 with UTS #46 mapping; the stdlib codec is IDNA 2003, which maps ``ß`` to
  ``ss``). Pure-ASCII domains skip the codec: they are checked against the RFC 5321 ``Domain`` grammar
  (letters, digits, hyphens) directly, because the codec costs ~20 µs per call and a 1 M-row CSV import
  cannot afford that.
* **Quoted local parts stay correct**: ``"john doe"@example.test`` keeps its quotes; a quoted local part that
  is also a valid dot-atom is unquoted (``"john"@x`` is the same mailbox as ``john@x``, RFC 5321 section
  4.1.2); inside quotes only ``"`` and ``\\`` are backslash-escaped.
* **``+tags`` are kept** unless ``strip_plus_tags=True``: sub-addressing is a provider convention, not a
  standard, and some providers use ``+`` as an ordinary character.
* Non-ASCII local parts (RFC 6531/6532, SMTPUTF8) are accepted and put in Unicode NFC.
* Address literals (``user@[192.0.2.1]``, ``user@[IPv6:2001:db8::1]``) are accepted and canonicalised.
* Lengths follow RFC 5321 section 4.5.3.1: local part <= 64 octets, domain <= 255, address <= 254.

Failure: anything that is not a syntactically valid mailbox raises :class:`AddressError` (a ``ValueError``),
with a message saying what is wrong; no other exception escapes (checked by a Hypothesis test).
"""

from __future__ import annotations

import functools
import ipaddress
import re
import unicodedata

import idna as _idna

__all__ = ["IDNA_IMPLEMENTATION", "AddressError", "normalize"]

#: Which IDNA implementation :func:`normalize` uses, for ``relayd --version``-style reports and tests.
IDNA_IMPLEMENTATION = "idna"

MAX_LOCAL_OCTETS = 64
MAX_DOMAIN_OCTETS = 255
MAX_ADDRESS_OCTETS = 254  # RFC 5321 4.5.3.1.3: a path is <= 256 octets including "<" and ">"


class AddressError(ValueError):
    """The text is not a syntactically valid mailbox address."""


# RFC 5322 atext, plus any non-ASCII character except C1 controls and whitespace (RFC 6532 section 3.2).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]|[^\x00-\x9f\s]"
_DOT_ATOM = re.compile(rf"(?:{_ATEXT})+(?:\.(?:{_ATEXT})+)*")
_LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# The common case (ASCII dot-atom @ LDH domain, no brackets or spaces), checked in one regex pass; it
# yields exactly what the general path would, about three times faster (CSV imports of millions of rows).
_ASCII_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_SIMPLE = re.compile(rf"{_ASCII_ATEXT}+(?:\.{_ASCII_ATEXT}+)*@[A-Za-z0-9.-]+")


def normalize(addr: str, *, strip_plus_tags: bool = False) -> str:
    """Return the canonical form of mailbox ``addr``; see the module docstring for the rules.

    ``addr`` may carry surrounding whitespace and one pair of angle brackets (``<a@b.example>``, as in an
    SMTP path). The null path ``<>`` and source routes (``<@relay:a@b>``) are not mailboxes and raise.
    The result is idempotent: ``normalize(normalize(a)) == normalize(a)``.
    """
    if not strip_plus_tags and _SIMPLE.fullmatch(addr):
        simple = addr.lower()
        local, _, domain = simple.partition("@")
        if len(local) <= MAX_LOCAL_OCTETS and len(simple) <= MAX_ADDRESS_OCTETS:
            _check_ascii_domain(domain)
            return simple
    text = addr.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    if not text:
        raise AddressError("empty address")
    if text.startswith("@"):
        raise AddressError("source routes are not accepted")
    local, domain = _split(text)
    local = _normalize_local(local, strip_plus_tags)
    domain = _normalize_domain(domain)
    result = f"{local}@{domain}"
    if len(result.encode("utf-8")) > MAX_ADDRESS_OCTETS:
        raise AddressError(f"address longer than {MAX_ADDRESS_OCTETS} octets")
    return result


def _split(text: str) -> tuple[str, str]:
    """Split into (local part as written, domain), honouring a quoted local part that contains ``@``."""
    if text.startswith('"'):
        i = 1
        while i < len(text):
            ch = text[i]
            if ch == "\\":
                i += 2
                continue
            if ch == '"':
                break
            i += 1
        else:
            raise AddressError("unterminated quoted local part")
        local, rest = text[: i + 1], text[i + 1 :]
        if not rest.startswith("@"):
            raise AddressError("quoted local part must be followed by '@'")
        return local, rest[1:]
    local, sep, domain = text.partition("@")
    if not sep:
        raise AddressError("missing '@'")
    return local, domain


def _normalize_local(local: str, strip_plus_tags: bool) -> str:
    if local.startswith('"'):
        content = _unquote(local)
    else:
        if not _DOT_ATOM.fullmatch(local):
            raise AddressError("local part is not a valid dot-atom; quote it")
        content = local
    content = unicodedata.normalize("NFC", content.lower())
    if _DOT_ATOM.fullmatch(content):
        if strip_plus_tags and "+" in content:
            base = content.split("+", 1)[0]
            # "a.+tag" would leave "a.", not a dot-atom: keep such a local part whole rather than invent one.
            if _DOT_ATOM.fullmatch(base):
                content = base
        out = content
    else:
        out = '"' + content.replace("\\", "\\\\").replace('"', '\\"') + '"'
    _check_utf8(out, "local part")
    if len(out.encode("utf-8")) > MAX_LOCAL_OCTETS:
        raise AddressError(f"local part longer than {MAX_LOCAL_OCTETS} octets")
    return out


def _unquote(quoted: str) -> str:
    """Content of an RFC 5321 ``Quoted-string`` (qtextSMTP / quoted-pairSMTP, plus UTF-8 per RFC 6531)."""
    body = quoted[1:-1]
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "\\":
            if i + 1 >= len(body):
                raise AddressError("dangling backslash in quoted local part")
            nxt = body[i + 1]
            if not (" " <= nxt <= "~"):
                raise AddressError("invalid quoted-pair in local part")
            out.append(nxt)
            i += 2
            continue
        if ch == '"':
            raise AddressError("unescaped quote in quoted local part")
        if not (" " <= ch <= "~" or ch > "\x9f"):
            raise AddressError("control character in quoted local part")
        out.append(ch)
        i += 1
    return "".join(out)


def _check_utf8(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates
        raise AddressError(f"{what} is not valid Unicode") from exc


def _normalize_domain(domain: str) -> str:
    if not domain:
        raise AddressError("empty domain")
    if domain.startswith("["):
        return _normalize_literal(domain)
    if domain.isascii():
        return _check_ascii_domain(domain.lower())
    _check_utf8(domain, "domain")
    return _check_ascii_domain(_to_alabels(domain))


def _normalize_literal(domain: str) -> str:
    """RFC 5321 section 4.1.3 address literals, canonicalised by :mod:`ipaddress`."""
    if not domain.endswith("]"):
        raise AddressError("unterminated address literal")
    inner = domain[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            return f"[ipv6:{ipaddress.IPv6Address(inner[5:]).compressed}]"
        return f"[{ipaddress.IPv4Address(inner)}]"
    except ValueError as exc:
        raise AddressError(f"invalid address literal {domain!r}") from exc


@functools.lru_cache(maxsize=4096)
def _to_alabels(domain: str) -> str:
    """IDNA-encode a non-ASCII domain; cached because real lists repeat a few domains many times."""
    try:
        return _idna.encode(domain, uts46=True).decode("ascii")
    except (UnicodeError, ValueError) as exc:  # idna.IDNAError is a UnicodeError
        raise AddressError(f"domain {domain!r} is not a valid IDN: {exc}") from exc


@functools.lru_cache(maxsize=65536)
def _check_ascii_domain(domain: str) -> str:
    """Check a lower-case ASCII domain against RFC 5321 ``Domain`` (LDH labels, no trailing dot).

    ``xn--`` labels must decode as valid IDNA, so a bogus A-label cannot sneak past the fast path.
    """
    if len(domain) > MAX_DOMAIN_OCTETS:
        raise AddressError(f"domain longer than {MAX_DOMAIN_OCTETS} octets")
    for label in domain.split("."):
        if not _LDH_LABEL.fullmatch(label):
            if not label:
                raise AddressError(f"empty label in domain {domain!r}")
            raise AddressError(f"invalid label {label!r} in domain {domain!r}")
        if label.startswith("xn--"):
            try:
                _idna.decode(label)
            except (UnicodeError, ValueError) as exc:
                raise AddressError(f"invalid A-label {label!r} in domain {domain!r}") from exc
    return domain
