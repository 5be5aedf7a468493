"""Per-source rate limits and the AUTH failure guard, with memory that stays bounded under attack.

Two tools, both in-process (with ``[server] workers = N`` each worker counts on its own, so the effective
limit is up to N times the configured one; the kernel spreads one client's connections over the workers):

* :class:`RateLimiter`: a token bucket per key (``count`` per ``per`` seconds, bursts up to ``count``).
  Used for messages per client on the inbound listener (``421 4.7.0``) and requests per client on the web
  listener (``429``).
* :class:`AuthGuard`: failed AUTH attempts per client and per account name. Each failure makes the next
  ``535`` wait longer (the delay doubles, from ``delay`` up to 16 times it); ``max_failures`` failures from
  one client within ``window`` get ``421 4.7.0`` and the connection closed, and that client can't try again
  until its failures fall out of the window. Failures against one account name from all clients together
  (``account_max_failures`` within ``window``) lock that name for every client that has not logged in to it
  successfully within :data:`TRUSTED_FOR`: a distributed guesser gets ``account_max_failures`` guesses per
  window, and the application that really owns the account, logging in from its usual address, is never
  locked out. A new address with the right password waits at most ``window`` after the attack stops.
  Unknown account names are counted the same way, so the answers do not tell which names exist.

Keys are client addresses as :func:`source_key` gives them: an IPv4 address, or the /64 of an IPv6 address
(one site usually holds a whole /64, so counting single IPv6 addresses would be no limit at all).

Memory: every table keeps at most ``max_keys`` entries and forgets the least recently used one first. An
attacker with more addresses than that can make us forget about some of them; that costs them the address
space, and costs us nothing.
"""

from __future__ import annotations

import ipaddress
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["TRUSTED_FOR", "AuthGuard", "AuthVerdict", "RateLimiter", "source_key"]

#: How long a successful login makes (account, client) trusted: the account lockout does not apply to it.
TRUSTED_FOR = 7 * 86400.0
_MAX_KEYS = 100_000
_DELAY_CAP = 16  # the growing AUTH delay stops at 16 times the base delay

Clock = Callable[[], float]


def source_key(ip: str) -> str:
    """The key a client address is counted under: IPv4 as is, IPv6 by its /64, anything else as given."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


V = TypeVar("V")


class _Lru(Generic[V]):
    """A dict that keeps at most ``max_keys`` entries, dropping the least recently used."""

    def __init__(self, max_keys: int) -> None:
        self._data: dict[str, V] = {}
        self._max = max_keys

    def get(self, key: str) -> V | None:
        value = self._data.pop(key, None)
        if value is not None:
            self._data[key] = value  # most recently used goes to the end
        return value

    def put(self, key: str, value: V) -> None:
        self._data.pop(key, None)
        while len(self._data) >= self._max:
            del self._data[next(iter(self._data))]
        self._data[key] = value

    def pop(self, key: str) -> None:
        self._data.pop(key, None)

    def __len__(self) -> int:
        return len(self._data)


class RateLimiter:
    """``count`` events per ``per`` seconds per key, as a token bucket; ``count == 0`` means no limit."""

    def __init__(
        self, count: int, per: float, *, max_keys: int = _MAX_KEYS, clock: Clock = time.monotonic
    ) -> None:
        self.count = count
        self.per = per
        self._clock = clock
        self._buckets: _Lru[list[float]] = _Lru(max_keys)  # key -> [tokens, updated]

    def allow(self, key: str) -> bool:
        """Take one token for ``key``; False (and nothing taken) when its bucket is empty."""
        if self.count <= 0:
            return True
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            self._buckets.put(key, [self.count - 1.0, now])
            return True
        tokens = min(float(self.count), bucket[0] + (now - bucket[1]) * self.count / self.per)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def retry_after(self) -> int:
        """Seconds until a refused client has a token again (for ``Retry-After``), at least 1."""
        return max(1, int(self.per / self.count) + 1) if self.count > 0 else 1

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass(frozen=True, slots=True)
class AuthVerdict:
    """What to answer a failed AUTH: the reply, how long to wait before it, whether to hang up, and how
    many failures the client has within the window (for the log)."""

    reply: str
    delay: float
    close: bool
    failures: int


TOO_MANY_FAILURES = "421 4.7.0 Too many failed authentications, try again later"
CREDENTIALS_INVALID = "535 5.7.8 Authentication credentials invalid"


class AuthGuard:
    """Failed-AUTH bookkeeping for one listener kind (see the module docstring for the policy)."""

    def __init__(
        self,
        *,
        max_failures: int,
        account_max_failures: int,
        window: float,
        delay: float,
        max_keys: int = _MAX_KEYS,
        clock: Clock = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.account_max_failures = account_max_failures
        self.window = window
        self.delay = delay
        self._clock = clock
        self._by_ip: _Lru[deque[float]] = _Lru(max_keys)
        self._by_account: _Lru[deque[float]] = _Lru(max_keys)
        self._trusted: _Lru[float] = _Lru(max_keys)  # "account\0source" -> last successful login

    def configure(self, *, max_failures: int, account_max_failures: int, window: float, delay: float) -> None:
        """New limits (SIGHUP); the failures counted so far are kept."""
        self.max_failures = max_failures
        self.account_max_failures = account_max_failures
        self.window = window
        self.delay = delay

    def _recent(self, table: _Lru[deque[float]], key: str, now: float) -> int:
        times = table.get(key)
        if times is None:
            return 0
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            table.pop(key)
            return 0
        return len(times)

    @staticmethod
    def _record(table: _Lru[deque[float]], key: str, now: float, keep: int) -> None:
        times = table.get(key)
        if times is None or times.maxlen != keep:
            times = deque(times or (), maxlen=keep)
            table.put(key, times)
        times.append(now)

    def client_locked(self, ip: str) -> bool:
        """True while ``ip`` has had ``max_failures`` failures within the window: refuse AUTH outright."""
        return self._recent(self._by_ip, source_key(ip), self._clock()) >= self.max_failures

    def account_locked(self, account: str, ip: str) -> bool:
        """True when ``account`` is under a guessing attack and ``ip`` is not one of its known clients."""
        now = self._clock()
        if self._recent(self._by_account, account, now) < self.account_max_failures:
            return False
        last_ok = self._trusted.get(f"{account}\0{source_key(ip)}")
        return last_ok is None or now - last_ok > TRUSTED_FOR

    def failed(self, ip: str, account: str, *, count_account: bool = True) -> AuthVerdict:
        """Record a failure of ``ip`` (and, unless the account was locked anyway, of ``account``)."""
        now = self._clock()
        key = source_key(ip)
        self._record(self._by_ip, key, now, max(self.max_failures, 1))
        if count_account:
            self._record(self._by_account, account, now, max(self.account_max_failures, 1))
        n = self._recent(self._by_ip, key, now)
        delay = self.delay * min(2 ** (n - 1), _DELAY_CAP)
        if n >= self.max_failures:
            return AuthVerdict(TOO_MANY_FAILURES, delay, True, n)
        return AuthVerdict(CREDENTIALS_INVALID, delay, False, n)

    def succeeded(self, ip: str, account: str) -> None:
        """Remember ``(account, ip)`` as a known client. Failure counts stay: one good password must not
        wipe the record of guesses at other accounts from the same address."""
        self._trusted.put(f"{account}\0{source_key(ip)}", self._clock())
