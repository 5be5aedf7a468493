"""Message rewrite for bulk mail (DESIGN.md Flow step 3): unsubscribe headers, Feedback-ID, trace token,
footer with unsubscribe link and imprint.  Pure functions, no I/O.

The work is split by cost.  :func:`prepare` runs once per message: it parses the MIME structure, drops the
header fields the app must not set, and injects the footer into every text/plain and text/html part,
leaving holes for the per-recipient values.  :meth:`Template.render` runs once per recipient and only joins
bytes (plus, for base64 parts, encodes a tail shorter than a few hundred octets).

What changes, and why:

* ``List-Unsubscribe``, ``List-Unsubscribe-Post``, ``Feedback-ID``, ``X-Relayd-ID`` sent by the app are
  removed: unsubscribes must reach relayd (RFC 8058 one-click, RFC 2369 mailto), and the trace token is what
  attributes complaints and bounces, so an app must not be able to forge it.
* New fields go at the **top** of the header block, the way an MTA prepends what it adds (Received,
  DKIM-Signature, ARC; RFC 5321 §4.4, RFC 6376 §5.6), so the app's block stays one untouched slice.  For
  DKIM the position does not matter: signers and verifiers take instances of a field bottom-up
  (RFC 6376 §5.4.2) and after the removal each of the four fields exists exactly once.  RFC 8058 §4 requires
  List-Unsubscribe and List-Unsubscribe-Post to be covered by the DKIM signature; the signer should
  over-sign them (list each name once more than present) so an instance added later breaks the signature.
* Every other header field, the preamble/epilogue, boundaries and every non-text or attachment part stay
  byte-exact.  Text parts are spliced, not re-encoded, unless their charset or transfer encoding can't carry
  the footer (see :mod:`relayd.mail.footer`).  ``MIME-Version: 1.0`` is added only if a content header
  had to change and the message had none (RFC 2045 §4).
* The only other change is line-ending canonicalisation: a bare CR or LF becomes CRLF (RFC 5321 §2.3.8;
  RFC 2045 §2.10), since the output goes back onto SMTP.

When is a message "broken" (:class:`MimeError`, answered ``554 5.6.0``)?  Exactly when one of these holds,
outside encapsulated ``message/*`` parts (which are attachments and stay opaque):

* the stdlib parser (``policy=compat32``) records any defect: no boundary parameter on a multipart, start or
  close boundary not found, a header line that is neither field nor continuation (missing header/body
  separator), a first header line that is a continuation, a misplaced envelope ``From``, a multipart with a
  transfer encoding other than 7bit/8bit/binary (RFC 2045 §6.4);
* our byte-level split disagrees with the parser (number of parts), or a multipart or rewritten text part
  has two Content-Type or Content-Transfer-Encoding fields;
* a text part we must footer can't be decoded: unknown transfer encoding, invalid base64, unknown charset
  with 8-bit text, or text invalid in its declared charset when the footer would force re-encoding it;
* a line longer than 998 octets that we can't fix by re-encoding a text part (RFC 5322 §2.1.1).

Nothing else raises.  ``multipart/signed`` and ``multipart/encrypted`` (RFC 1847) are left untouched: a
footer would break the signature or can't be placed; :attr:`Template.footer_parts` tells the caller how
many parts got one, so policy can refuse a message with none.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email import errors as email_errors
from email.message import Message
from email.parser import BytesHeaderParser, BytesParser
from email.policy import compat32

from relayd.mail.footer import (
    DEFAULT_HTML_IMPRINT_TEMPLATE,
    DEFAULT_HTML_TEMPLATE,
    DEFAULT_TEXT_IMPRINT_TEMPLATE,
    DEFAULT_TEXT_TEMPLATE,
    MAX_VALUE_LEN,
    PLACEHOLDER,
    Base64Tail,
    FooterSpec,
    Segment,
    Slot,
    render_url_qp,
    rewrite_part,
)
from relayd.mail.headers import (
    CRLF,
    EntitySpan,
    MimeError,
    Span,
    count_fields,
    field_name,
    has_long_line_in,
    replace_field,
    set_charset,
    skeleton,
    split_entity_at,
    split_multipart_at,
)

__all__ = [
    "DEFAULT_HTML_IMPRINT_TEMPLATE",
    "DEFAULT_HTML_TEMPLATE",
    "DEFAULT_TEXT_IMPRINT_TEMPLATE",
    "DEFAULT_TEXT_TEMPLATE",
    "FORBIDDEN_FIELDS",
    "PLACEHOLDER",
    "FooterSpec",
    "MimeError",
    "Template",
    "canonical_crlf",
    "format_feedback_id",
    "prepare",
    "text_parts",
    "transfer_encoding",
]

#: Header fields only relayd may set; the app's instances are removed (compared case-insensitively).
FORBIDDEN_FIELDS = frozenset(
    {
        b"list-unsubscribe",
        b"list-unsubscribe-post",
        b"feedback-id",
        b"x-relayd-id",
        b"x-relayd-optin",
        b"x-relayd-class",
    }
)  # X-Relayd-Optin and X-Relayd-Class are instructions to relayd (relayd.mail.confirmation,
#    relayd.policy.rules.messageclass), never delivered

# RFC 1847: changing a signed part breaks its signature; an encrypted one has no text to footer.
_OPAQUE_MULTIPART = frozenset({"signed", "encrypted"})

_URL = re.compile(rf"[A-Za-z0-9:/._~-]{{1,{MAX_VALUE_LEN}}}")
_MAILTO = re.compile(r"[A-Za-z0-9._+~=-]{1,64}@[A-Za-z0-9.-]{1,190}")
_RELAYD_ID = re.compile(rf"[A-Za-z0-9:/._~+=-]{{1,{MAX_VALUE_LEN}}}")
_FEEDBACK_ID = re.compile(r"[\x21-\x7e]{1,256}")
_FEEDBACK_ID_PART = re.compile(r"[\x21-\x39\x3b-\x7e]{0,64}")
_BARE = re.compile(rb"\r\n|\r|\n")

_DEFECTS: dict[type[email_errors.MessageDefect], str] = {
    email_errors.NoBoundaryInMultipartDefect: "multipart without boundary parameter (RFC 2046 §5.1.1)",
    email_errors.StartBoundaryNotFoundDefect: "multipart boundary never occurs in the body (RFC 2046 §5.1.1)",
    email_errors.CloseBoundaryNotFoundDefect: "multipart has no close delimiter (RFC 2046 §5.1.1)",
    email_errors.FirstHeaderLineIsContinuationDefect: "first header line is a continuation (RFC 5322 §2.2.3)",
    email_errors.MisplacedEnvelopeHeaderDefect: "envelope 'From ' line inside the header (RFC 5322 §2.2)",
    email_errors.MissingHeaderBodySeparatorDefect: "header block contains a line that is neither a header "
    "field nor a continuation (missing header/body separator, RFC 5322 §2.2)",
    email_errors.MultipartInvariantViolationDefect: "multipart content type but no parts (RFC 2046 §5.1)",
    email_errors.InvalidMultipartContentTransferEncodingDefect: "multipart with a transfer encoding other "
    "than 7bit/8bit/binary (RFC 2045 §6.4)",
}


class _Header(enum.Enum):
    """Per-recipient header fields in a template."""

    LIST_UNSUBSCRIBE = 0
    RELAYD_ID = 1


_V_LIST_UNSUBSCRIBE, _V_RELAYD_ID, _V_URL, _V_URL_QP, _V_TAILS = range(5)


@dataclass(frozen=True, slots=True)
class Slice:
    """``source[start:end]`` of a :class:`Template`: a part of the message that stays as it is."""

    start: int
    end: int


#: what the walk puts in a template: footer segments, and slices of the message
_Piece = Segment | Slice


@dataclass(frozen=True, slots=True)
class Template:
    """A rewritten message with holes for the per-recipient values; build it with :func:`prepare`.

    ``segments`` are final bytes or an index into the values computed per :meth:`render` (header lines,
    the URL, its quoted-printable form, ``tails[i]`` at index 4 + i).  ``footer_parts`` counts the text
    parts that got a footer.
    """

    segments: tuple[bytes | int | Slice, ...]
    tails: tuple[Base64Tail, ...]
    needs_qp: bool
    footer_parts: int
    #: the message the :class:`Slice` segments are parts of (not copied: the caller's bytes)
    source: bytes = b""

    def __reduce__(self) -> tuple[type[Template], tuple[object, ...]]:
        """Pickled (to a delivery process) with its slices of the message as bytes of their own."""
        segments = tuple(self.source[s.start : s.end] if isinstance(s, Slice) else s for s in self.segments)
        return Template, (segments, self.tails, self.needs_qp, self.footer_parts)

    @property
    def size(self) -> int:
        """Octets of message text the template holds or points at."""
        return sum(
            s.end - s.start if isinstance(s, Slice) else len(s)
            for s in self.segments
            if not isinstance(s, int)
        )

    def rebase(self, source: bytes, shift: int) -> Template:
        """The same template over ``source``, in which this one's source starts at offset ``shift`` (the
        message as queued, behind our ``Received`` field): the caller may then drop the old source."""
        segments = tuple(
            Slice(s.start + shift, s.end + shift) if isinstance(s, Slice) else s for s in self.segments
        )
        return Template(segments, self.tails, self.needs_qp, self.footer_parts, source)

    def render(
        self, *, unsubscribe_url: str, unsubscribe_mailto: str, relayd_id: str, body_url: str | None = None
    ) -> bytes:
        """The final CRLF message for one recipient, as one ``bytes``: :meth:`render_parts` joined."""
        return b"".join(
            self.render_parts(
                unsubscribe_url=unsubscribe_url,
                unsubscribe_mailto=unsubscribe_mailto,
                relayd_id=relayd_id,
                body_url=body_url,
            )
        )

    def render_parts(
        self, *, unsubscribe_url: str, unsubscribe_mailto: str, relayd_id: str, body_url: str | None = None
    ) -> list[bytes | memoryview]:
        """The final CRLF message for one recipient, as pieces to send in order: the parts of the message
        that do not change are slices of the message as queued, shared by every copy, not copied.

        ``unsubscribe_url`` (RFC 8058 one-click target, also the footer link) must use the characters
        ``A-Za-z0-9:/._~-`` only, ``unsubscribe_mailto`` is a bare addr-spec, ``relayd_id`` the trace
        token; each at most 256 characters.  ``body_url``, when given, goes into the body's URL slots
        instead of ``unsubscribe_url`` (same rules; a confirmation mail's confirm link), while the
        ``List-Unsubscribe`` field keeps ``unsubscribe_url``.  Anything else raises :class:`ValueError`:
        these are relayd's own values, so a bad one is a bug, not a sender error.
        """
        _check(_URL, unsubscribe_url, "unsubscribe_url")
        _check(_MAILTO, unsubscribe_mailto, "unsubscribe_mailto")
        _check(_RELAYD_ID, relayd_id, "relayd_id")
        if body_url is not None:
            _check(_URL, body_url, "body_url")
        url = (body_url or unsubscribe_url).encode("ascii")
        values = [
            _list_unsubscribe(unsubscribe_url.encode("ascii"), unsubscribe_mailto.encode("ascii")),
            b"X-Relayd-ID: " + relayd_id.encode("ascii") + CRLF,
            url,
            render_url_qp(url) if self.needs_qp else b"",
        ]
        values.extend(tail.render(url) for tail in self.tails)
        view = memoryview(self.source)
        return [
            values[s] if isinstance(s, int) else view[s.start : s.end] if isinstance(s, Slice) else s
            for s in self.segments
        ]


def prepare(
    raw: bytes,
    footer: FooterSpec,
    feedback_id: str,
    *,
    placeholder: str = PLACEHOLDER,
    unsubscribe: bool = True,
    start: int = 0,
) -> Template:
    """Parse ``raw`` (the DATA content, CRLF, dot-unstuffed) once and rewrite it into a :class:`Template`.

    Adds ``List-Unsubscribe-Post: List-Unsubscribe=One-Click`` (RFC 8058 §3.1) and ``Feedback-ID``, removes
    the fields the app must not set, and footers every text/plain and text/html part.  ``placeholder`` is
    what the app writes where the body's per-recipient link goes (``{{confirm_url}}`` in a confirmation
    mail, whose link is then passed as ``render(body_url=...)``).  ``unsubscribe=False`` (transactional
    mail) adds neither List-Unsubscribe field; pass a ``footer`` with ``link=False`` with it.  Raises
    :class:`MimeError` for a message that isn't sensible MIME (see the module docstring for the exact
    list) and :class:`ValueError` for a malformed ``feedback_id``.

    ``start``: the message is ``raw[start:]`` (the queue's bytes, behind our ``Received`` field); the
    template's slices are then of ``raw`` itself, and nothing of the message is copied to cut it out.
    """
    _check(_FEEDBACK_ID, feedback_id, "feedback_id")
    canonical = canonical_crlf(raw)
    if canonical is not raw:
        raw, start = canonical_crlf(raw[start:]), 0
    message = BytesParser(policy=compat32).parsebytes(skeleton(raw, start))
    _check_defects(message)
    walker = _Walker(raw, footer, placeholder)
    top = split_entity_at(raw, start, len(raw))
    rewritten = walker.rewrite(top, message)
    fields: list[bytes]
    body: list[_Piece]
    if rewritten is None:
        fields, sep, body = list(top.fields), top.sep, [walker.slice((top.body, top.end))]
    else:
        fields, sep, body = rewritten
    fields = [f for f in fields if field_name(f) not in FORBIDDEN_FIELDS]
    head: list[_Piece | _Header] = [
        _Header.LIST_UNSUBSCRIBE,
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n",
        b"Feedback-ID: " + feedback_id.encode("ascii") + CRLF,
        _Header.RELAYD_ID,
    ]
    if not unsubscribe:
        head = head[2:]
    if walker.changed_content_headers and count_fields(fields, b"mime-version") == 0:
        head.append(b"MIME-Version: 1.0\r\n")
    template = _compile([*head, *fields, sep, *body], walker.footer_parts, raw)
    sample = template.render_parts(
        unsubscribe_url="https://s.invalid/" + "u" * (MAX_VALUE_LEN - 18),
        unsubscribe_mailto="u" * 64 + "@" + "d" * 150 + ".invalid",
        relayd_id="t" * MAX_VALUE_LEN,
    )
    if has_long_line_in(sample):
        raise MimeError("message has a line longer than 998 octets (RFC 5322 §2.1.1)")
    return template


def canonical_crlf(raw: bytes) -> bytes:
    """``raw`` with every bare CR or LF turned into CRLF (RFC 5321 §2.3.8); canonical input is returned."""
    crlf = raw.count(b"\r\n")
    if raw.count(b"\n") == crlf and raw.count(b"\r") == crlf:
        return raw
    return _BARE.sub(CRLF, raw)


def format_feedback_id(campaign: str, list_name: str, account: str, sender_id: str) -> str:
    """``campaign:list:account:sender-id``, the Feedback-ID layout Gmail's feedback loop aggregates by.

    The last field identifies the sender (relayd's instance); fields may be empty but may not hold ``:``.
    """
    parts = (campaign, list_name, account, sender_id)
    for p in parts:
        if _FEEDBACK_ID_PART.fullmatch(p) is None:
            raise ValueError(f"Feedback-ID field {p!r} must be printable ASCII without ':' or spaces")
    return ":".join(parts)


def _check(pattern: re.Pattern[str], value: str, name: str) -> None:
    if pattern.fullmatch(value) is None:
        raise ValueError(f"{name} {value!r} is not allowed in a header or footer")


def _list_unsubscribe(url: bytes, mailto: bytes) -> bytes:
    """RFC 2369 §3.2 field, HTTPS first (RFC 8058 §3.1), folded after the comma past 78 characters."""
    first = b"List-Unsubscribe: <" + url + b">,"
    second = b"<mailto:" + mailto + b">\r\n"
    if len(first) + 1 + len(second) - 2 > 78:
        return first + b"\r\n " + second
    return first + b" " + second


def _check_defects(node: Message) -> None:
    """Raise :class:`MimeError` for the first parser defect outside ``message/*`` parts."""
    for defect in node.defects:
        text = _DEFECTS.get(type(defect), f"malformed MIME structure ({type(defect).__name__})")
        raise MimeError(text)
    if _content_type(node)[0] == "message":
        return  # an encapsulated message is an attachment: not ours to judge
    if node.is_multipart():
        payload = node.get_payload()
        assert isinstance(payload, list)
        for child in payload:
            if isinstance(child, Message):
                _check_defects(child)


#: slices of the message up to this size are copied into the template (and joined with their neighbours);
#: longer ones are memoryviews of the message
_INLINE = 4096


class _Walker:
    """Walks the stdlib tree and the byte-level split together, rewriting text parts.

    The split is offsets into ``raw``; what stays as it is goes into the template as a :class:`Slice` of
    ``raw`` (copied only when a few octets long), so an attachment is neither copied nor decoded."""

    def __init__(self, raw: bytes, footer: FooterSpec, placeholder: str = PLACEHOLDER) -> None:
        self.raw = raw
        self.footer = footer
        self.placeholder = placeholder
        self.footer_parts = 0
        self.changed_content_headers = False

    def slice(self, span: Span) -> bytes | Slice:
        start, end = span
        return Slice(start, end) if end - start > _INLINE else self.raw[start:end]

    def rewrite(self, ent: EntitySpan, node: Message) -> tuple[list[bytes], bytes, list[_Piece]] | None:
        """New (fields, separator, body segments) for ``ent``, or ``None`` when it stays byte-exact."""
        maintype, subtype = _content_type(node)
        if maintype == "multipart" and subtype not in _OPAQUE_MULTIPART:
            _check_unique(ent.fields)
            boundary = node.get_boundary()
            children = node.get_payload()
            if boundary is None or not isinstance(children, list):  # pragma: no cover - stdlib defect
                raise MimeError("multipart without boundary parameter (RFC 2046 §5.1.1)")
            split = split_multipart_at(self.raw, ent.body, ent.end, boundary)
            if len(split.parts) != len(children):
                raise MimeError("multipart structure is ambiguous (parts can't be located unambiguously)")
            body: list[_Piece] = [self.slice(split.preamble)]
            for delimiter, part, child in zip(split.delimiters, split.parts, children, strict=True):
                body.append(self.slice(delimiter))
                body.extend(self._part(part, child))
            body += [self.slice(split.close), self.slice(split.epilogue)]
            return list(ent.fields), ent.sep, body
        if _is_body_text(node, maintype, subtype):
            return self._text(ent, node, subtype)
        return None

    def _part(self, span: Span, node: Message) -> list[_Piece]:
        if not _may_rewrite(node):
            return [self.slice(span)]  # attachments and other leaves: not even split
        ent = split_entity_at(self.raw, *span)
        rewritten = self.rewrite(ent, node)
        if rewritten is None:
            return [self.slice(span)]
        fields, sep, body = rewritten
        return [*fields, sep, *body]

    def _text(self, ent: EntitySpan, node: Message, subtype: str) -> tuple[list[bytes], bytes, list[_Piece]]:
        _check_unique(ent.fields)
        cte = transfer_encoding(node)
        result = rewrite_part(
            self.raw[ent.body : ent.end],
            subtype=subtype,
            charset=node.get_content_charset(),
            cte=cte,
            spec=self.footer,
            placeholder=self.placeholder,
        )
        self.footer_parts += 1
        fields = list(ent.fields)
        if fields and not fields[-1].endswith(CRLF):  # header-only part: the body now starts after a CRLF
            fields[-1] += CRLF
        if result.charset is not None:
            self.changed_content_headers = True
            ct = [f for f in fields if field_name(f) == b"content-type"]
            new = set_charset(ct[0], result.charset) if ct else b"Content-Type: text/plain; charset=utf-8\r\n"
            _check_content_type(new, node, result.charset)
            fields = replace_field(fields, b"content-type", new)
        if result.cte is not None:
            self.changed_content_headers = True
            new = b"Content-Transfer-Encoding: " + result.cte.encode("ascii") + CRLF
            fields = replace_field(fields, b"content-transfer-encoding", new)
        return fields, CRLF, list(result.segments)


def transfer_encoding(node: Message) -> str:
    """The part's Content-Transfer-Encoding as the rewrite reads it, lower case; "7bit" when absent.

    RFC 2045 §6.1: a token, possibly followed by a comment. Strip only blanks: str.strip() would also eat
    C0 separators (\\x1c-\\x1f), taking "base64\\x1d" -- not an encoding any reader knows -- for base64
    (found by the fuzzer)."""
    value = str(node.get("content-transfer-encoding", ""))
    return value.partition("(")[0].strip(" \t\r\n").lower() or "7bit"


def text_parts(node: Message) -> Iterator[Message]:
    """The parts :func:`prepare` footers and substitutes placeholders in, in order: text/plain and
    text/html that aren't attachments, reached through multiparts other than signed and encrypted (the
    walk :class:`_Walker` makes; ``message/*`` parts are attachments and stay opaque)."""
    maintype, subtype = _content_type(node)
    if maintype == "multipart" and subtype not in _OPAQUE_MULTIPART:
        children = node.get_payload()
        if isinstance(children, list):
            for child in children:
                if isinstance(child, Message):
                    yield from text_parts(child)
    elif _is_body_text(node, maintype, subtype):
        yield node


def _content_type(node: Message) -> tuple[str, str]:
    """(maintype, subtype) with one parse of the field (the stdlib getters each parse it again)."""
    maintype, _, subtype = node.get_content_type().partition("/")
    return maintype, subtype


def _check_content_type(field: bytes, node: Message, charset: str) -> None:
    """Re-read a rewritten Content-Type: same type and parameters, only the new charset.

    Guards against fields the byte-level edit can't handle (an unterminated quoted-string, say).
    """
    parsed = _HEADER_PARSER.parsebytes(field + CRLF)
    before = [(k.lower(), v) for k, v in (node.get_params() or [])[1:] if k.lower() != "charset"]
    after = [(k.lower(), v) for k, v in (parsed.get_params() or [])[1:] if k.lower() != "charset"]
    if (
        parsed.get_content_type() != node.get_content_type()
        or parsed.get_content_charset() != charset
        or before != after
    ):
        raise MimeError("Content-Type field is malformed and its charset can't be changed (RFC 2045 §5.1)")


_HEADER_PARSER = BytesHeaderParser(policy=compat32)


def _may_rewrite(node: Message) -> bool:
    maintype, subtype = _content_type(node)
    if maintype == "multipart":
        return subtype not in _OPAQUE_MULTIPART
    return _is_body_text(node, maintype, subtype)


def _is_body_text(node: Message, maintype: str, subtype: str) -> bool:
    """text/plain or text/html that isn't an attachment: the parts that carry the footer."""
    return (
        maintype == "text" and subtype in ("plain", "html") and node.get_content_disposition() != "attachment"
    )


def _check_unique(fields: tuple[bytes, ...] | list[bytes]) -> None:
    """Two Content-Type or Content-Transfer-Encoding fields: which one would a reader believe?"""
    names = [field_name(f) for f in fields if f[:8].lower() == b"content-"]
    for name in (b"content-type", b"content-transfer-encoding"):
        if names.count(name) > 1:
            raise MimeError(f"part has more than one {name.decode()} field (RFC 2045 §3)")


def _compile(parts: list[_Piece | _Header], footer_parts: int, source: bytes) -> Template:
    """Coalesce adjacent bytes and number the holes; big slices of the message stay slices."""
    segments: list[bytes | int | Slice] = []
    tails: list[Base64Tail] = []
    pending: list[bytes] = []
    needs_qp = False

    def hole(index: int) -> None:
        if pending:
            segments.append(b"".join(pending))
            pending.clear()
        segments.append(index)

    for p in parts:
        if isinstance(p, Slice):
            if pending:
                segments.append(b"".join(pending))
                pending.clear()
            segments.append(p)
        elif isinstance(p, bytes):
            if p:
                pending.append(p)
        elif isinstance(p, Base64Tail):
            tails.append(p)
            hole(_V_TAILS + len(tails) - 1)
        elif p is _Header.LIST_UNSUBSCRIBE:
            hole(_V_LIST_UNSUBSCRIBE)
        elif p is _Header.RELAYD_ID:
            hole(_V_RELAYD_ID)
        elif p is Slot.URL:
            hole(_V_URL)
        else:
            needs_qp = True
            hole(_V_URL_QP)
    if pending:
        segments.append(b"".join(pending))
    return Template(tuple(segments), tuple(tails), needs_qp, footer_parts, source)
