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
from dataclasses import dataclass

from relayd.core.errors import RelaydError

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
    if raw.startswith(CRLF):  # no header fields at all (allowed for body parts, RFC 2046 §5.1.1)
        return Entity((), CRLF, raw[2:])
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        block, sep, body = raw, b"", b""
        probe = block if block.endswith(CRLF) else block + CRLF
    else:
        block, sep, body = raw[: end + 2], CRLF, raw[end + 4 :]
        probe = block
    if _HEADER_BLOCK.fullmatch(probe) is None:
        raise MimeError(
            "header block contains a line that is neither a header field nor a continuation "
            "(missing header/body separator, RFC 5322 §2.2)"
        )
    fields = [m.group() for m in _FIELD.finditer(probe)]
    if probe is not block:  # header-only entity whose last line had no CRLF: keep the bytes exact
        fields[-1] = fields[-1][:-2]
    return Entity(tuple(fields), sep, body)


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
    try:
        needle = b"--" + boundary.encode("ascii")
    except UnicodeError:
        raise MimeError("multipart boundary is not US-ASCII (RFC 2046 §5.1.1)") from None
    if needle == b"--":
        raise MimeError("multipart boundary is empty (RFC 2046 §5.1.1)")
    delimiters: list[bytes] = []
    parts: list[bytes] = []
    preamble = b""
    prev_end = -1  # end of the previous delimiter line, -1 before the first
    start = body.find(needle)
    while start >= 0:
        # Literal search then a check at line start: a MULTILINE regex would try every offset.
        m = _DELIMITER_TAIL.match(body, start + len(needle)) if start == 0 or body[start - 1] == 10 else None
        if m is None:
            start = body.find(needle, start + 1)
            continue
        # The CRLF before the boundary line belongs to the delimiter (RFC 2046 §5.1.1), unless it is the
        # very first line of the body or already the end of the previous delimiter line (empty part).
        own = start - 2 if start >= 2 and start - 2 >= max(prev_end, 0) else start
        if prev_end < 0:
            preamble = body[:own]
        else:
            parts.append(body[prev_end:own])
        if m.group(1):  # close delimiter
            if prev_end < 0:
                raise MimeError("multipart has a close delimiter but no body part (RFC 2046 §5.1.1)")
            return Multipart(preamble, tuple(delimiters), tuple(parts), body[own : m.end()], body[m.end() :])
        delimiters.append(body[own : m.end()])
        prev_end = m.end()
        start = body.find(needle, prev_end)
    if prev_end < 0:
        raise MimeError("multipart boundary never occurs in the body (RFC 2046 §5.1.1)")
    raise MimeError("multipart has no close delimiter: truncated message? (RFC 2046 §5.1.1)")


_DELIMITER_TAIL = re.compile(rb"(--)?[ \t]*(?:\r\n|\Z)")


def has_long_line(data: bytes) -> bool:
    """Whether a CRLF line of ``data`` exceeds 998 octets (RFC 5322 §2.1.1, RFC 5321 §4.5.3.1.6).

    Splitting is ~10x faster than a regex, which rescans up to 998 octets from every position.
    """
    return max(map(len, data.split(CRLF))) > 998
