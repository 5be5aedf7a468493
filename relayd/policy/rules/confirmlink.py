"""Double opt-in: ``{{confirm_url}}`` only where a person clicks.

Why: the confirm link is the proof that the owner of an address asked for the list
(:mod:`relayd.policy.rules.consent`). Anyone who holds the link can confirm (the page records the consent on a
POST any client can send), so a link fetched without a person -- an image, a stylesheet, a prefetch, a
form, the query of another URL the sender's server answers -- hands the token to the sender, who then
confirms the subscription itself. In a confirmation mail (``X-Relayd-Optin``) the placeholder may stand
only:

* in an HTML part, as the whole value of the first ``href`` attribute of an ``<a>`` start tag
  (``<a href="{{confirm_url}}">``; quotes optional, blanks around the value allowed);
* in a text part, as a URL on its own: between whitespace or line boundaries, or as
  ``<{{confirm_url}}>`` (RFC 3986 Appendix C).

Anywhere else the message is refused, ``554 5.7.1``, with the place named: another tag or attribute
(``<img src>``, ``<link href>``, ``<form action>``, ``style=``, ``<a href="https://x/?u={{confirm_url}}">``),
the text, a comment or the ``<style>``/``<script>`` content of an HTML part, a text part where it is glued
to other characters (``https://tracker.example/?u={{confirm_url}}``), a header field of any part, an
attachment, a forwarded message, a multipart preamble or epilogue. Where the rewrite would not fill it in
(headers, attachments) it could not leak, but the sender evidently meant something else, and is told.

The text looked at is the text the rewrite substitutes in (:func:`relayd.mail.footer.decode_text`:
the same transfer and charset decoding, in the same parts, :func:`relayd.mail.rewrite.text_parts`), so
a placeholder split by quoted-printable soft breaks or hidden in base64 is found where it would be filled
in.

HTML is read by a small scanner following the states of the WHATWG tokenizer that matter here (data, tag,
attribute, comment, bogus comment, the raw text of ``<script>``, ``<style>`` and friends) rather than by
:mod:`html.parser`, which is quadratic on unclosed tags in the Python we run (100 KB of ``<a `` takes
100 s). The scanner is linear: every step consumes input. A tag left open at the end of the part is a
place of its own (a browser drops it), so a placeholder in it is misplaced.
"""

from __future__ import annotations

import bisect
import email.header
import re
from dataclasses import dataclass, field
from email import errors as email_errors
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32

from relayd.mail.confirmation import CONFIRM_PLACEHOLDER
from relayd.mail.footer import decode_text
from relayd.mail.rewrite import canonical_crlf, text_parts, transfer_encoding
from relayd.policy.model import Action, ContentRequest, Verdict

__all__ = ["MAX_HTML", "ConfirmLinkRule", "misplaced_confirm_link"]

_PH = CONFIRM_PLACEHOLDER

# WHATWG "ASCII whitespace" (tab, LF, FF, CR, space): Python's \s matches more (\v, \x1c-\x1f, Unicode
# spaces), which a browser treats as part of a name or value.
_TAG_NAME = re.compile(r"[^\t\n\f\r />]*")
_ATTR_NAME = re.compile(r"[^\t\n\f\r />][^\t\n\f\r />=]*")
_BETWEEN_ATTRS = re.compile(r"[\t\n\f\r /]*")
_SPACE = re.compile(r"[\t\n\f\r ]*")
_UNQUOTED = re.compile(r"[^\t\n\f\r >]*")
_HTML_SPACE = "\t\n\f\r "

#: elements whose content is raw text up to their end tag: a "<a href>" inside is not a link
_RAW_TEXT = frozenset(
    {"script", "style", "textarea", "title", "xmp", "iframe", "noembed", "noframes", "noscript"}
)
_END_TAGS: dict[str, re.Pattern[str]] = {
    name: re.compile(rf"</{name}(?=[\t\n\f\r />]|\Z)", re.IGNORECASE) for name in _RAW_TEXT
}

#: longest HTML part (characters) of a confirmation mail that may hold the placeholder: the scanner is
#: linear but pure Python (about 1 s per MiB of hostile markup), and a real confirmation mail is a few KB
MAX_HTML = 1024 * 1024

#: header values longer than this are searched for the literal placeholder only, not RFC 2047-decoded
#: (the stdlib's encoded-word pattern is lazy and backtracks on long hostile values)
_DECODE_HEADER_MAX = 998


@dataclass
class _Scan:
    """What the scanner found in one HTML text: the placeholder positions that are a link, and the
    places (start, end, name) of tags, attribute values, comments and raw text, each list sorted."""

    links: set[int] = field(default_factory=set)
    tags: list[tuple[int, int, str]] = field(default_factory=list)
    values: list[tuple[int, int, str]] = field(default_factory=list)


def _letter(ch: str) -> bool:
    return ch.isascii() and ch.isalpha()


def _comment_end(text: str, start: int) -> int:
    """End of a comment whose body starts at ``start`` (after ``<!--``): ``-->`` or ``--!>``; ``<!-->``
    and ``<!--->`` close at once (WHATWG "abrupt closing of empty comment"); unclosed, the rest."""
    if text.startswith(">", start):
        return start + 1
    if text.startswith("->", start):
        return start + 2
    ends = [e + k for e, k in ((text.find("-->", start), 3), (text.find("--!>", start), 4)) if e >= 0]
    return min(ends) if ends else len(text)


def _check_link(text: str, attrs: list[tuple[str, int, int]], scan: _Scan) -> None:
    """An ``<a>`` tag: its first ``href`` (the one a browser uses) is a link when its whole value is the
    placeholder. Any other placeholder in the tag (``ping=``, a second ``href``) stays misplaced."""
    href = next(((s, e) for a, s, e in attrs if a == "href"), None)
    if href is None:
        return
    value = text[href[0] : href[1]]
    if value.strip(_HTML_SPACE) == _PH:
        scan.links.add(href[0] + value.index(_PH))


def _place(spans: list[tuple[int, int, str]], pos: int) -> str | None:
    i = bisect.bisect_right(spans, pos, key=lambda s: s[0]) - 1
    if i >= 0 and spans[i][0] <= pos < spans[i][1]:
        return spans[i][2]
    return None


def _run(pattern: re.Pattern[str], text: str, pos: int) -> int:
    """End of ``pattern``'s match at ``pos`` (the patterns here match a run of one character class)."""
    m = pattern.match(text, pos)
    return pos if m is None else m.end()


def _scan_tag(text: str, i: int, scan: _Scan) -> tuple[str, list[tuple[str, int, int]], int, bool]:
    """Read a tag whose name starts at ``i``: (lower-case name, attributes as (name, value start, value
    end), end of the tag, whether it was closed by ``>`` before the end of ``text``)."""
    n = len(text)
    j = _run(_TAG_NAME, text, i)
    name = text[i:j].lower()
    attrs: list[tuple[str, int, int]] = []
    while True:
        j = _run(_BETWEEN_ATTRS, text, j)
        if j >= n:
            return name, attrs, n, False
        if text[j] == ">":
            return name, attrs, j + 1, True
        start = j
        j = _run(_ATTR_NAME, text, j)  # text[j] is none of the stop characters: at least one matches
        aname = text[start:j].lower()
        k = _run(_SPACE, text, j)
        if k < n and text[k] == "=":
            k = _run(_SPACE, text, k + 1)
            if k < n and text[k] in "\"'":
                close = text.find(text[k], k + 1)
                if close < 0:
                    scan.values.append((k + 1, n, f"<{name} {aname}>"))
                    return name, attrs, n, False
                attrs.append((aname, k + 1, close))
                j = close + 1
            else:
                j = _run(_UNQUOTED, text, k)
                attrs.append((aname, k, j))
            scan.values.append((attrs[-1][1], attrs[-1][2], f"<{name} {aname}>"))
        else:
            attrs.append((aname, j, j))


def _scan_html(text: str) -> _Scan:
    """One pass over an HTML part: where each tag, attribute value, comment and raw text is, and which
    placeholders are the whole ``href`` of an ``<a>``."""
    scan = _Scan()
    n = len(text)
    pos = 0
    while (lt := text.find("<", pos)) >= 0:
        nxt = text[lt + 1 : lt + 2]
        after = text[lt + 2 : lt + 3]
        if text.startswith("!--", lt + 1):
            pos = _comment_end(text, lt + 4)
            scan.tags.append((lt, pos, "an HTML comment"))
        elif nxt in ("!", "?") or (nxt == "/" and after not in (">", "") and not _letter(after)):
            close = text.find(">", lt)  # a declaration, processing instruction or bogus comment
            pos = n if close < 0 else close + 1
            scan.tags.append((lt, pos, "an HTML declaration or comment"))
        elif nxt == "/" and after == ">":
            pos = lt + 3  # "</>" is dropped
        elif (nxt == "/" and _letter(after)) or _letter(nxt):
            end_tag = nxt == "/"
            name, attrs, end, closed = _scan_tag(text, lt + (2 if end_tag else 1), scan)
            label = f"</{name}>" if end_tag else f"<{name}>"
            scan.tags.append((lt, end, label if closed else f"{label}, which is never closed"))
            if not closed:
                break
            pos = end
            if end_tag:
                continue
            if name == "a":
                _check_link(text, attrs, scan)
            if name in _RAW_TEXT:
                found = _END_TAGS[name].search(text, end)
                pos = n if found is None else found.start()
                scan.tags.append((end, pos, f"the content of <{name}>"))
            elif name == "plaintext":
                scan.tags.append((end, n, "the content of <plaintext>"))
                break
        else:
            pos = lt + 1  # a "<" that starts no tag is text
    return scan


def _positions(text: str) -> list[int]:
    out = []
    pos = text.find(_PH)
    while pos >= 0:
        out.append(pos)
        pos = text.find(_PH, pos + len(_PH))
    return out


def _in_html(text: str) -> str | None:
    positions = _positions(text)
    if not positions:
        return None
    if len(text) > MAX_HTML:
        return f"an HTML part of more than {MAX_HTML // 1024} KiB (too long to check)"
    scan = _scan_html(text)
    for pos in positions:
        if pos not in scan.links:
            return _place(scan.values, pos) or _place(scan.tags, pos) or "the text of an HTML part"
    return None


def _in_text(text: str) -> str | None:
    end = len(_PH)
    for pos in _positions(text):
        before = text[pos - 1] if pos else " "
        after = text[pos + end] if pos + end < len(text) else " "
        if not ((before.isspace() and after.isspace()) or (before == "<" and after == ">")):
            return "a text part, next to other characters (only a URL on its own is a link)"
    return None


def _header_text(value: object) -> str:
    """A header value as written, plus its RFC 2047 decoding when it has encoded words."""
    raw = str(value)
    if "=?" not in raw or len(raw) > _DECODE_HEADER_MAX:
        return raw
    try:
        decoded = str(email.header.make_header(email.header.decode_header(raw)))
    except (email_errors.HeaderParseError, LookupError, UnicodeError, ValueError):
        return raw
    return raw + "\n" + decoded


def _in_opaque(part: Message) -> bool:
    """Whether a part the rewrite leaves alone holds the placeholder, as written or decoded."""
    payload = part.get_payload()
    if isinstance(payload, str) and _PH in payload:
        return True
    decoded = part.get_payload(decode=True)
    return isinstance(decoded, bytes) and _PH.encode() in decoded


def misplaced_confirm_link(raw: bytes) -> str | None:
    """Where in the message ``raw`` (as submitted) the confirm placeholder stands somewhere other than a
    link a person clicks (see the module docstring), or None when every occurrence is a link.

    Raises :class:`~relayd.mail.headers.MimeError` for a text part the rewrite couldn't decode either."""
    message = BytesParser(policy=compat32).parsebytes(canonical_crlf(raw))
    body = {id(p) for p in text_parts(message)}
    for part in message.walk():
        for name, value in part.raw_items():
            if _PH in _header_text(value):
                return f"the {name[:64]}: header field"
        if part.is_multipart():
            for edge, what in (
                (part.preamble, "a multipart preamble"),
                (part.epilogue, "a multipart epilogue"),
            ):
                if edge and _PH in edge:
                    return what
            continue
        if id(part) not in body:
            if _in_opaque(part):
                return f"a {part.get_content_type()} part that is not the message text"
            continue
        payload = part.get_payload()
        encoded = payload.encode("ascii", "surrogateescape") if isinstance(payload, str) else b""
        text, _ = decode_text(encoded, charset=part.get_content_charset(), cte=transfer_encoding(part))
        where = _in_html(text) if part.get_content_subtype() == "html" else _in_text(text)
        if where is not None:
            return where
    return None


class ConfirmLinkRule:
    """Refuse a confirmation mail whose confirm link could be fetched without a person
    (a :class:`~relayd.policy.model.ContentRule`; other mail has no confirm link)."""

    name = "confirm_link"

    def check(self, req: ContentRequest) -> Verdict | None:
        if not req.optin:
            return None
        where = misplaced_confirm_link(req.raw)
        if where is None:
            return None
        return Verdict(
            Action.REJECT,
            self.name,
            "confirm_link",
            f"554 5.7.1 Message refused: {_PH} may stand only as the whole href of an <a> in HTML or "
            f"as a URL on its own in text, not in {_show(where)}",
        )


def _show(where: str) -> str:
    """A place as it may appear in a reply line: tag and field names come from the message, so
    printable ASCII only, and short."""
    shown = "".join(c if c.isascii() and c.isprintable() else "?" for c in where[:100])
    return shown if len(where) <= 100 else shown + "..."
