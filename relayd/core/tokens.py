"""Queue ids and the HMAC'd tokens that tie a report back to one (queue id, recipient).

One token shape serves VERP return paths, ``X-Relayd-ID`` trace headers and unsubscribe links, each with its
own *purpose* mixed into the MAC so a token minted for one cannot be replayed as another:

    <queue id>-<recipient index>-<mac>        e.g.  0k3f5r2c9mz1q8aa-0-7n2kq0d4hfx3w5ma

* lower-case base32 only, because remote MTAs lower-case local parts and some URL scanners do too;
* short: the VERP local part must stay under 64 octets (RFC 5321 §4.5.3.1.1) and an unsubscribe URL under
  68 characters (KlickTipp's rule, seeds/003);
* the MAC covers the recipient *address* even though the token does not carry it, so a token can only
  vouch for the address it was minted for: a DSN or complaint about another address fails verification.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import time
from dataclasses import dataclass

VERP_LOCAL = "bounce"
_MAC_BYTES = 10


_B32 = "abcdefghijklmnopqrstuvwxyz234567"  # RFC 4648 base32, lower-cased
#: every 10-bit group as its two base32 characters: several tokens are made for each recipient of each
#: message, and base64.b32encode (pure Python) was a measurable part of that
_B32_PAIRS = tuple(_B32[i >> 5] + _B32[i & 31] for i in range(1024))


def _b32(data: bytes) -> str:
    """Unpadded lower-case base32 of ``data``, whose length must be a multiple of 5 (ids and MACs are
    10 bytes): the same text as ``base64.b32encode(data).decode().rstrip("=").lower()``."""
    if len(data) % 5:
        return base64.b32encode(data).decode().rstrip("=").lower()
    n = int.from_bytes(data, "big")
    pairs = _B32_PAIRS
    return "".join([pairs[(n >> shift) & 1023] for shift in range(len(data) * 8 - 10, -1, -10)])


@functools.lru_cache(maxsize=8)
def _keyed(secret: bytes) -> tuple[hashlib._Hash, hashlib._Hash]:
    """The HMAC-SHA256 inner and outer hash states for ``secret`` (RFC 2104), computed once: a token is
    then two hash copies and updates, about half the cost of ``hmac.digest`` with its per-call setup."""
    key = hashlib.sha256(secret).digest() if len(secret) > 64 else secret
    key = key.ljust(64, b"\0")
    return (
        hashlib.sha256(bytes(b ^ 0x36 for b in key)),
        hashlib.sha256(bytes(b ^ 0x5C for b in key)),
    )


def _hmac_sha256(secret: bytes, msg: bytes) -> bytes:
    inner, outer = _keyed(secret)
    i = inner.copy()
    i.update(msg)
    o = outer.copy()
    o.update(i.digest())
    return o.digest()


def new_queue_id() -> str:
    """16 characters: 48-bit millisecond timestamp then 32 random bits, so ids sort by submission time."""
    ms = int(time.time() * 1000).to_bytes(6, "big")
    return _b32(ms + os.urandom(4))


@dataclass(frozen=True, slots=True)
class TokenRef:
    queue_id: str
    index: int


def _mac(secret: bytes, purpose: str, queue_id: str, index: int, address: str) -> str:
    msg = f"{purpose}|{queue_id}|{index}|{address.lower()}".encode()
    return _b32(_hmac_sha256(secret, msg)[:_MAC_BYTES])


def make_token(secret: bytes, purpose: str, queue_id: str, index: int, address: str) -> str:
    return f"{queue_id}-{index}-{_mac(secret, purpose, queue_id, index, address)}"


def parse_token(token: str) -> TokenRef | None:
    """Split a token without verifying it; None when it is not of our shape."""
    token = token.strip().lower()
    if not token.isascii() or not token.replace("-", "").isalnum():
        return None  # also keeps hmac.compare_digest away from non-ASCII text (it raises TypeError)
    parts = token.split("-")
    if len(parts) != 3:
        return None
    qid, idx, mac = parts
    if len(qid) != 16 or not idx.isdigit() or len(idx) > 6 or len(mac) != 16:
        return None
    return TokenRef(qid, int(idx))


def verify_token(secret: bytes, purpose: str, token: str, address: str) -> TokenRef | None:
    """The token's reference when its MAC is right for ``address``, else None (constant-time compare)."""
    ref = parse_token(token)
    if ref is None:
        return None
    expected = _mac(secret, purpose, ref.queue_id, ref.index, address)
    if not hmac.compare_digest(expected, token.strip().lower().rsplit("-", 1)[1]):
        return None
    return ref


def verp_address(secret: bytes, domain: str, queue_id: str, index: int, address: str) -> str:
    """``bounce+<token>@<inbound domain>``: the envelope sender for one recipient."""
    return f"{VERP_LOCAL}+{make_token(secret, 'verp', queue_id, index, address)}@{domain}"


def verp_token(envelope_recipient: str) -> str | None:
    """The token of a ``bounce+<token>@domain`` address, or None."""
    local, _, _domain = envelope_recipient.strip("<> ").rpartition("@")
    prefix = VERP_LOCAL + "+"
    if not local.lower().startswith(prefix):
        return None
    return local[len(prefix) :]
