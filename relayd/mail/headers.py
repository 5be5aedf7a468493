"""Byte-level MIME entities: header blocks, header fields and multipart boundaries.

The rewrite step must keep everything it does not change byte-exact (the app's header block, attachments,
preambles, its DKIM-Signature fields), so it never re-serialises a message with :mod:`email.generator`.
Instead the stdlib parser (``policy=compat32``) *reads* the message - content types, parameters, defects -
and the functions here *locate* the same entities in the raw bytes, so the rewrite can splice new bytes
between untouched slices.  Whenever the two views disagree the message is ambiguous and :class:`MimeError`
is raised instead of guessing.

Everything here works on canonical CRLF input (see ``rewrite.canonical_crlf``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32

from relayd.core.errors import RelaydError
from relayd.mail.chunks import gathered

CRLF = b"\r\n"


class MimeError(RelaydError, ValueError):
    """The message cannot be rewritten without guessing at its structure.

    The submission listener answers ``554 5.6.0`` with ``str(exc)``; the text names the problem and the
    RFC section, never internals.  Raised only for the sender's input, never for relayd's own faults.
    """


# RFC 5322 §2.2 field: name (printable US-ASCII except ":"), optional WSP (obs-syntax, RFC 5322 §4.5),
# ":", value; continuation lines start with WSP.  The header block ends at the first empty line.
_HEADER_BLOCK = re.compile(rb"(?:[\x21-\x39\x3b-\x7e]+[ \t]*:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*)*")
_FIELD = re.compile(rb"[^ \t\r\n][^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*")


@dataclass(frozen=True, slots=True)
class Entity:
    """One MIME entity as raw slices: ``header + sep + body == raw``.

    ``fields`` are the header fields in order, each with its folded continuation lines and final CRLF.
    ``sep`` is the empty line (CRLF) between header and body, or ``b""`` for a header-only entity, which
    RFC 5322 §2.1 allows ("the body ... is optional") and the stdlib parses as an empty body.
    """

    fields: tuple[bytes, ...]
    sep: bytes
    body: bytes

    @property
    def header(self) -> bytes:
        """The header block exactly as received."""
        return b"".join(self.fields)


def split_entity(raw: bytes) -> Entity:
    """Split one entity (a whole message or one body part) into header fields, separator and body.

    A line in the header block that is neither a field nor a continuation is what the stdlib reports as
    ``MissingHeaderBodySeparatorDefect`` (or ``FirstHeaderLineIsContinuationDefect``): the header/body
    boundary is a guess, so this raises :class:`MimeError` rather than pick one.
    """
    span = split_entity_at(raw, 0, len(raw))
    return Entity(span.fields, span.sep, raw[span.body :])


@dataclass(frozen=True, slots=True)
class EntitySpan:
    """:class:`Entity` located in a larger buffer: the body is ``source[body:end]``, not copied out, so a
    multi-megabyte attachment is never duplicated to be looked at."""

    fields: tuple[bytes, ...]
    sep: bytes
    body: int
    end: int


def split_entity_at(raw: bytes, start: int, end: int) -> EntitySpan:
    """:func:`split_entity` of ``raw[start:end]``, with offsets into ``raw`` (only the header is copied)."""
    if raw.startswith(CRLF, start, end):  # no header fields at all (allowed for body parts, RFC 2046 §5.1.1)
        return EntitySpan((), CRLF, start + 2, end)
    cut = raw.find(b"\r\n\r\n", start, end)
    if cut < 0:
        block, sep, body = raw[start:end], b"", end
        probe = block if block.endswith(CRLF) else block + CRLF
    else:
        block, sep, body = raw[start : cut + 2], CRLF, cut + 4
        probe = block
    if _HEADER_BLOCK.fullmatch(probe) is None:
        raise MimeError(
            "header block contains a line that is neither a header field nor a continuation "
            "(missing header/body separator, RFC 5322 §2.2)"
        )
    fields = [m.group() for m in _FIELD.finditer(probe)]
    if probe is not block:  # header-only entity whose last line had no CRLF: keep the bytes exact
        fields[-1] = fields[-1][:-2]
    return EntitySpan(tuple(fields), sep, body, end)


#: Most ``;`` in one Content-Type or Content-Disposition field. The stdlib reads parameters
#: (``email.message._parseparam``) in time proportional to ``;`` count x field length: 64 KB of ``;`` in
#: quotes cost 7 s of CPU in one ``get_boundary()``, with the GIL held, from any authenticated tenant.
#: Bounding the count makes that linear; a real field has a handful of parameters (RFC 2231 continuations
#: of a long file name a few dozen).
MAX_PARAMETERS = 100
_PARAMETER_FIELD = re.compile(rb"^content-(?:type|disposition)[ \t]*:", re.IGNORECASE | re.MULTILINE)


def check_parameter_counts(raw: bytes) -> None:
    """Raise :class:`MimeError` when a Content-Type or Content-Disposition field, anywhere in ``raw`` (the
    message or any part, folded lines included), has more than :data:`MAX_PARAMETERS` ``;``.

    One literal regex match per field start and a ``find`` loop to the field's end: linear in ``raw``."""
    for match in _PARAMETER_FIELD.finditer(raw):
        start = end = match.end()
        while True:
            end = raw.find(b"\n", end)
            if end < 0 or raw[end + 1 : end + 2] not in (b" ", b"\t"):
                break
            end += 1
        if raw.count(b";", start, len(raw) if end < 0 else end) > MAX_PARAMETERS:
            name = raw[match.start() : match.end() - 1].rstrip(b" \t").decode("ascii")
            raise MimeError(f"{name} field has more than {MAX_PARAMETERS} parameters (RFC 2045 §5.1)")


def field_name(field: bytes) -> bytes:
    """Lower-cased field name, with obs-syntax whitespace before the colon removed."""
    return field[: field.index(b":")].rstrip(b" \t").lower()


def count_fields(fields: tuple[bytes, ...] | list[bytes], name: bytes) -> int:
    """How many fields called ``name`` (lower-case) the block has."""
    return sum(1 for f in fields if field_name(f) == name)


# A charset parameter with or without a value (a bare "charset" is seen, and confuses readers).
_CHARSET_PARAM = re.compile(
    rb"""(;\s*)charset\*?\s*(?:=\s*(?:"[^"\r\n]*"|[^;\s()"]*))?(?=\s*(?:;|\(|$))""", re.IGNORECASE
)


def set_charset(field: bytes, charset: str) -> bytes:
    """Return the Content-Type ``field`` with its ``charset`` parameter set to ``charset``.

    Only that parameter changes (RFC 2045 §5.1); other parameters (``format=flowed``, ``name``...) and the
    folding stay as they were.  Every charset parameter is replaced, so no reader can pick a stale one; a
    field without one gets ``; charset=...`` appended.
    """
    value = b"charset=" + charset.encode("ascii")
    body = field[:-2] if field.endswith(CRLF) else field
    new, count = _CHARSET_PARAM.subn(lambda m: m.group(1) + value, body)
    if count == 0:
        new = body + b"; " + value
    return new + CRLF


def replace_field(fields: list[bytes], name: bytes, new_field: bytes) -> list[bytes]:
    """Replace the (single) field called ``name`` by ``new_field``, or append it at the end of the block."""
    out = [new_field if field_name(f) == name else f for f in fields]
    if not any(field_name(f) == name for f in fields):
        if out and not out[-1].endswith(CRLF):
            out[-1] += CRLF
        out.append(new_field)
    return out


@dataclass(frozen=True, slots=True)
class Multipart:
    """A multipart body split per RFC 2046 §5.1.1, as exact slices.

    ``preamble + sum(delimiter + part) + close + epilogue == body``, where each ``delimiter`` is the CRLF
    that precedes the boundary line (it belongs to the delimiter, not to the part before it), the
    ``--boundary`` line with any transport padding, and the CRLF ending that line.
    """

    preamble: bytes
    delimiters: tuple[bytes, ...]
    parts: tuple[bytes, ...]
    close: bytes
    epilogue: bytes


def split_multipart(body: bytes, boundary: str) -> Multipart:
    """Locate the delimiter lines of ``boundary`` in ``body``.

    A delimiter line is ``--boundary``, optionally ``--`` (close delimiter), then only spaces and tabs
    (transport padding), like the stdlib's ``boundaryre``.  Missing close delimiter or no delimiter at all
    raise :class:`MimeError` (the stdlib flags them as Close/StartBoundaryNotFoundDefect): a truncated
    multipart has no end we could append to safely.
    """
    span = split_multipart_at(body, 0, len(body), boundary)

    def cut(at: Span) -> bytes:
        return body[at[0] : at[1]]

    return Multipart(
        cut(span.preamble),
        tuple(map(cut, span.delimiters)),
        tuple(map(cut, span.parts)),
        cut(span.close),
        cut(span.epilogue),
    )


#: ``(start, end)`` of a slice of a larger buffer
Span = tuple[int, int]


@dataclass(frozen=True, slots=True)
class MultipartSpan:
    """:class:`Multipart` as offsets into the buffer that holds it."""

    preamble: Span
    delimiters: tuple[Span, ...]
    parts: tuple[Span, ...]
    close: Span
    epilogue: Span


def split_multipart_at(raw: bytes, begin: int, stop: int, boundary: str) -> MultipartSpan:
    """:func:`split_multipart` of the body ``raw[begin:stop]``, with offsets into ``raw``."""
    try:
        needle = b"--" + boundary.encode("ascii")
    except UnicodeError:
        raise MimeError("multipart boundary is not US-ASCII (RFC 2046 §5.1.1)") from None
    if needle == b"--":
        raise MimeError("multipart boundary is empty (RFC 2046 §5.1.1)")
    delimiters: list[Span] = []
    parts: list[Span] = []
    preamble = (begin, begin)
    prev_end = -1  # end of the previous delimiter line, -1 before the first
    start = raw.find(needle, begin, stop)
    while start >= 0:
        # Literal search then a check at line start: a MULTILINE regex would try every offset.
        at_line = start == begin or raw[start - 1] == 10
        m = _DELIMITER_TAIL.match(raw, start + len(needle), stop) if at_line else None
        if m is None:
            start = raw.find(needle, start + 1, stop)
            continue
        # The CRLF before the boundary line belongs to the delimiter (RFC 2046 §5.1.1), unless it is the
        # very first line of the body or already the end of the previous delimiter line (empty part).
        own = start - 2 if start >= begin + 2 and start - 2 >= max(prev_end, begin) else start
        if prev_end < 0:
            preamble = (begin, own)
        else:
            parts.append((prev_end, own))
        if m.group(1):  # close delimiter
            if prev_end < 0:
                raise MimeError("multipart has a close delimiter but no body part (RFC 2046 §5.1.1)")
            return MultipartSpan(preamble, tuple(delimiters), tuple(parts), (own, m.end()), (m.end(), stop))
        delimiters.append((own, m.end()))
        prev_end = m.end()
        start = raw.find(needle, prev_end, stop)
    if prev_end < 0:
        raise MimeError("multipart boundary never occurs in the body (RFC 2046 §5.1.1)")
    raise MimeError("multipart has no close delimiter: truncated message? (RFC 2046 §5.1.1)")


_DELIMITER_TAIL = re.compile(rb"(--)?[ \t]*(?:\r\n|\Z)")


def has_long_line(data: bytes) -> bool:
    """Whether a CRLF line of ``data`` exceeds 998 octets (RFC 5322 §2.1.1, RFC 5321 §4.5.3.1.6).

    Splitting is ~10x faster than a regex, which rescans up to 998 octets from every position; a window at
    a time, so a big message is not split into a list of lines all at once.
    """
    return has_long_line_in((data,))


#: how much of a message :func:`has_long_line_in` copies and splits at a time
_WINDOW = 64 * 1024


def has_long_line_in(pieces: Iterable[bytes | memoryview]) -> bool:
    """:func:`has_long_line` of the concatenation of ``pieces``, without making it: lines may run across
    pieces. Memory: a window of some tens of KB, whatever the total."""
    carry = b""  # the unfinished last line so far (at most 999 octets, else the answer is known)
    for window in gathered(pieces, _WINDOW):
        data = carry + window if carry else window
        cut = data.rfind(CRLF)
        if cut >= 0:
            if max(map(len, data[:cut].split(CRLF))) > 998:
                return True
            data = data[cut + 2 :]
        if len(data) - data.endswith(b"\r") > 998:  # a CR at the end may start the CRLF ending the line
            return True
        carry = data
    return len(carry) > 998


#: a leaf part's body longer than this is replaced in :func:`skeleton` (shorter ones are kept as they are)
_STUB_ABOVE = 1024
#: what stands for it: one line that can be no boundary
_STUB = b"x"
_HEADERS = BytesHeaderParser(policy=compat32)


def skeleton(raw: bytes, start: int = 0) -> bytes:
    """``raw[start:]`` (canonical CRLF) with the body of every big leaf part replaced by one short line,
    for the stdlib parser (``email.parser``), which turns all it is given into strings and lists of lines:
    about five times a message's size at once, for attachments the rewrite never reads.

    The parser's tree of the skeleton is the tree of ``raw`` (content types, parameters, boundaries,
    defects, number of parts), only the replaced leaves have another payload: a leaf body, as
    :func:`split_multipart` locates it, holds no delimiter line of any multipart around it, and nothing
    else in it changes what the parser reads. What is not plainly a leaf stays byte for byte: ``message/*``
    parts (parsed as messages), the parts of a ``multipart/digest`` (``message/rfc822`` by default,
    RFC 2046 §5.1.5), and any multipart or header block this module's split does not accept (the parser
    then sees it as it is, and reports what it finds there)."""
    out: list[bytes | memoryview] = []
    _skeleton(raw, memoryview(raw), start, len(raw), False, out)
    if len(out) == 1 and start == 0:
        return raw
    return b"".join(out)


def _skeleton(
    raw: bytes, view: memoryview, start: int, end: int, digest: bool, out: list[bytes | memoryview]
) -> None:
    try:
        ent = split_entity_at(raw, start, end)
    except MimeError:
        out.append(view[start:end])
        return
    header = _HEADERS.parsebytes(b"".join(ent.fields) + CRLF)
    maintype = header.get_content_maintype()
    if maintype == "message" or (digest and header.get("content-type") is None):
        out.append(view[start:end])
        return
    if maintype == "multipart":
        boundary = header.get_boundary()
        try:
            split = split_multipart_at(raw, ent.body, end, boundary) if boundary is not None else None
        except MimeError:
            split = None
        if split is None:
            out.append(view[start:end])
            return
        inner = header.get_content_subtype() == "digest"
        out.append(view[start : split.preamble[1]])
        for (d_start, d_end), (p_start, p_end) in zip(split.delimiters, split.parts, strict=True):
            out.append(view[d_start:d_end])
            _skeleton(raw, view, p_start, p_end, inner, out)
        out.append(view[split.close[0] : end])
        return
    if end - ent.body > _STUB_ABOVE:
        out += [view[start : ent.body], _STUB]
    else:
        out.append(view[start:end])
