"""Tenant API keys: how they are made, written, stored and checked.

A key looks like ``rlk_<id>_<secret>``: ``rlk_`` says what it is (secret scanners and people recognise it),
``<id>`` is 12 hex digits of public key id, ``<secret>`` 43 characters of base64url, 256 random bits.

Why SHA-256 and not a password hash: a password hash (scrypt, as for SMTP passwords) is slow so that a
stolen hash of a *guessable* secret costs much to guess. A 256-bit random secret cannot be guessed at any
speed, so one fast hash is enough, and every API request can afford it. The store keeps only the hash: a
copy of the database (a backup, a replica) grants nothing. The id is the lookup key: one indexed row per
request, then :func:`hmac.compare_digest` of the hashes, which takes the same time wherever they differ.

Failure: :func:`parse` returns None for anything that is not a key of this form (never raises), and
:func:`authenticate` None for an unknown, revoked or wrong key, all alike, so a caller cannot tell them
apart; store errors propagate (:class:`relayd.store.StoreError`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
from dataclasses import dataclass
from datetime import datetime

from relayd.store.models import ApiKey, utcnow
from relayd.store.protocols import ApiKeyStore

__all__ = ["PREFIX", "NewKey", "authenticate", "create", "hash_key", "parse"]

PREFIX = "rlk_"
_ID_LEN = 12
_SECRET_BYTES = 32
_SECRET_LEN = 43  # base64url of 32 bytes, without padding
#: the longest Authorization value looked at; anything longer is no key of ours and is not hashed
MAX_KEY_LEN = len(PREFIX) + _ID_LEN + 1 + _SECRET_LEN
_HEX = frozenset(string.hexdigits.lower())
_B64URL = frozenset(string.ascii_letters + string.digits + "-_")


@dataclass(frozen=True, slots=True)
class NewKey:
    """A key just created: ``secret`` is the whole key, shown once and never stored."""

    record: ApiKey
    secret: str


def hash_key(key: str) -> str:
    """The stored form of ``key``: SHA-256, hex."""
    return hashlib.sha256(key.encode("ascii")).hexdigest()


def parse(value: str) -> str | None:
    """The key id of ``value`` when it has the form of a key, else None (cheap checks before any lookup)."""
    if len(value) != MAX_KEY_LEN or not value.startswith(PREFIX):
        return None
    key_id = value[len(PREFIX) : len(PREFIX) + _ID_LEN]
    sep = value[len(PREFIX) + _ID_LEN]
    secret = value[len(PREFIX) + _ID_LEN + 1 :]
    if sep != "_" or not set(key_id) <= _HEX or not set(secret) <= _B64URL:
        return None
    return key_id


async def create(store: ApiKeyStore, account: str, name: str = "", now: datetime | None = None) -> NewKey:
    """Make a key for ``account`` and store its hash; the returned ``secret`` is the only copy of the key.

    A clash of the 48-bit random id with an existing one (the store refuses it) draws a new one."""
    for _ in range(5):
        key_id = secrets.token_hex(_ID_LEN // 2)
        key = f"{PREFIX}{key_id}_{secrets.token_urlsafe(_SECRET_BYTES)}"
        record = ApiKey(key_id, account, hash_key(key), name, now or utcnow())
        try:
            await store.add_api_key(record)
        except ValueError:
            continue
        return NewKey(record, key)
    raise RuntimeError("could not draw an unused API key id")  # pragma: no cover - 2^48 ids


async def authenticate(store: ApiKeyStore, presented: str) -> ApiKey | None:
    """The valid (not revoked) key record that ``presented`` is the key of, or None."""
    key_id = parse(presented)
    if key_id is None:
        return None
    record = await store.get_api_key(key_id)
    if record is None or record.revoked_at is not None:
        return None
    if not hmac.compare_digest(record.key_hash, hash_key(presented)):
        return None
    return record
