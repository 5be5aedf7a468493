"""Password hashing for submission accounts (scrypt, stdlib only).

Format: ``scrypt$<n>$<r>$<p>$<salt b64>$<hash b64>``; ``relayd account hash-password`` prints one.
Verification is constant-time. scrypt is slow on purpose (~40 ms), which is right against a stolen config
but wrong for a bulk sender that opens a connection per message; so successful verifications are remembered
for the life of the process, keyed by a keyed hash of the password (never the password itself).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

_N, _R, _P = 2**14, 8, 1
_cache_key = secrets.token_bytes(32)
_verified: set[tuple[str, bytes]] = set()


def hash_password(password: str, *, n: int = _N, r: int = _R, p: int = _P) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${n}${r}${p}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` matches ``stored`` (a hash from :func:`hash_password`).

    A malformed ``stored`` value is a mismatch, not an exception: the config loader already checked it.
    """
    memo = (stored, hmac.digest(_cache_key, password.encode(), "sha256"))
    if memo in _verified:
        return True
    try:
        scheme, n, r, p, salt_b64, hash_b64 = stored.split("$")
        if scheme != "scrypt":
            return False
        salt, expected = base64.b64decode(salt_b64), base64.b64decode(hash_b64)
        digest = hashlib.scrypt(
            password.encode(), salt=salt, n=int(n), r=int(r), p=int(p), dklen=len(expected), maxmem=2**26
        )
    except (ValueError, TypeError):
        return False
    ok = hmac.compare_digest(digest, expected)
    if ok:
        _verified.add(memo)
    return ok


def check_plain(password: str, expected: str) -> bool:
    """Constant-time comparison for passwords kept in a ``password_file``."""
    return hmac.compare_digest(password.encode(), expected.encode())
