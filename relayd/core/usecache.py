"""Values kept in memory for a known number of uses, within a byte budget.

A submitted message is used once by the first attempt of each of its recipients: the scheduler keeps the
message's bytes, the renderer its rewritten template, each until the last of those uses. An entry leaves
with its last use, or, oldest first, when the budget is exceeded (a burst bigger than the budget is read
or prepared again from disk: that costs CPU, never correctness).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

T = TypeVar("T")


class UseCache(Generic[T]):
    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[T, int, int]] = OrderedDict()  # key -> (value, uses, size)
        self._bytes = 0

    def put(self, key: str, value: T, uses: int, size: int) -> None:
        """Keep ``value`` (``size`` bytes) for ``uses`` calls of :meth:`take`."""
        self.forget(key)
        self._entries[key] = (value, uses, size)
        self._bytes += size
        while self._bytes > self._max_bytes and self._entries:
            _, (_, _, old) = self._entries.popitem(last=False)
            self._bytes -= old

    def take(self, key: str) -> T | None:
        """The value for one use, or None when it isn't (or no longer) kept."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        value, uses, size = entry
        if uses <= 1:
            del self._entries[key]
            self._bytes -= size
        else:
            self._entries[key] = (value, uses - 1, size)
        return value

    def forget(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry[2]

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0
