"""A message as a sequence of buffers: what a recipient's copy is made of, sent and signed without joining.

A copy is its own header fields and footer (a few KB) around slices of the message as queued (the
attachments, often megabytes), which every copy shares. Joined, each copy in flight cost the message's size
again, and the DKIM body hash and the SMTP dot-stuffing each made another one or two copies of it. Here
those passes go a window of about :data:`WINDOW` octets at a time, cut after a CRLF, so they cost one window
whatever the size of the message.

``Chunks`` is a sequence of ``bytes``/``memoryview``; a plain ``bytes`` is accepted wherever ``Chunks`` is
(one chunk).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence

from relayd.mail.dkim import BodyHash, Signer, canonicalize_body

__all__ = [
    "WINDOW",
    "Chunks",
    "all_ascii",
    "as_chunks",
    "dot_stuffed",
    "ends_with_crlf",
    "gathered",
    "line_windows",
    "sign",
    "single",
    "total",
    "windows",
]

#: octets per pass of the hash, the ASCII check and the dot-stuffing
WINDOW = 64 * 1024

Chunks = bytes | Sequence[bytes | memoryview]

_CRLF = b"\r\n"


def as_chunks(data: Chunks) -> Sequence[bytes | memoryview]:
    return (data,) if isinstance(data, bytes) else data


def single(data: Chunks) -> bytes | None:
    """The message as one ``bytes`` when it is one chunk of at most :data:`WINDOW` octets (a copy of
    everyday mail, joined once by relayd.policy.render), else None: the helpers here then take the plain
    ``bytes`` path, one C-level pass each, instead of windows made for megabytes."""
    if isinstance(data, bytes):
        return data if len(data) <= WINDOW else None
    if len(data) == 1 and isinstance(data[0], bytes) and len(data[0]) <= WINDOW:
        return data[0]
    return None


def total(data: Chunks) -> int:
    """Octets of the whole message."""
    return sum(map(len, as_chunks(data)))


def ends_with_crlf(data: Chunks) -> bool:
    """Whether the message's last line has its CRLF (an empty message: no line to end)."""
    tail = b""
    for chunk in reversed(as_chunks(data)):
        tail = bytes(chunk[-2:]) + tail
        if len(tail) >= 2:
            return tail.endswith(_CRLF)
    return False


def all_ascii(data: Chunks) -> bool:
    """Whether every octet is < 0x80 (no ``BODY=8BITMIME`` needed)."""
    one = single(data)
    if one is not None:
        return one.isascii()
    return all(window.isascii() for window in _windows(as_chunks(data)))


def line_windows(data: Chunks) -> Iterator[bytes]:
    """The message in order, as ``bytes`` of about :data:`WINDOW` octets, each but the last ending in CRLF
    (a line longer than a window makes a longer one)."""
    carry = b""
    for window in _windows(as_chunks(data)):
        window = carry + window if carry else window
        cut = window.rfind(_CRLF)
        if cut < 0:
            carry = window
            continue
        carry = window[cut + 2 :]
        yield window[: cut + 2]
    if carry:
        yield carry


def dot_stuffed(data: Chunks) -> Iterator[bytes]:
    """The DATA payload for the message (RFC 5321 §4.5.2): each line starting with ``.`` gets another, the
    last line a CRLF if it lacked one, then the ``.`` line that ends the data."""
    one = single(data)
    if one is not None:
        body = one if not one or one.endswith(_CRLF) else one + _CRLF
        yield (b"." if body[:1] == b"." else b"") + body.replace(b"\r\n.", b"\r\n..") + b".\r\n"
        return
    last = b""
    for window in line_windows(data):
        if window[:1] == b".":  # every window starts a line
            window = b"." + window
        last = window
        yield window.replace(b"\r\n.", b"\r\n..")
    if last and not last.endswith(_CRLF):
        yield _CRLF
    yield b".\r\n"


def sign(signer: Signer, data: Chunks, domain: str) -> bytes:
    """``signer.sign(b"".join(data), domain)``, without the join: the header section is cut out and the
    body hashed a window at a time (relaxed canonicalization, RFC 6376 §3.4.4, by
    :func:`relayd.mail.dkim.canonicalize_body` on whole lines). A message with a bare CR or LF (never one
    relayd rendered) is signed joined, by the signer's own rules for those."""
    chunks = as_chunks(data)
    header, rest = _header_section(chunks)
    if header is None:
        return signer.sign(b"".join(chunks), domain)
    digest = _body_digest(rest)
    if digest is None:
        return signer.sign(b"".join(chunks), domain)
    return signer.sign_with_body_hash(header, BodyHash(digest), domain)


def _header_section(chunks: Sequence[bytes | memoryview]) -> tuple[bytes | None, list[bytes | memoryview]]:
    """(header section with the CRLF of its last field, the body's chunks), split at the first empty line
    as :func:`relayd.mail.dkim.split_message` does; ``None`` when that is not plain: no empty line within
    the first :data:`WINDOW` octets, no header fields, or a bare CR or LF in the header section."""
    head = b""
    for i, chunk in enumerate(chunks):
        before = len(head)
        whole = len(chunk) <= WINDOW - before
        head += bytes(chunk) if whole else bytes(chunk[: WINDOW - before])
        end = head.find(b"\r\n\r\n")
        if end >= 0:  # its last octet is in this chunk, else an earlier round found it
            header = head[: end + 2]
            if header.startswith(_CRLF) or not _plain(header):
                return None, []
            return header, [memoryview(chunk)[end + 4 - before :], *chunks[i + 1 :]]
        if not whole:
            break
    return None, []


def _plain(data: bytes) -> bool:
    """No CR or LF but in CRLF pairs."""
    return data.count(b"\r") == data.count(b"\n") == data.count(_CRLF)


def _body_digest(chunks: Sequence[bytes | memoryview]) -> bytes | None:
    """SHA-256 of the relaxed-canonical body, or ``None`` if it has a bare CR or LF."""
    sha = hashlib.sha256()
    held = 0  # empty lines at the end so far: they count only if a non-empty line follows (§3.4.4)
    for lines in line_windows(chunks):
        if not _plain(lines):
            return None
        if not lines.endswith(_CRLF):  # the last line, without CRLF: canonicalized as if it had one
            lines += _CRLF
        canon = canonicalize_body(lines)
        dropped = lines.count(_CRLF) - canon.count(_CRLF)
        if canon:
            sha.update(_CRLF * held)
            sha.update(canon)
            held = dropped
        else:
            held += dropped
    return sha.digest()


def windows(data: Chunks) -> Iterator[bytes]:
    """The message in order, as ``bytes`` of about :data:`WINDOW` octets."""
    one = single(data)
    if one is not None:
        return iter((one,) if one else ())
    return _windows(as_chunks(data))


def _windows(chunks: Sequence[bytes | memoryview]) -> Iterator[bytes]:
    return gathered(chunks, WINDOW)


def gathered(pieces: Iterable[bytes | memoryview], size: int) -> Iterator[bytes]:
    """The bytes of ``pieces`` in order, as ``bytes`` of about ``size`` octets (small pieces gathered,
    big ones cut): one window's worth held at a time, whatever the size of the whole."""
    pending: list[bytes | memoryview] = []
    held = 0
    for piece in pieces:
        view = memoryview(piece)
        for at in range(0, len(view), size):
            cut = view[at : at + size]
            pending.append(cut)
            held += len(cut)
            if held >= size:
                yield b"".join(pending)
                pending.clear()
                held = 0
    if pending:
        yield b"".join(pending)
