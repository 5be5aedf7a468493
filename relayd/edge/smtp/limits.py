"""How much one kind of listener takes at once: open connections, in total and per client address, and the
bytes of message data all sessions of a process hold in memory (relayd.edge.smtp.protocol enforces both)."""

from __future__ import annotations

from collections import Counter

from relayd.edge.ratelimit import source_key


class DataBudget:
    """Bytes of message data held in memory by all SMTP sessions of one process, against one limit.

    aiosmtpd-style servers keep a message in memory until its ``250``: without a process-wide bound,
    ``max_connections`` clients each sending a maximum-size message hold their product (1,000 x 25 MB).
    Each line of DATA is taken from the budget as it arrives and the session's whole share is given back
    when its DATA ends, however it ends (reply sent, refusal, client gone, exception). A message that
    would go over the budget is read to its end and discarded, then answered ``452 4.3.1`` (the client
    keeps it and retries); messages already in progress are not disturbed."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held = 0

    def take(self, size: int) -> bool:
        """Reserve ``size`` bytes; False (and nothing reserved) when that would pass the limit."""
        if self._held + size > self.limit:
            return False
        self._held += size
        return True

    def give(self, size: int) -> None:
        self._held -= size

    @property
    def held(self) -> int:
        """Bytes reserved now (0 when no session is inside DATA)."""
        return self._held


class ConnectionLimits:
    """Counts open connections, in total and per client IP, across all listeners of one kind; ``data`` is
    the process's :class:`DataBudget`, shared by the listeners of every kind."""

    def __init__(self, total: int, per_ip: int, data: DataBudget | None = None) -> None:
        self.total = total
        self.per_ip = per_ip
        self.data = data
        self._by_ip: Counter[str] = Counter()
        self._open = 0

    def admit(self, ip: str) -> str | None:
        """Register a connection, or return the reply that refuses it. IPv6 clients count by /64
        (:func:`~relayd.edge.ratelimit.source_key`)."""
        ip = source_key(ip)
        if self._open >= self.total:
            return "421 4.7.0 Too many connections, try again later"
        if self._by_ip[ip] >= self.per_ip:
            return "421 4.7.0 Too many connections from your address, try again later"
        self._open += 1
        self._by_ip[ip] += 1
        return None

    def release(self, ip: str) -> None:
        ip = source_key(ip)
        self._open -= 1
        self._by_ip[ip] -= 1
        if self._by_ip[ip] <= 0:
            del self._by_ip[ip]

    @property
    def open(self) -> int:
        return self._open
