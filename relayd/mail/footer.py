"""The unsubscribe footer and imprint, injected into one text/plain or text/html body part.

Each part is rewritten once per message into *segments*: bytes that are final, plus slots for the
per-recipient unsubscribe URL.  Rendering a recipient is then a join, not a re-encode:

* 7bit/8bit/binary parts: the URL is spliced in as ASCII; the footer is encoded in the part's charset.
* quoted-printable parts (RFC 2045 §6.7): the URL goes on its own encoded line(s), split every 75 characters
  with soft line breaks, so no line exceeds 76 characters whatever the URL length.  The URL alphabet has no
  ``=`` so it needs no escaping.
* base64 parts (RFC 2045 §6.8): the decoded text up to the first slot is encoded once, cut at a multiple of
  57 octets (one 76-character line); only the short tail (< 57 octets + URL + rest of footer) is encoded
  per recipient.

The app's own encoded bytes are kept wherever possible (the footer is *spliced into* a 7bit/8bit/QP body);
the part is re-encoded only when it must be: ``{{unsubscribe_url}}`` substitution, a footer its charset can't
represent (then the part becomes UTF-8 and its ``charset`` parameter changes, RFC 2046 §4.1.2), a 7bit part
that now holds 8-bit text or lines too long for SMTP (then it becomes quoted-printable).  Every result is
decoded again with a sample URL and compared with the intended text; a mismatch never ships.
"""

from __future__ import annotations

import binascii
import codecs
import enum
import functools
import html
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from relayd.mail.headers import CRLF, MimeError, has_long_line

#: What an app writes in its body to place the unsubscribe link itself.
PLACEHOLDER = "{{unsubscribe_url}}"

#: Longest per-recipient value ``Template.render`` accepts; the prepare-time checks assume it.
MAX_VALUE_LEN = 256

#: Characters of the per-recipient URL: safe verbatim in QP (no ``=``), HTML (no ``&<>"'``) and headers.
URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789:/._~-"

DEFAULT_TEXT_TEMPLATE = "\n\n-- \nUnsubscribe: {url}\n{imprint}\n"
DEFAULT_HTML_TEMPLATE = (
    '\n<div style="margin-top:2em;font-size:12px;color:#666666">'
    '<a href="{url}">Unsubscribe</a><br>\n{imprint}</div>\n'
)
DEFAULT_TEXT_IMPRINT_TEMPLATE = "\n\n-- \n{imprint}\n"
DEFAULT_HTML_IMPRINT_TEMPLATE = '\n<div style="margin-top:2em;font-size:12px;color:#666666">{imprint}</div>\n'

_TOKEN = re.compile(r"\{(url|imprint)\}")


@dataclass(frozen=True, slots=True)
class FooterSpec:
    """What to append to every text part of an account's messages.

    Templates use ``{url}`` (the per-recipient unsubscribe URL, exactly once) and ``{imprint}``; other
    braces are literal, so CSS in the HTML template needs no escaping.  ``{imprint}`` is inserted verbatim
    in text parts and HTML-escaped (newlines become ``<br>``) in HTML parts.  The ``*_imprint_template``
    variants, without ``{url}``, are used for parts whose body already places the link with
    ``{{unsubscribe_url}}``: the link must not appear twice, the imprint must still be there.

    ``link=False`` (transactional mail, :mod:`relayd.policy.rules.messageclass`): every part gets the imprint
    templates and no ``{{unsubscribe_url}}`` is substituted, so the message carries no unsubscribe link.
    """

    text_template: str
    html_template: str
    imprint: str
    text_imprint_template: str = DEFAULT_TEXT_IMPRINT_TEMPLATE
    html_imprint_template: str = DEFAULT_HTML_IMPRINT_TEMPLATE
    link: bool = True

    def __post_init__(self) -> None:
        for name in ("text_template", "html_template"):
            if _TOKEN.findall(getattr(self, name)).count("url") != 1:
                raise ValueError(f"FooterSpec.{name} must contain {{url}} exactly once")
        for name in ("text_imprint_template", "html_imprint_template"):
            if "url" in _TOKEN.findall(getattr(self, name)):
                raise ValueError(f"FooterSpec.{name} must not contain {{url}}")
        if not all(line.isprintable() for line in self.imprint.split("\n")):
            raise ValueError("FooterSpec.imprint must be printable text (newlines allowed)")


class Slot(enum.Enum):
    """Per-recipient holes in a part's encoded body."""

    URL = "url"  # the URL as ASCII bytes
    URL_QP = "url_qp"  # the URL as quoted-printable lines ending in soft breaks (starts at column 0)


@dataclass(frozen=True, slots=True)
class Base64Tail:
    """The end of a base64 part, encoded per recipient because it contains the URL.

    ``pieces`` are decoded octets with ``None`` where the URL goes; the static base64 before it ends on a
    line boundary, so the tail's lines simply follow.
    """

    pieces: tuple[bytes | None, ...]
    final_crlf: bool

    def render(self, url: bytes) -> bytes:
        """The tail's base64 lines for one recipient's ``url``."""
        data = b"".join(url if p is None else p for p in self.pieces)
        return _b64_lines(data, self.final_crlf)


Segment = bytes | Slot | Base64Tail


@dataclass(frozen=True, slots=True)
class PartRewrite:
    """A text part's new body, plus the header changes it needs (``None``: header stays as it is)."""

    segments: tuple[Segment, ...]
    charset: str | None
    cte: str | None


def render_url_qp(url: bytes) -> bytes:
    """``url`` as quoted-printable lines of at most 76 characters, each ending in a soft break."""
    return b"".join(url[i : i + 75] + b"=\r\n" for i in range(0, len(url), 75))


def rewrite_part(
    body: bytes,
    *,
    subtype: str,
    charset: str | None,
    cte: str,
    spec: FooterSpec,
    placeholder: str = PLACEHOLDER,
) -> PartRewrite:
    """Append the footer to one text part's encoded ``body`` (``subtype`` "plain" or "html").

    ``charset`` is the declared parameter (``None``: US-ASCII, RFC 2045 §5.2) and ``cte`` the lower-cased
    Content-Transfer-Encoding ("7bit" when absent).  ``placeholder`` is the text that becomes the URL
    slot (a confirmation mail uses ``{{confirm_url}}``, see :mod:`relayd.mail.confirmation`).  Raises
    :class:`MimeError` when the body can't be decoded (unknown transfer encoding, invalid base64, unknown
    charset with 8-bit text) or when the footer can't be added without re-encoding text that isn't valid in
    its declared charset.
    """
    text, codec = decode_text(body, charset=charset, cte=cte)
    html_part = subtype == "html"
    substitute = spec.link and placeholder in text
    offset = _insertion_point(text) if html_part else len(text)
    nl = "\r\n" if cte != "base64" else _newline_of(text)
    footer = _footer_pieces(spec, html_part, substitute or not spec.link, nl)

    if not substitute and cte != "base64":
        fast = _splice(body, text, offset, footer, codec, cte)
        if fast is not None:
            expected = [text[:offset], *footer, text[offset:]]
            if _check(fast, cte, codec, expected) is _Check.OK:
                return PartRewrite(tuple(fast), None, None)

    pieces = [*_substitute(text[:offset], placeholder), *footer, *_substitute(text[offset:], placeholder)]
    final_crlf = body.endswith(CRLF)
    done = _reencode(pieces, codec, cte, final_crlf)
    label: str | None = None
    if done is None and codec != "utf-8":
        # The charset can't carry the footer (or the URL): the part becomes UTF-8 (RFC 2046 §4.1.2),
        # which is only safe when the text decoded cleanly.
        if _has_surrogates(text):
            raise MimeError(
                f"text part is not valid {charset or 'us-ascii'} and the footer can't be represented in "
                "it; re-encoding would corrupt the text (RFC 2046 §4.1.2)"
            )
        label = "utf-8"
        done = _reencode(pieces, "utf-8", cte, final_crlf)
    if done is None:
        raise MimeError(f"footer can't be added to this {charset or 'us-ascii'} text part without damage")
    segments, new_cte = done
    return PartRewrite(tuple(segments), label, new_cte if new_cte != cte else None)


def decode_text(body: bytes, *, charset: str | None, cte: str) -> tuple[str, str]:
    """(text, codec) of one text part's encoded ``body``: the text :func:`rewrite_part` puts the footer
    into and substitutes placeholders in, so a check of that text sees exactly what the rewrite sees.

    Octets invalid in the charset are kept as surrogate escapes. Raises :class:`MimeError` like
    :func:`rewrite_part` (unknown transfer encoding, invalid base64, unknown charset with 8-bit text)."""
    content = _decode_cte(body, cte)
    codec = _codec(charset)
    if codec is None:
        if not content.isascii():
            raise MimeError(f"text part has unknown charset {charset!r} and 8-bit content (RFC 2046 §4.1.2)")
        codec = "ascii"  # every MIME charset is a superset of ASCII for pure-ASCII content
    try:
        return content.decode(codec, "surrogateescape"), codec
    except UnicodeError:
        raise MimeError(f"text part can't be decoded as {charset!r} (RFC 2046 §4.1.2)") from None


def _reencode(
    pieces: list[str | None], codec: str, cte: str, final_crlf: bool
) -> tuple[list[Segment], str] | None:
    """Encode the whole new text in ``codec`` and a transfer encoding; ``None`` if the result is wrong.

    A 7bit part that now holds 8-bit octets (RFC 2045 §2.7), or a 7bit/8bit part with lines over 998
    octets (RFC 5322 §2.1.1), becomes quoted-printable; otherwise the transfer encoding stays.
    """
    encoded = _encode_pieces(pieces, codec)
    if encoded is None:
        return None
    if cte == "7bit" and not all(p is None or p.isascii() for p in encoded):
        cte = "quoted-printable"
    segments = _encode_body(encoded, cte, final_crlf=final_crlf)
    outcome = _check(segments, cte, codec, pieces)
    if outcome is _Check.TOO_LONG and cte in _IDENTITY:
        cte = "quoted-printable"
        segments = _encode_body(encoded, cte, final_crlf=final_crlf)
        outcome = _check(segments, cte, codec, pieces)
    return (segments, cte) if outcome is _Check.OK else None


_IDENTITY = frozenset({"7bit", "8bit", "binary"})
_BODY_CLOSE = re.compile(r"</body\s*>", re.IGNORECASE)
_BODY_CLOSE_B = re.compile(rb"</body\s*>", re.IGNORECASE)
# Codecs that are not charsets at all, or that ignore error handlers: treated like unknown labels.
_NOT_CHARSETS = frozenset(
    {"idna", "punycode", "unicode-escape", "raw-unicode-escape", "undefined", "mbcs", "oem"}
)
_SAMPLE_URL = ("https://sample.invalid/u/" + "a1-~._:" * 40)[:MAX_VALUE_LEN]


def _decode_cte(body: bytes, cte: str) -> bytes:
    if cte in _IDENTITY:
        return body
    if cte == "quoted-printable":
        return binascii.a2b_qp(body)
    if cte == "base64":
        try:
            return binascii.a2b_base64(b"".join(body.split()), strict_mode=True)
        except binascii.Error:
            raise MimeError("text part has invalid base64 content (RFC 2045 §6.8)") from None
    raise MimeError(f"text part has unknown Content-Transfer-Encoding {cte!r} (RFC 2045 §6.4)")


@functools.lru_cache(maxsize=128)
def _codec(charset: str | None) -> str | None:
    """Python codec name for a MIME charset label, or ``None`` when it names no usable text codec."""
    try:
        info = codecs.lookup(charset or "us-ascii")
        "".encode(info.name)  # rejects bytes-to-bytes codecs such as "base64" or "rot13"
    except (LookupError, ValueError, TypeError):  # ValueError: NUL in the name; UnicodeError is one
        return None
    if info.name in _NOT_CHARSETS:
        return None
    return info.name


@functools.lru_cache(maxsize=128)
def _url_safe(codec: str) -> bool:
    """Whether the URL alphabet and CRLF encode as themselves (false for UTF-7, UTF-16, HZ, EBCDIC)."""
    probe = URL_ALPHABET + "\r\n"
    try:
        return probe.encode(codec) == probe.encode("ascii")
    except UnicodeError:
        return False


@functools.lru_cache(maxsize=128)
def _ascii_safe(codec: str) -> bool:
    """Whether every octet < 0x80 in this charset is that ASCII character, wherever it occurs.

    True for UTF-8 and single-octet charsets; false for Shift_JIS/Big5/GBK (ASCII octets as trail bytes)
    and ISO-2022 (escape-sequence state).  Only then can ``</body>`` be searched in the encoded bytes.
    """
    if codec in ("utf-8", "ascii"):
        return True
    if "2022" in codec or codec in ("utf-7", "hz") or codec.startswith(("utf-16", "utf-32")):
        return False
    decoded = bytes(range(256)).decode(codec, "replace")
    return len(decoded) == 256 and decoded[:128] == bytes(range(128)).decode("ascii")


def _insertion_point(text: str) -> int:
    """Just before the last ``</body>`` (any case, RFC-free HTML habit), else the end of the text.

    Searching backwards from the end finds it after a tag or two in real mail; a forward regex scan
    would cost a pass over the whole document.
    """
    end = len(text)
    while (i := text.rfind("</", 0, end)) >= 0:
        if _BODY_CLOSE.match(text, i):
            return i
        end = i
    return len(text)


def _last_body_close(data: bytes) -> int | None:
    """Byte twin of :func:`_insertion_point`, for encoded bodies; ``None`` when there is none."""
    end = len(data)
    while (i := data.rfind(b"</", 0, end)) >= 0:
        if _BODY_CLOSE_B.match(data, i):
            return i
        end = i
    return None


def _has_surrogates(text: str) -> bool:
    """Whether decoding met octets invalid in the charset (kept as surrogate escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _newline_of(text: str) -> str:
    """The line break a base64-encoded text already uses, so the footer matches it."""
    if "\r\n" in text:
        return "\r\n"
    return "\n" if "\n" in text else "\r\n"


def _footer_pieces(spec: FooterSpec, html_part: bool, substituted: bool, nl: str) -> list[str | None]:
    if html_part:
        template = spec.html_imprint_template if substituted else spec.html_template
    else:
        template = spec.text_imprint_template if substituted else spec.text_template
    return list(_template_pieces(template, spec.imprint, html_part, nl))


@functools.lru_cache(maxsize=64)
def _template_pieces(template: str, imprint: str, html_part: bool, nl: str) -> tuple[str | None, ...]:
    """The footer as text pieces with ``None`` where the URL goes, line breaks already ``nl``."""
    if html_part:
        imprint = html.escape(imprint).replace("\n", "<br>\n")
    pieces: list[str | None] = []
    pos = 0
    for m in _TOKEN.finditer(template):
        pieces.append(template[pos : m.start()])
        pieces.append(None if m.group(1) == "url" else imprint)
        pos = m.end()
    pieces.append(template[pos:])
    merged: list[str | None] = []
    for p in pieces:
        if p is not None and merged and merged[-1] is not None:
            merged[-1] += p
        else:
            merged.append(p)
    return tuple(p if p is None else p.replace("\r\n", "\n").replace("\n", nl) for p in merged)


def _substitute(text: str, placeholder: str = PLACEHOLDER) -> list[str | None]:
    """Split ``text`` at each ``placeholder`` (``{{unsubscribe_url}}``), which becomes a URL slot."""
    out: list[str | None] = []
    for i, chunk in enumerate(text.split(placeholder)):
        if i:
            out.append(None)
        out.append(chunk)
    return out


def _encode_pieces(pieces: Sequence[str | None], codec: str) -> list[bytes | None] | None:
    """Encode each text piece in ``codec``; ``None`` if it can't represent them or the URL."""
    if not _url_safe(codec):
        return None
    try:
        return [None if p is None else p.encode(codec, "surrogateescape") for p in pieces]
    except UnicodeError:
        return None


def _splice(
    body: bytes,
    text: str,
    offset: int,
    footer: list[str | None],
    codec: str,
    cte: str,
) -> list[Segment] | None:
    """Insert the encoded footer into the untouched encoded ``body``; ``None`` when that isn't possible."""
    enc = _encode_pieces(footer, codec)
    if enc is None:
        return None
    if cte == "7bit" and not all(p is None or p.isascii() for p in enc):
        return None
    at_end = offset == len(text)
    if at_end:
        cut = len(body)
    elif not _ascii_safe(codec):
        return None
    else:
        # In QP "</body>" is literal unless a soft break splits it; if the last encoded one is not the
        # last decoded one, the check in rewrite_part fails and the part is re-encoded instead.
        found = _last_body_close(body)
        if found is None:
            return None
        cut = found
    if cte in _IDENTITY:
        return [body[:cut], *(Slot.URL if p is None else p for p in enc), body[cut:]]
    head, tail = body[:cut], body[cut:]
    out: list[Segment] = []
    col0 = True
    if head:
        out.append(head)
        col0 = head.endswith(CRLF)
        if not col0 and head.endswith(b"="):
            out.append(CRLF)  # the app's body ends in a bare soft break: complete it
            col0 = True
    col0 = _append_qp(out, enc, col0)
    if tail:
        if not col0:
            out.append(b"=\r\n")
        out.append(tail)
    return out


def _qp(data: bytes) -> bytes:
    """Quoted-printable with CRLF line breaks and lines of at most 76 characters (RFC 2045 §6.7).

    Text line breaks are canonical CRLF (RFC 2046 §4.1.1): a lone CR or LF becomes one.
    """
    data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return binascii.b2a_qp(data, istext=True).replace(b"\n", CRLF)


def _append_qp(out: list[Segment], pieces: Iterable[bytes | None], col0: bool) -> bool:
    """Append QP-encoded ``pieces`` to ``out``; every piece and URL starts at column 0 (soft break)."""
    for p in pieces:
        if p is None:
            if not col0:
                out.append(b"=\r\n")
            out.append(Slot.URL_QP)
            col0 = True
        elif p:
            if not col0:
                out.append(b"=\r\n")
            enc = _qp(p)
            out.append(enc)
            col0 = enc.endswith(CRLF)
    return col0


def _b64_lines(data: bytes, final_crlf: bool) -> bytes:
    enc = binascii.b2a_base64(data, newline=False)
    out = CRLF.join(enc[i : i + 76] for i in range(0, len(enc), 76))
    return out + CRLF if final_crlf and out else out


def _encode_body(pieces: list[bytes | None], cte: str, *, final_crlf: bool) -> list[Segment]:
    """Encode decoded ``pieces`` (``None``: URL) for ``cte``."""
    if cte in _IDENTITY:
        return [Slot.URL if p is None else p for p in pieces if p != b""]
    if cte == "quoted-printable":
        out: list[Segment] = []
        _append_qp(out, pieces, True)
        return out
    # base64: encode up to the first URL once, on a 57-octet (= one line) boundary.
    first = next((i for i, p in enumerate(pieces) if p is None), len(pieces))
    head = b"".join(p for p in pieces[:first] if p is not None)
    if first == len(pieces):
        return [_b64_lines(head, final_crlf)]
    cut = len(head) // 57 * 57
    segments: list[Segment] = []
    if cut:
        segments.append(_b64_lines(head[:cut], True))
    segments.append(Base64Tail((head[cut:], *pieces[first:]), final_crlf))
    return segments


def render_sample(segments: Iterable[Segment], url: str = _SAMPLE_URL) -> bytes:
    """The segments joined with a sample URL of the maximum length (for prepare-time checks)."""
    u = url.encode("ascii")
    out = []
    for s in segments:
        if isinstance(s, bytes):
            out.append(s)
        elif isinstance(s, Base64Tail):
            out.append(s.render(u))
        elif s is Slot.URL:
            out.append(u)
        else:
            out.append(render_url_qp(u))
    return b"".join(out)


class _Check(enum.Enum):
    OK = "ok"
    MISMATCH = "mismatch"
    TOO_LONG = "too long"


def _check(segments: Sequence[Segment], cte: str, codec: str, expected: Sequence[str | None]) -> _Check:
    """Render with the longest sample URL, decode, and compare with the intended text.

    Line breaks are compared normalised (a QP re-encode makes them canonical CRLF, RFC 2046 §4.1.1).
    """
    sample = render_sample(segments)
    if has_long_line(sample):
        return _Check.TOO_LONG
    if cte == "quoted-printable":
        content = binascii.a2b_qp(sample)
    elif cte == "base64":
        content = binascii.a2b_base64(sample)
    else:
        content = sample
    try:
        got = content.decode(codec, "surrogateescape")
    except UnicodeError:
        return _Check.MISMATCH
    want = "".join(_SAMPLE_URL if p is None else p for p in expected)
    return _Check.OK if _norm(got) == _norm(want) else _Check.MISMATCH


def _norm(text: str) -> str:
    if "\r" not in text:
        return text
    return text.replace("\r\n", "\n").replace("\r", "\n")
