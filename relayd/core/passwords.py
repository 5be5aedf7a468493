"""Password hashing and checking for submission accounts (scrypt, stdlib only).

Format: ``scrypt$<N>$<r>$<p>$<salt b64>$<hash b64>``; ``relayd account hash-password`` prints one at
OWASP's recommended cost (N=2^17, r=8, p=1: about 128 MiB and a few hundred ms per check). A stored hash is
checked with its own parameters, so hashes made at an older, cheaper cost keep working; the config loader
refuses parameters outside sane bounds (:func:`parse_hash`), because a hash in the config decides how much
memory and CPU every AUTH costs.

That cost is right against a stolen config but wrong for applications that open a connection, and so
authenticate, per message: :class:`PasswordChecker` remembers a successful check for a few minutes, keyed by
the account and an HMAC of the presented password under a per-process random key (the password itself is
never kept). Failures are never remembered: each one costs a full check. Checks run in a worker thread
(``hashlib.scrypt`` releases the GIL), at most a few at a time, so a flood of AUTH commands can neither stall
the event loop nor allocate 128 MiB per connection.

Unknown accounts, accounts with only ``networks`` and ``password_file`` accounts pay one scrypt check too,
against a dummy hash with the parameters most configured accounts use, so the time of a failed AUTH does not
tell a guesser which account names exist.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

__all__ = [
    "EXAMPLE_HASHES",
    "EXAMPLE_PASSWORD",
    "Credential",
    "PasswordChecker",
    "PlainPassword",
    "ScryptHash",
    "below_recommended_cost",
    "hash_password",
    "parse_hash",
    "verify_password",
]

#: OWASP Password Storage Cheat Sheet (2023+): scrypt with N=2^17, r=8, p=1.
N, R, P = 2**17, 8, 1
#: Bounds for stored hashes. N above 2^20 or over 1 GiB of memory per check is refused at config load: one
#: AUTH must not be able to exhaust the host. The CPU bound (p*r*N) allows OWASP's p > 1 variants.
MIN_N, MAX_N = 2**10, 2**20
MAX_R, MAX_P = 32, 16
MAX_MEMORY = 2**30
MAX_WORK = 2**24
_SALT_BYTES = (8, 64)
_DIGEST_BYTES = (16, 64)

#: The password of the example account in ``conf/relayd.toml`` and the README, and the hashes shipped for
#: it: an account that still has one of them gets a check-config warning, and serve refuses it on a
#: listener other than loopback.
EXAMPLE_PASSWORD = "change-me"
EXAMPLE_HASHES = frozenset(
    {
        "scrypt$16384$8$1$ZgKD1JGmVRlajh2mxx6/mA==$da5081NfPCw0Yklm/UvVDzKKgoVw/l2AgQBQHMyU5nY=",
        "scrypt$131072$8$1$k5eeU3v8u2HxNC7ctms9sQ==$pfoqAmS4CgQxVW/f6OioVEnslNVG7V9A1O+eHioCDxY=",
    }
)


@dataclass(frozen=True, slots=True)
class ScryptHash:
    """One parsed ``password_hash``; :func:`parse_hash` makes one and checks its bounds."""

    n: int
    r: int
    p: int
    salt: bytes = field(repr=False)
    digest: bytes = field(repr=False)

    def __str__(self) -> str:
        b64 = base64.b64encode
        return f"scrypt${self.n}${self.r}${self.p}${b64(self.salt).decode()}${b64(self.digest).decode()}"

    @property
    def maxmem(self) -> int:
        """What OpenSSL needs for these parameters (128·r·(N+p+2) bytes), plus slack.

        ``hashlib.scrypt``'s default limit is 32 MiB: without this, any hash with N >= 2^15 at r=8 fails
        with ValueError, which made every login impossible rather than slow."""
        return 128 * self.r * (self.n + self.p + 2) + 2**20

    def matches(self, password: str) -> bool:
        """The slow check (constant-time comparison of the derived key)."""
        derived = hashlib.scrypt(
            password.encode(),
            salt=self.salt,
            n=self.n,
            r=self.r,
            p=self.p,
            dklen=len(self.digest),
            maxmem=self.maxmem,
        )
        return hmac.compare_digest(derived, self.digest)


@dataclass(frozen=True, slots=True)
class PlainPassword:
    """The content of an account's ``password_file`` (compared in constant time)."""

    value: bytes = field(repr=False)


Credential = ScryptHash | PlainPassword


def _int_field(text: str, name: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 10:
        raise ValueError(f"{name} {text!r} is not a number")
    return int(text)


def _b64_field(text: str, name: str, bounds: tuple[int, int]) -> bytes:
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError(f"{name} is not valid base64") from None
    low, high = bounds
    if not low <= len(raw) <= high:
        raise ValueError(f"{name} has {len(raw)} bytes, expected {low} to {high}")
    return raw


def parse_hash(text: str) -> ScryptHash:
    """Parse and bound-check a ``password_hash``; ``ValueError`` says what is wrong (for config errors)."""
    parts = text.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("expected scrypt$N$r$p$salt$hash (the output of `relayd account hash-password`)")
    n, r, p = (_int_field(v, k) for v, k in zip(parts[1:4], ("N", "r", "p"), strict=True))
    if n < 2 or n & (n - 1):
        raise ValueError(f"N={n} is not a power of two")
    if not MIN_N <= n <= MAX_N:
        raise ValueError(f"N={n} is outside 2^10..2^20")
    if not 1 <= r <= MAX_R:
        raise ValueError(f"r={r} is outside 1..{MAX_R}")
    if not 1 <= p <= MAX_P:
        raise ValueError(f"p={p} is outside 1..{MAX_P}")
    if 128 * r * n > MAX_MEMORY:
        raise ValueError(f"N={n}, r={r} needs {128 * r * n // 2**20} MiB per check, more than 1024")
    if p * r * n > MAX_WORK:
        raise ValueError(f"N={n}, r={r}, p={p} costs more than 16 times the recommended N=2^17, r=8, p=1")
    salt = _b64_field(parts[4], "salt", _SALT_BYTES)
    digest = _b64_field(parts[5], "hash", _DIGEST_BYTES)
    return ScryptHash(n, r, p, salt, digest)


def below_recommended_cost(h: ScryptHash) -> bool:
    """True for a hash cheaper to attack than OWASP's recommendation (memory or CPU below N=2^17, r=8)."""
    return h.n * h.r < N * R or h.n * h.r * h.p < N * R * P


def hash_password(password: str, *, n: int = N, r: int = R, p: int = P) -> str:
    """A new ``password_hash`` for ``password`` (random 16-byte salt, 32-byte key)."""
    salt = secrets.token_bytes(16)
    h = ScryptHash(n, r, p, salt, b"")
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32, maxmem=h.maxmem)
    return str(ScryptHash(n, r, p, salt, digest))


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` matches ``stored`` (slow; no cache). A malformed or out-of-bounds ``stored``
    value is a mismatch, not an exception: the config loader reports it."""
    try:
        return parse_hash(stored).matches(password)
    except ValueError:
        return False


class PasswordChecker:
    """Checks AUTH passwords against the configured accounts: in a thread, bounded, successes remembered.

    ``configure`` is called with every account's credential at start and at each reload; a changed (or
    removed) credential forgets what was remembered for that account. The cache holds at most one entry per
    account and password that succeeded, and at most ``max_entries`` in all (least recently used dropped).
    ``verify`` is the scrypt check itself; tests pass a counting wrapper to see the work done.
    """

    def __init__(
        self,
        *,
        ttl: float = 300.0,
        max_entries: int = 4096,
        concurrency: int = 2,
        verify: Callable[[ScryptHash, str], bool] = ScryptHash.matches,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._verify = verify
        self._clock = clock
        self._slots = asyncio.Semaphore(concurrency)
        self._key = secrets.token_bytes(32)
        self._credentials: dict[str, Credential] = {}
        self._dummy = _dummy_hash(N, R, P)
        self._cache: OrderedDict[tuple[str, bytes], tuple[Credential, float]] = OrderedDict()

    def configure(self, credentials: Mapping[str, Credential]) -> None:
        """Use these credentials from now on; forget successes remembered for changed or removed ones."""
        self._credentials = dict(credentials)
        for key, (cred, _) in list(self._cache.items()):
            if self._credentials.get(key[0]) != cred:
                del self._cache[key]
        counts = Counter((c.n, c.r, c.p) for c in self._credentials.values() if isinstance(c, ScryptHash))
        n, r, p = counts.most_common(1)[0][0] if counts else (N, R, P)
        if (n, r, p) != (self._dummy.n, self._dummy.r, self._dummy.p):
            self._dummy = _dummy_hash(n, r, p)

    def __len__(self) -> int:
        return len(self._cache)

    async def check(self, account: str, password: str) -> bool:
        """True when ``password`` is ``account``'s; False for anything else, unknown accounts included."""
        cred = self._credentials.get(account)
        key = (account, hmac.digest(self._key, password.encode(), "sha256"))
        if cred is not None and self._remembered(key, cred):
            return True
        async with self._slots:
            ok = await asyncio.to_thread(self._check_slow, cred, password)
        if ok and cred is not None and self._credentials.get(account) == cred:
            self._cache[key] = (cred, self._clock() + self.ttl)
            self._cache.move_to_end(key)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return ok

    def _remembered(self, key: tuple[str, bytes], cred: Credential) -> bool:
        entry = self._cache.get(key)
        if entry is None:
            return False
        if entry[0] != cred or entry[1] <= self._clock():
            del self._cache[key]
            return False
        self._cache.move_to_end(key)
        return True

    def _check_slow(self, cred: Credential | None, password: str) -> bool:
        if isinstance(cred, ScryptHash):
            return self._verify(cred, password)
        self._verify(self._dummy, password)  # the same cost as a real account: no account-name oracle
        if isinstance(cred, PlainPassword):
            return hmac.compare_digest(password.encode(), cred.value)
        return False


def _dummy_hash(n: int, r: int, p: int) -> ScryptHash:
    """A hash nothing matches (random salt and key), for checks that must cost what a real one costs."""
    return ScryptHash(n, r, p, secrets.token_bytes(16), secrets.token_bytes(32))
