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

from relayd.reports.dsn import limits

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
_CONTENT_TYPE_FIELD = re.compile(rb"^content-type[ \t]*:", re.IGNORECASE | re.MULTILINE)
_TAG = re.compile(r"<[^>]*>")
_BLOCK_TAG = re.compile(r"<\s*(?:br|/p|/div|/tr|/li|/h\d|p|div)\b[^>]*>", re.IGNORECASE)
_SCRIPT_OPEN = re.compile(r"<(script|style)\b", re.IGNORECASE)
_SCRIPT_CLOSE = {
    "script": re.compile(r"</script\s*>", re.IGNORECASE),
    "style": re.compile(r"</style\s*>", re.IGNORECASE),
}


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


@dataclass(slots=True)
class _Budget:
    """MIME parts still to be examined in one message (:data:`limits.MAX_PARTS`)."""

    parts: int = limits.MAX_PARTS


def normalise_newlines(raw: bytes) -> bytes:
    """CRLF and lone CR to LF, so wire copies and stored copies parse the same."""
    return raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


def parse_message(raw: bytes) -> email.message.Message | None:
    """Parse with the lenient compat32 policy (header defects never raise later).

    Over-long Content-Type fields are cut first (:func:`bound_content_types`).
    """
    try:
        return email.message_from_bytes(bound_content_types(raw), policy=email.policy.compat32)
    except Exception:  # the parser itself is defensive; this is belt and braces
        return None


def bound_content_types(raw: bytes) -> bytes:
    """``raw`` with every Content-Type field (folded lines included) cut to
    :data:`limits.CONTENT_TYPE_LIMIT` bytes, in the message and in its parts.

    The standard library reads parameters (``boundary`` while parsing, ``charset`` and
    ``report-type`` later) in time quadratic in the field's length: 64 KB of ``;``
    inside quotes costs seconds, 1 MB hours (Python 3.11's ``email.message._parseparam``).
    A real Content-Type field is a few hundred bytes.
    """
    out: list[bytes] = []
    done = 0
    for match in _CONTENT_TYPE_FIELD.finditer(raw):
        start = match.start()
        if start < done:
            continue
        end = _field_end(raw, start)
        if end - start > limits.CONTENT_TYPE_LIMIT:
            # No trailing line break or fold: that would end the header block early.
            out.append(raw[done:start])
            out.append(raw[start : start + limits.CONTENT_TYPE_LIMIT].rstrip(b" \t\r\n"))
            done = end
    if not out:
        return raw
    out.append(raw[done:])
    return b"".join(out)


def _field_end(raw: bytes, start: int) -> int:
    """Index of the line break that ends the header field starting at ``start``."""
    end = raw.find(b"\n", start)
    while end >= 0 and raw[end + 1 : end + 2] in (b" ", b"\t"):
        end = raw.find(b"\n", end + 1)
    return len(raw) if end < 0 else end


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
    """Decoded text of a leaf part; HTML is reduced to its text.

    Only the first :data:`limits.PART_LIMIT` bytes of the decoded part are read.
    """
    try:
        payload = part.get_payload(decode=True)
    except Exception:
        payload = None
    if not isinstance(payload, bytes):
        raw = part.get_payload()
        payload = raw.encode("latin-1", "replace") if isinstance(raw, str) else _raw_body(part)
    payload = payload[: limits.PART_LIMIT]
    try:
        charset = part.get_content_charset()
    except Exception:
        charset = None
    text = decode_bytes(payload, charset)
    if part.get_content_subtype() == "html":
        text = html_to_text(text)
    return text


def html_to_text(text: str) -> str:
    """Crude but sufficient: drop scripts and tags, keep line structure and entities.

    Linear in the length of ``text``, whatever it holds: the HTML comes from whoever
    sent the report (see :func:`_drop_scripts` and :func:`_sub_tags`).
    """
    text = _drop_scripts(text)
    text = _sub_tags(_BLOCK_TAG, "\n", text)
    text = _sub_tags(_TAG, " ", text)
    return html.unescape(text)


def _drop_scripts(text: str) -> str:
    """Replace each ``<script ...>...</script>`` (and style) element with a space.

    Each element ends at the first closing tag of its name after its opening, as the
    lazy regex ``<(script|style)\\b.*?</\\1\\s*>`` would say; but that regex scans to the end
    of the text again for every unclosed opening (quadratic in ``<script `` repeated).
    Here a name whose closing tag was not found once is never searched for again: no
    later opening of it can be closed either.
    """
    out: list[str] = []
    done = 0
    closable = {"script": True, "style": True}
    opening = _SCRIPT_OPEN.search(text)
    while opening is not None:
        # By length, not by lower(): IGNORECASE also matches a long s (U+017F) for "s".
        name = "script" if len(opening.group(1)) == 6 else "style"
        closing = _SCRIPT_CLOSE[name].search(text, opening.end()) if closable[name] else None
        if closing is None:
            closable[name] = False
            if not any(closable.values()):
                break
            opening = _SCRIPT_OPEN.search(text, opening.end())
            continue
        out.append(text[done : opening.start()])
        out.append(" ")
        done = closing.end()
        opening = _SCRIPT_OPEN.search(text, done)
    out.append(text[done:])
    return "".join(out)


def _sub_tags(pattern: re.Pattern[str], replacement: str, text: str) -> str:
    """``pattern.sub`` for a tag pattern that ends at the first ``>`` after its start.

    Without a ``>`` further on, every ``<`` makes such a pattern scan to the end of the
    text (quadratic); no match can end after the last ``>``, so only the text up to it
    is searched.
    """
    last = text.rfind(">")
    if last < 0:
        return text
    return pattern.sub(replacement, text[: last + 1]) + text[last + 1 :]


def status_text(part: email.message.Message) -> str:
    """Body of a message/delivery-status part (transfer-decoded, as text)."""
    payload = part.get_payload()
    data = payload.encode("latin-1", "replace") if isinstance(payload, str) else _raw_body(part)
    data = _transfer_decode(data, str(part.get("Content-Transfer-Encoding", "")))
    return decode_bytes(data[: limits.PART_LIMIT], "utf-8")


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
    _walk(msg, anatomy, texts, 0, _Budget())
    body = _unquote("\n".join(texts)[: limits.PART_LIMIT])
    anatomy.body_text = body
    notice, pasted = split_returned(body)
    anatomy.notice = notice[: limits.NOTICE_LIMIT]
    if anatomy.original is None and pasted is not None:
        anatomy.original = pasted
    return anatomy


def _walk(
    part: email.message.Message, anatomy: Anatomy, texts: list[str], depth: int, budget: _Budget
) -> None:
    if depth > 20 or budget.parts <= 0:
        return
    budget.parts -= 1
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
            _walk(inner, anatomy, texts, depth + 1, budget)
        elif anatomy.original is None:
            anatomy.original = embedded_headers(part)
        return
    if part.is_multipart():
        payload = part.get_payload()
        if isinstance(payload, list):
            for sub in payload:
                if isinstance(sub, email.message.Message):
                    _walk(sub, anatomy, texts, depth + 1, budget)
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
