"""UseCache: a value goes with its last use, or oldest first when the byte budget is exceeded."""

from __future__ import annotations

from relayd.core.usecache import UseCache


def test_a_value_serves_its_uses_then_leaves() -> None:
    cache: UseCache[str] = UseCache(100)
    cache.put("q1", "message", uses=2, size=10)
    assert cache.take("q1") == "message"
    assert cache.take("q1") == "message"
    assert cache.take("q1") is None


def test_the_oldest_leave_when_the_budget_is_exceeded() -> None:
    cache: UseCache[int] = UseCache(25)
    for i in range(3):
        cache.put(f"q{i}", i, uses=5, size=10)
    assert cache.take("q0") is None
    assert (cache.take("q1"), cache.take("q2")) == (1, 2)


def test_forget_and_put_again_release_the_bytes() -> None:
    cache: UseCache[int] = UseCache(20)
    cache.put("a", 1, uses=1, size=10)
    cache.put("a", 2, uses=1, size=10)  # replaces: still 10 bytes held
    cache.forget("a")
    cache.put("b", 3, uses=1, size=10)
    cache.put("c", 4, uses=1, size=10)
    assert (cache.take("b"), cache.take("c")) == (3, 4)
