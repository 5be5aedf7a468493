"""Take a raw bounce apart: notice text, delivery-status blocks, returned original.

Bounces arrive as anything from a tidy RFC 3464 ``multipart/report`` to a text/plain
notice with the returned message pasted under a dashed line, in any charset, with CRLF
or LF line ends, sometimes forwarded by a human with ``> `` quoting. This module turns
all of that into an :class:`Anatomy` of plain ``str`` pieces that the parsers work on.
Nothing here raises on bad input: an undecodable part becomes replacement characters, a
part that cannot be parsed at all is skipped.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.header
import email.message
import email.policy
import html
import quopri
import re
from dataclasses import dataclass, field

_REPORT_TYPES = frozenset({"message/delivery-status", "message/global-delivery-status"})
_ORIGINAL_TYPES = frozenset(
    {
        "message/rfc822",
        "message/global",
        "text/rfc822-headers",
        "message/rfc822-headers",
        "text/rfc822-header",
        "message/partial",
        "message/global-headers",
    }
)

#: Lines after which a notice pastes the returned message (or its headers), per MTA.
_RETURNED_MARKERS = re.compile(
    r"""^[ \t>]*(?:
        -+\s*this\ is\ a\ copy\ of\ (?:the|your)\ message        # Exim
      | -+\s*below\ this\ line\ is\ a\ copy\ of\ the\ message   # qmail, Yahoo
      | -+\s*(?:original|returned|unsent|undelivered|rejected)\ (?:message|mail)  # Sendmail, Notes, Gmail
      | message\ headers\ follow                                # DragonFly
      | original\ message:?\s*$                                 # Verizon
      | original\ mail\ as\ follows                             # fml
      | -+\s*original\ message\ headers?                        # various
      | -+\s*the\ header\ of\ the\ original\ message
      | original\ message\ headers?:                            # Exchange text
      | content-type:\ message/rfc822                           # pasted MIME part
      | -+\s*message\ text\s*-+                                 # old Sendmail
      | -+\s*header\ of\ the\ returned\ message                 # various
      | the\ attachment\ contains\ the\ original\ mail\ headers # X6
    )""",
    re.IGNORECASE | re.MULTILINE | re.VERBOSE,
)

_HEADER_LINE = re.compile(rb"^[A-Za-z][A-Za-z0-9-]*:")
_TAG = re.compile(r"<[^>]*>")
_BLOCK_TAG = re.compile(r"<\s*(?:br|/p|/div|/tr|/li|/h\d|p|div)\b[^>]*>", re.IGNORECASE)
_SCRIPT = re.compile(r"<(script|style)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)


@dataclass(slots=True)
class Anatomy:
    """The pieces of a bounce that the classifiers read.

    ``notice`` is the human-readable text before any returned message; ``status_texts``
    the bodies of message/delivery-status parts; ``original`` the header block of the
    returned message (bytes, LF line ends) if present; ``headers`` the bounce's own
    top-level header fields (name lower-cased, first value wins).
    """

    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "text/plain"
    report_type: str | None = None
    notice: str = ""
    status_texts: list[str] = field(default_factory=list)
    original: bytes | None = None
    body_text: str = ""


def normalise_newlines(raw: bytes) -> bytes:
    """CRLF and lone CR to LF, so wire copies and stored copies parse the same."""
    return raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


def parse_message(raw: bytes) -> email.message.Message | None:
    """Parse with the lenient compat32 policy (header defects never raise later)."""
    try:
        return email.message_from_bytes(raw, policy=email.policy.compat32)
    except Exception:  # the parser itself is defensive; this is belt and braces
        return None


def decode_bytes(data: bytes, charset: str | None) -> str:
    """Decode ``data`` in ``charset``, falling back to UTF-8 and then Latin-1."""
    for candidate in (charset, "utf-8"):
        if not candidate:
            continue
        try:
            return data.decode(candidate)
        except (LookupError, UnicodeDecodeError, ValueError):
            continue
    return data.decode("latin-1")


def header_text(value: object) -> str:
    """A header value as text, RFC 2047 words decoded where possible."""
    if value is None:
        return ""
    if not isinstance(value, str):
        value = str(value)
    try:
        parts = email.header.decode_header(value)
    except Exception:
        return value
    out = []
    for chunk, charset in parts:
        if isinstance(chunk, bytes):
            out.append(decode_bytes(chunk, charset))
        else:
            out.append(chunk)
    return "".join(out)


def _raw_body(part: email.message.Message) -> bytes:
    """The undecoded body of a part whose payload the parser turned into sub-messages."""
    try:
        data = part.as_bytes()
    except Exception:
        return b""
    cut = data.find(b"\n\n")
    return data[cut + 2 :] if cut >= 0 else b""


def _transfer_decode(data: bytes, cte: str) -> bytes:
    cte = cte.strip().lower()
    try:
        if cte == "base64":
            return base64.b64decode(data, validate=False)
        if cte == "quoted-printable":
            return quopri.decodestring(data)
    except (binascii.Error, ValueError):
        return data
    return data


def part_text(part: email.message.Message) -> str:
    """Decoded text of a leaf part; HTML is reduced to its text."""
    try:
        payload = part.get_payload(decode=True)
    except Exception:
        payload = None
    if not isinstance(payload, bytes):
        raw = part.get_payload()
        payload = raw.encode("latin-1", "replace") if isinstance(raw, str) else _raw_body(part)
    try:
        charset = part.get_content_charset()
    except Exception:
        charset = None
    text = decode_bytes(payload, charset)
    if part.get_content_subtype() == "html":
        text = html_to_text(text)
    return text


def html_to_text(text: str) -> str:
    """Crude but sufficient: drop scripts and tags, keep line structure and entities."""
    text = _SCRIPT.sub(" ", text)
    text = _BLOCK_TAG.sub("\n", text)
    text = _TAG.sub(" ", text)
    return html.unescape(text)


def status_text(part: email.message.Message) -> str:
    """Body of a message/delivery-status part (transfer-decoded, as text)."""
    payload = part.get_payload()
    data = payload.encode("latin-1", "replace") if isinstance(payload, str) else _raw_body(part)
    data = _transfer_decode(data, str(part.get("Content-Transfer-Encoding", "")))
    return decode_bytes(data, "utf-8")


def header_block(data: bytes) -> bytes | None:
    """The leading header block of a message-like blob, or None if it has none."""
    lines = data.lstrip(b"\n").split(b"\n")
    out: list[bytes] = []
    for line in lines:
        if not line.strip():
            break
        if not out and not _HEADER_LINE.match(line):
            return None
        out.append(line)
    if not any(_HEADER_LINE.match(line) for line in out):
        return None
    return b"\n".join(out) + b"\n"


def embedded_headers(part: email.message.Message) -> bytes | None:
    payload = part.get_payload()
    if isinstance(payload, list) and payload:
        inner = payload[0]
        if isinstance(inner, email.message.Message):
            try:
                return header_block(inner.as_bytes())
            except Exception:
                return None
    data = _transfer_decode(_raw_body(part), str(part.get("Content-Transfer-Encoding", "")))
    if isinstance(payload, str):
        data = _transfer_decode(
            payload.encode("latin-1", "replace"), str(part.get("Content-Transfer-Encoding", ""))
        )
    return header_block(data)


def _unquote(text: str) -> str:
    """Undo one level of ``> `` quoting when a human forwarded the bounce inline."""
    lines = text.split("\n")
    quoted = [line for line in lines if line.startswith(">")]
    if len(quoted) < 5 or len(quoted) * 2 < len([line for line in lines if line.strip()]):
        return text
    return "\n".join(
        line[2:] if line.startswith("> ") else line[1:] if line.startswith(">") else line for line in lines
    )


def _dedent_block(text: str) -> str:
    lines = text.split("\n")
    indents = [len(line) - len(line.lstrip(" ")) for line in lines if line.strip()]
    width = min(indents) if indents else 0
    return "\n".join(line[width:] for line in lines)


def split_returned(text: str) -> tuple[str, bytes | None]:
    """Split a notice at the returned-message marker: (notice, original headers)."""
    match = _RETURNED_MARKERS.search(text)
    if not match:
        return text, None
    notice = text[: match.start()]
    rest = text[match.end() :]
    rest = rest.split("\n", 1)[1] if "\n" in rest else ""
    block = header_block(_dedent_block(rest.lstrip("\n")).encode("utf-8", "replace"))
    return notice, block


def dissect(raw: bytes) -> Anatomy | None:
    """Take ``raw`` apart into an :class:`Anatomy`, or None if it is no message at all."""
    msg = parse_message(normalise_newlines(raw))
    if msg is None:
        return None
    anatomy = Anatomy()
    for name, value in msg.items():
        anatomy.headers.setdefault(name.lower(), header_text(value))
    try:
        anatomy.content_type = msg.get_content_type()
        anatomy.report_type = msg.get_param("report-type")  # type: ignore[assignment]
        if anatomy.report_type is not None and not isinstance(anatomy.report_type, str):
            anatomy.report_type = None
    except Exception:
        anatomy.report_type = None
    texts: list[str] = []
    _walk(msg, anatomy, texts, depth=0)
    body = _unquote("\n".join(texts))
    anatomy.body_text = body
    notice, pasted = split_returned(body)
    anatomy.notice = notice
    if anatomy.original is None and pasted is not None:
        anatomy.original = pasted
    return anatomy


def _walk(part: email.message.Message, anatomy: Anatomy, texts: list[str], depth: int) -> None:
    if depth > 20:
        return
    try:
        ctype = part.get_content_type()
    except Exception:
        ctype = "text/plain"
    if ctype in _REPORT_TYPES:
        anatomy.status_texts.append(status_text(part))
        return
    if ctype in _ORIGINAL_TYPES:
        inner = _embedded_report(part)
        if inner is not None and not anatomy.status_texts:
            # A bounce forwarded as an attachment (some gateways wrap the MTA's DSN):
            # read the wrapped report as if it were the message itself.
            _walk(inner, anatomy, texts, depth + 1)
        elif anatomy.original is None:
            anatomy.original = embedded_headers(part)
        return
    if part.is_multipart():
        payload = part.get_payload()
        if isinstance(payload, list):
            for sub in payload:
                if isinstance(sub, email.message.Message):
                    _walk(sub, anatomy, texts, depth + 1)
        return
    if ctype.startswith("text/") or depth == 0:
        text = part_text(part)
        if anatomy.original is None and depth > 0 and texts and _looks_like_headers(text):
            # A text/plain attachment holding the original headers (X6, some gateways).
            anatomy.original = header_block(text.encode("utf-8", "replace"))
            return
        if anatomy.original is None or not texts:
            texts.append(text)


def _embedded_report(part: email.message.Message) -> email.message.Message | None:
    payload = part.get_payload()
    if not isinstance(payload, list) or not payload:
        return None
    inner = payload[0]
    if not isinstance(inner, email.message.Message):
        return None
    try:
        is_report = inner.get_content_type() == "multipart/report" and any(
            sub.get_content_type() in _REPORT_TYPES for sub in inner.walk()
        )
    except Exception:
        return None
    return inner if is_report else None


def _looks_like_headers(text: str) -> bool:
    head = text.lstrip("\n")[:2000]
    lines = [line for line in head.split("\n")[:8] if line.strip()]
    return len(lines) >= 3 and all(
        _HEADER_LINE.match(line.encode("utf-8", "replace")) or line[:1] in " \t" for line in lines
    )
