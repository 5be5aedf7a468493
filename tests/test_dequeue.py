"""The check before each delivery attempt (relayd.policy.dequeue), on a real SQLite store.

The recipients of one message start their attempts together; their suppression lookups share one store
query per (account, list), and each still gets its own verdict.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from relayd.core.models import DueRecipient
from relayd.policy.dequeue import Decision, DequeueCheck
from relayd.policy.rules.suspension import AccountGate
from relayd.store import Reason, Scope, SqliteStore, SuppressionEntry


class CountingStore(SqliteStore):
    """The real store, counting its suppression queries."""

    checks: list[tuple[tuple[str, ...], str, str | None]]

    async def check(
        self, addresses: Sequence[str], account: str, list_name: str | None, now: datetime | None = None
    ) -> dict[str, SuppressionEntry]:
        self.checks.append((tuple(addresses), account, list_name))
        return await super().check(addresses, account, list_name, now)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[CountingStore]:
    s = CountingStore(tmp_path / "relayd.db")
    s.checks = []
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def item(address: str, index: int, account: str = "acme", list_name: str | None = "news") -> DueRecipient:
    return DueRecipient(
        "agrasmy74a7h54gd", index, address, 0, account, "app@acme.test", time.time(), list_name
    )


def entry(
    address: str, scope: Scope, account: str | None = None, list_name: str | None = None
) -> SuppressionEntry:
    return SuppressionEntry(address, scope, account, list_name, Reason.MANUAL, "test", datetime.now(UTC))


async def test_recipients_checked_together_share_one_query_and_keep_their_own_verdicts(
    store: CountingStore,
) -> None:
    await store.add(
        [
            entry("g@example.test", Scope.GLOBAL),
            entry("a@example.test", Scope.ACCOUNT, "acme"),
            entry("l@example.test", Scope.LIST, "acme", "news"),
            entry("other-list@example.test", Scope.LIST, "acme", "promo"),
            entry("other-account@example.test", Scope.ACCOUNT, "someone-else"),
        ]
    )
    check = DequeueCheck(store, AccountGate(store))
    addresses = [
        "g@example.test",
        "a@example.test",
        "l@example.test",
        "other-list@example.test",
        "other-account@example.test",
        *(f"ok{i}@example.test" for i in range(5)),
    ]
    verdicts = await asyncio.gather(*(check.check(item(a, i)) for i, a in enumerate(addresses)))
    got = {a: (v.decision, v.reason) for a, v in zip(addresses, verdicts, strict=True)}
    assert got == {
        "g@example.test": (Decision.DROP, "suppressed:manual"),
        "a@example.test": (Decision.DROP, "suppressed:manual"),
        "l@example.test": (Decision.DROP, "suppressed:manual"),
        "other-list@example.test": (Decision.SEND, ""),
        "other-account@example.test": (Decision.SEND, ""),
        **{f"ok{i}@example.test": (Decision.SEND, "") for i in range(5)},
    }
    assert store.checks == [(tuple(addresses), "acme", "news")]
    dropped = await store.events(datetime(2000, 1, 1, tzinfo=UTC), kind="dropped")
    assert sorted(e.address or "" for e in dropped) == ["a@example.test", "g@example.test", "l@example.test"]


async def test_different_lists_are_separate_queries_and_a_later_turn_a_new_one(store: CountingStore) -> None:
    await store.add([entry("x@example.test", Scope.LIST, "acme", "promo")])
    check = DequeueCheck(store, AccountGate(store))
    news, promo = await asyncio.gather(
        check.check(item("x@example.test", 0, list_name="news")),
        check.check(item("x@example.test", 1, list_name="promo")),
    )
    assert (news.decision, promo.decision) == (Decision.SEND, Decision.DROP)
    assert sorted(store.checks, key=str) == [
        (("x@example.test",), "acme", "news"),
        (("x@example.test",), "acme", "promo"),
    ]
    later = await check.check(item("x@example.test", 2, list_name="promo"))
    assert later.decision is Decision.DROP and len(store.checks) == 3


async def test_store_failure_delivers_on_the_last_known_state(store: CountingStore) -> None:
    check = DequeueCheck(store, AccountGate(store))
    await store.close()  # every query now fails with StoreError
    verdicts = await asyncio.gather(*(check.check(item(f"r{i}@example.test", i)) for i in range(3)))
    assert [v.decision for v in verdicts] == [Decision.SEND] * 3
