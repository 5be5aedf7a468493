"""Contract of the policy store, written against the Protocols so every backend runs the same suite.

Add a backend by adding its name to ``BACKENDS`` and a branch in ``_make_store``. PostgreSQL runs on the
session's test database (``pg_dsn`` in conftest.py; no server is a failure, not a skip), one schema per test.
Only the tests marked "sqlite-specific" / "postgresql-specific" know about the backend.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from relayd.store import (
    Event,
    Reason,
    SchemaTooNewError,
    Scope,
    SendsContended,
    SentRecord,
    SqliteStore,
    Store,
    StoreError,
    SuppressionEntry,
    SuspendReason,
    open_store,
)
from relayd.store.postgresql import PostgresStore

BACKENDS = ["sqlite", "postgresql"]

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
DAY = 86_400
WEEK = 7 * DAY
MONTH = 30 * DAY


_PG: dict[str, str] = {}  # "dsn": the session's test database, set by _postgresql_for_make_store


def _pg_schema(tmp_path: Path) -> str:
    """One schema per tmp_path: a test's stores share it (reopen), other tests never see its rows."""
    return "t_" + hashlib.sha1(str(tmp_path).encode()).hexdigest()[:16]


def _make_store(backend: str, tmp_path: Path) -> Store:
    if backend == "sqlite":
        return SqliteStore(tmp_path / "relayd.db")
    if backend == "postgresql":
        return PostgresStore(_PG["dsn"], schema=_pg_schema(tmp_path))
    raise AssertionError(backend)  # pragma: no cover


@pytest.fixture(autouse=True)
def _postgresql_for_make_store(request: pytest.FixtureRequest) -> None:
    """Hand the test database to _make_store for tests that may use PostgreSQL (the sqlite-parametrised
    and sqlite-specific ones do not start a server)."""
    callspec = getattr(request.node, "callspec", None)
    backend = callspec.params.get("store") if callspec is not None else None
    if "postgresql" in BACKENDS and backend != "sqlite" and not request.node.name.startswith("test_sqlite_"):
        _PG["dsn"] = request.getfixturevalue("pg_dsn")


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s = _make_store(request.param, tmp_path)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def entry(
    address: str,
    scope: Scope = Scope.GLOBAL,
    account: str | None = None,
    list_name: str | None = None,
    reason: Reason = Reason.HARD_BOUNCE,
    created_at: datetime = T0,
    expires_at: datetime | None = None,
    source: str = "test",
) -> SuppressionEntry:
    return SuppressionEntry(address, scope, account, list_name, reason, source, created_at, expires_at)


# -- suppression: scopes -----------------------------------------------------------------------------


async def test_global_blocks_every_account_and_list(store: Store) -> None:
    await store.add([entry("g@example.test")])
    for account, list_name in [("acme", None), ("acme", "news"), ("other", "promo"), ("other", None)]:
        hits = await store.check(["g@example.test"], account, list_name, now=T0)
        assert set(hits) == {"g@example.test"}, (account, list_name)
        assert hits["g@example.test"].scope is Scope.GLOBAL


async def test_account_scope_blocks_only_that_account(store: Store) -> None:
    await store.add([entry("a@example.test", Scope.ACCOUNT, "acme", reason=Reason.COMPLAINT)])
    assert set(await store.check(["a@example.test"], "acme", None, now=T0)) == {"a@example.test"}
    assert set(await store.check(["a@example.test"], "acme", "news", now=T0)) == {"a@example.test"}
    assert await store.check(["a@example.test"], "other", None, now=T0) == {}
    assert await store.check(["a@example.test"], "other", "news", now=T0) == {}


async def test_list_scope_blocks_only_that_list_of_that_account(store: Store) -> None:
    await store.add([entry("l@example.test", Scope.LIST, "acme", "news", reason=Reason.UNSUBSCRIBE)])
    hits = await store.check(["l@example.test"], "acme", "news", now=T0)
    assert hits["l@example.test"].reason is Reason.UNSUBSCRIBE
    assert await store.check(["l@example.test"], "acme", "promo", now=T0) == {}
    assert await store.check(["l@example.test"], "acme", None, now=T0) == {}
    assert await store.check(["l@example.test"], "other", "news", now=T0) == {}


async def test_check_batch_returns_only_suppressed_and_broadest_scope_wins(store: Store) -> None:
    await store.add(
        [
            entry("all@example.test", Scope.LIST, "acme", "news", Reason.UNSUBSCRIBE),
            entry("all@example.test", Scope.ACCOUNT, "acme", reason=Reason.COMPLAINT),
            entry("all@example.test", Scope.GLOBAL, reason=Reason.SPAMTRAP),
            entry("two@example.test", Scope.LIST, "acme", "news", Reason.UNSUBSCRIBE),
            entry("two@example.test", Scope.ACCOUNT, "acme", reason=Reason.COMPLAINT),
        ]
    )
    hits = await store.check(
        ["all@example.test", "two@example.test", "free@example.test", "all@example.test"],
        "acme",
        "news",
        now=T0,
    )
    assert set(hits) == {"all@example.test", "two@example.test"}
    assert hits["all@example.test"].reason is Reason.SPAMTRAP
    assert hits["two@example.test"].scope is Scope.ACCOUNT
    assert await store.check([], "acme", "news", now=T0) == {}


async def test_check_large_batch(store: Store) -> None:
    addresses = [f"r{i:04d}@example.test" for i in range(1500)]
    await store.add([entry(a) for a in addresses[::7]])
    hits = await store.check([*addresses, *addresses[:10]], "acme", "news", now=T0)
    assert set(hits) == set(addresses[::7])


async def test_entry_round_trips(store: Store) -> None:
    e = entry(
        '"john doe"@example.test',
        Scope.LIST,
        "acme",
        "news",
        Reason.UNSUBSCRIBE,
        created_at=T0.replace(microsecond=123456),
        expires_at=T0 + timedelta(days=30, microseconds=7),
        source="http:one-click",
    )
    await store.add([e])
    assert await store.list_entries(address=e.address, now=T0) == [e]
    assert (await store.check([e.address], "acme", "news", now=T0))[e.address] == e


# -- suppression: expiry, upsert, remove, list ---------------------------------------------------------


async def test_expired_entries_never_block(store: Store) -> None:
    await store.add(
        [
            entry("past@example.test", expires_at=T0 - timedelta(seconds=1)),
            entry("edge@example.test", expires_at=T0),
            entry("future@example.test", expires_at=T0 + timedelta(days=1)),
        ]
    )
    assert set(
        await store.check(
            ["past@example.test", "edge@example.test", "future@example.test"], "a", None, now=T0
        )
    ) == {"future@example.test"}
    later = T0 + timedelta(days=1, seconds=1)
    assert await store.check(["future@example.test"], "a", None, now=later) == {}
    # Expired entries are still listed on request, and purged on request.
    assert len(await store.list_entries(include_expired=True)) == 3
    assert [e.address for e in await store.list_entries(now=T0)] == ["future@example.test"]
    assert await store.purge_expired(now=T0) == 2
    assert await store.count() == 1


async def test_add_upserts_on_same_key(store: Store) -> None:
    await store.add([entry("u@example.test", Scope.ACCOUNT, "acme", reason=Reason.COMPLAINT)])
    await store.add(
        [
            entry(
                "u@example.test",
                Scope.ACCOUNT,
                "acme",
                reason=Reason.MANUAL,
                expires_at=T0 + timedelta(days=1),
            )
        ]
    )
    await store.add([entry("u@example.test", Scope.ACCOUNT, "other", reason=Reason.COMPLAINT)])
    assert await store.count() == 2
    [acme] = await store.list_entries(address="u@example.test", account="acme", now=T0)
    assert acme.reason is Reason.MANUAL
    assert acme.expires_at == T0 + timedelta(days=1)
    # An upsert can also lift an expiry.
    await store.add([entry("u@example.test", Scope.ACCOUNT, "acme", reason=Reason.MANUAL)])
    [acme] = await store.list_entries(address="u@example.test", account="acme", now=T0)
    assert acme.expires_at is None
    assert await store.add([]) == 0


async def test_remove(store: Store) -> None:
    await store.add(
        [
            entry("r@example.test"),
            entry("r@example.test", Scope.ACCOUNT, "acme"),
            entry("r@example.test", Scope.LIST, "acme", "news"),
            entry("r@example.test", Scope.LIST, "acme", "promo"),
            entry("keep@example.test"),
        ]
    )
    assert await store.remove("r@example.test", Scope.LIST, "acme", "news") == 1
    assert await store.remove("r@example.test", Scope.LIST, "acme", "news") == 0
    assert await store.check(["r@example.test"], "acme", "news", now=T0) != {}  # global still there
    assert await store.remove("r@example.test", Scope.GLOBAL) == 1
    assert await store.remove("r@example.test", account="acme") == 2
    assert await store.check(["r@example.test"], "acme", "promo", now=T0) == {}
    assert await store.count() == 1


async def test_list_filters_limit_and_count(store: Store) -> None:
    await store.add(
        [entry(f"g{i}@example.test") for i in range(5)]
        + [entry(f"a{i}@example.test", Scope.ACCOUNT, "acme", reason=Reason.COMPLAINT) for i in range(3)]
        + [entry("l@example.test", Scope.LIST, "acme", "news", Reason.UNSUBSCRIBE)]
        + [entry("o@example.test", Scope.LIST, "other", "news", Reason.UNSUBSCRIBE)]
    )
    assert await store.count() == 10
    assert await store.count(scope=Scope.GLOBAL) == 5
    assert len(await store.list_entries(now=T0, limit=4)) == 4
    page2 = await store.list_entries(now=T0, limit=4, offset=8)
    assert len(page2) == 2
    assert {e.address for e in await store.list_entries(account="acme", now=T0)} == {
        "a0@example.test",
        "a1@example.test",
        "a2@example.test",
        "l@example.test",
    }
    assert [e.address for e in await store.list_entries(list_name="news", account="other", now=T0)] == [
        "o@example.test"
    ]
    assert len(await store.list_entries(reason=Reason.UNSUBSCRIBE, now=T0)) == 2
    assert len(await store.list_entries(scope=Scope.ACCOUNT, now=T0)) == 3


async def test_scan_yields_everything_in_batches(store: Store) -> None:
    await store.add([entry(f"s{i:03d}@example.test") for i in range(25)])
    await store.add([entry("s000@example.test", Scope.ACCOUNT, "acme", expires_at=T0)])
    batches = [batch async for batch in store.scan(batch_size=10)]
    assert [len(b) for b in batches] == [10, 10, 6]
    flat = [e for b in batches for e in b]
    assert len({(e.address, e.scope, e.account, e.list) for e in flat}) == 26


def test_entry_validates_scope_fields() -> None:
    with pytest.raises(ValueError):
        entry("x@example.test", Scope.GLOBAL, account="acme")
    with pytest.raises(ValueError):
        entry("x@example.test", Scope.ACCOUNT)
    with pytest.raises(ValueError):
        entry("x@example.test", Scope.ACCOUNT, "acme", "news")
    with pytest.raises(ValueError):
        entry("x@example.test", Scope.LIST, "acme")
    naive = entry("x@example.test", created_at=datetime(2025, 1, 1))
    assert naive.created_at.tzinfo is UTC


# -- send counters --------------------------------------------------------------------------------------


async def test_record_and_count_sends(store: Store) -> None:
    await store.record_sends("acme", "news", ["a@x.test", "b@x.test", "a@x.test"], T0)
    await store.record_sends("acme", "news", ["a@x.test"], T0)  # same instant: counted, not lost
    await store.record_sends("acme", "news", ["a@x.test"], T0 + timedelta(hours=1))
    await store.record_sends("acme", "promo", ["a@x.test"], T0)
    await store.record_sends("other", "news", ["a@x.test"], T0)
    counts = await store.count_sends("acme", "news", ["a@x.test", "b@x.test", "c@x.test"], T0)
    assert counts == {"a@x.test": 3, "b@x.test": 1, "c@x.test": 0}
    assert await store.count_sends("acme", "news", ["a@x.test"], T0 + timedelta(minutes=1)) == {"a@x.test": 1}
    await store.record_sends("acme", None, ["a@x.test"], T0)
    assert await store.count_sends("acme", None, ["a@x.test"], T0) == {"a@x.test": 1}


async def test_reserve_day_cap_of_one_under_concurrency(store: Store) -> None:
    caps = {DAY: 1}
    results = await asyncio.gather(
        *[store.reserve_sends("acme", "news", ["hot@x.test"], T0, caps) for _ in range(50)]
    )
    assert sum(1 for r in results if r == {"hot@x.test"}) == 1
    assert sum(1 for r in results if r == set()) == 49
    assert await store.count_sends("acme", "news", ["hot@x.test"], T0 - timedelta(days=1)) == {
        "hot@x.test": 1
    }


async def _send_counted(
    store: Store, queue_id: str, addresses: list[str], caps: dict[int, int]
) -> set[str] | None:
    """What the policy pipeline does for a list message: the caps checked, then the ledger rows of the
    addresses that passed written with their counts. The addresses counted, or None when the ledger
    write found a cap used meanwhile (SendsContended: the client gets 451)."""
    allowed = await store.check_sends("acme", "news", addresses, T0, caps)
    kept = [a for a in addresses if a in allowed]
    if not kept:
        return set()
    records = [SentRecord(queue_id, i, "acme", "news", a, T0) for i, a in enumerate(kept)]
    try:
        await store.record_sent(records, caps=caps)
    except SendsContended:
        return None
    return set(kept)


async def test_messages_racing_for_the_last_send_of_a_cap_get_it_once(store: Store) -> None:
    """50 messages to one address with a day cap of 1, all at once: one is counted and has its ledger
    row; every other one is refused, at the check (PostgreSQL reserves there) or at the ledger write
    (SQLite checks again there), and left no count and no row."""
    results = await asyncio.gather(
        *[_send_counted(store, f"Q{i:03d}", ["hot@x.test"], {DAY: 1}) for i in range(50)]
    )
    assert sum(1 for r in results if r == {"hot@x.test"}) == 1
    assert all(r in (set(), None) for r in results if r != {"hot@x.test"})
    assert await store.count_sends("acme", "news", ["hot@x.test"], T0 - timedelta(days=1)) == {
        "hot@x.test": 1
    }
    rows = [await store.lookup_sent(f"Q{i:03d}", 0) for i in range(50)]
    assert [r.address for r in rows if r is not None] == ["hot@x.test"]


async def test_a_message_counts_its_capped_sends_with_its_ledger_rows(store: Store) -> None:
    caps = {DAY: 1, WEEK: 2}
    assert await _send_counted(store, "Q1", ["a@x.test", "b@x.test"], caps) == {"a@x.test", "b@x.test"}
    counted = await store.count_sends("acme", "news", ["a@x.test", "b@x.test", "c@x.test"], T0)
    assert counted == {"a@x.test": 1, "b@x.test": 1, "c@x.test": 0}
    assert [r.address for r in await _ledger(store, "Q1", 2)] == ["a@x.test", "b@x.test"]
    # the cap's answer for the next message: a and b were sent today, c was not
    assert await store.check_sends("acme", "news", ["a@x.test", "c@x.test"], T0, caps) == {"c@x.test"}
    assert await store.check_sends("acme", "news", ["a@x.test"], T0 + timedelta(days=1), caps) == {"a@x.test"}
    assert await store.check_sends("acme", "news", ["z@x.test"], T0, {DAY: 0}) == set()
    assert await store.check_sends("acme", "news", ["z@x.test"], T0, {}) == {"z@x.test"}
    assert await store.check_sends("acme", "news", [], T0, caps) == set()


async def _ledger(store: Store, queue_id: str, n: int) -> list[SentRecord]:
    found = [await store.lookup_sent(queue_id, i) for i in range(n)]
    return [r for r in found if r is not None]


async def test_sqlite_checks_caps_without_a_turn_of_the_loop_and_counts_in_the_ledger_write(
    tmp_path: Path,
) -> None:
    """sqlite-specific: the check is a read on the loop's thread (under load a turn of the loop is a few
    ms of the other sessions' work), the count is made with the ledger rows in one job of the group
    commit; a job that finds the cap used since is rolled back alone, the batch's other jobs committed."""
    store = SqliteStore(tmp_path / "relayd.db")
    await store.open()
    try:
        turned: list[int] = []
        asyncio.get_running_loop().call_soon(turned.append, 1)
        assert await store.check_sends("acme", "news", ["a@x.test"], T0, {DAY: 1}) == {"a@x.test"}
        assert turned == []  # no other callback ran meanwhile
        assert await store.count_sends("acme", "news", ["a@x.test"], T0) == {"a@x.test": 0}  # not counted yet

        def rows(qid: str, address: str) -> list[SentRecord]:
            return [SentRecord(qid, 0, "acme", "news", address, T0)]

        first = store.record_sent(rows("Q1", "a@x.test"), caps={DAY: 1})
        second = store.record_sent(rows("Q2", "a@x.test"), caps={DAY: 1})  # checked before Q1 counted
        other = store.record_sent(rows("Q3", "b@x.test"), caps={DAY: 1})
        outcomes = await asyncio.gather(first, second, other, return_exceptions=True)
        assert outcomes[0] is None and outcomes[2] is None
        assert isinstance(outcomes[1], SendsContended) and "a@x.test" in str(outcomes[1])
        assert await store.lookup_sent("Q2", 0) is None
        assert (await store.lookup_sent("Q3", 0)) is not None
        assert await store.count_sends("acme", "news", ["a@x.test", "b@x.test"], T0) == {
            "a@x.test": 1,
            "b@x.test": 1,
        }
        with pytest.raises(ValueError, match="share account, list and time"):
            store.record_sent(
                [
                    SentRecord("Q4", 0, "acme", "news", "c@x.test", T0),
                    SentRecord("Q4", 1, "acme", "promo", "d@x.test", T0),
                ],
                caps={DAY: 1},
            )
    finally:
        await store.close()


async def test_reserve_is_per_address_list_and_account(store: Store) -> None:
    caps = {DAY: 1}
    assert await store.reserve_sends("acme", "news", ["a@x.test", "b@x.test"], T0, caps) == {
        "a@x.test",
        "b@x.test",
    }
    assert await store.reserve_sends("acme", "news", ["a@x.test", "c@x.test"], T0, caps) == {"c@x.test"}
    assert await store.reserve_sends("acme", "promo", ["a@x.test"], T0, caps) == {"a@x.test"}
    assert await store.reserve_sends("other", "news", ["a@x.test"], T0, caps) == {"a@x.test"}
    assert await store.reserve_sends("acme", "news", [], T0, caps) == set()


async def test_windows_roll(store: Store) -> None:
    caps = {DAY: 1, WEEK: 3, MONTH: 5}
    addr = ["w@x.test"]

    async def reserve(at: datetime) -> bool:
        return await store.reserve_sends("acme", "news", addr, at, caps) == {"w@x.test"}

    assert await reserve(T0)
    assert not await reserve(T0 + timedelta(hours=23, minutes=59))
    assert await reserve(T0 + timedelta(seconds=DAY))  # exactly a day later: the first send left the window
    assert await reserve(T0 + timedelta(days=2))
    assert not await reserve(T0 + timedelta(days=3))  # 3 in the last week
    assert await reserve(T0 + timedelta(days=7))  # the T0 send left the week
    assert await reserve(T0 + timedelta(days=8))  # T0+1d left too
    assert not await reserve(T0 + timedelta(days=9))  # 5 in the month: T0, +1, +2, +7, +8
    assert await reserve(T0 + timedelta(days=30))  # T0 left the month
    sent = await store.count_sends("acme", "news", addr, T0)
    assert sent == {"w@x.test": 6}


async def test_reserve_without_caps_or_with_zero_cap(store: Store) -> None:
    assert await store.reserve_sends("acme", "news", ["n@x.test"], T0, {}) == {"n@x.test"}
    assert await store.reserve_sends("acme", "news", ["z@x.test"], T0, {DAY: 0}) == set()
    with pytest.raises(ValueError):
        await store.reserve_sends("acme", "news", ["z@x.test"], T0, {0: 1})


async def test_prune_sends(store: Store) -> None:
    await store.record_sends("acme", "news", ["p@x.test"], T0 - timedelta(days=40))
    await store.record_sends("acme", "news", ["p@x.test"], T0)
    assert await store.prune(T0 - timedelta(days=30)) == 1
    assert await store.count_sends("acme", "news", ["p@x.test"], T0 - timedelta(days=365)) == {"p@x.test": 1}


# -- account state ----------------------------------------------------------------------------------------


async def test_suspension_states(store: Store) -> None:
    assert await store.get_account_state("acme") is None
    assert await store.reinstate("acme") is None
    state = await store.suspend("acme", SuspendReason.COMPLAINT_RATE, "0.31 % over 30 days", at=T0)
    assert state.suspended and state.reason is SuspendReason.COMPLAINT_RATE and state.since == T0
    again = await store.suspend("acme", SuspendReason.SPAMTRAP, "hit trap", at=T0 + timedelta(hours=1))
    assert again.since == T0 and again.reason is SuspendReason.SPAMTRAP and again.details == "hit trap"
    assert await store.get_account_state("acme") == again
    await store.suspend("beta", SuspendReason.MANUAL, at=T0)
    back = await store.reinstate("acme", at=T0 + timedelta(days=1))
    assert back is not None and not back.suspended and back.since == T0 + timedelta(days=1)
    assert back.reason is None
    assert [s.account for s in await store.list_account_states()] == ["acme", "beta"]
    assert [s.account for s in await store.list_account_states(suspended_only=True)] == ["beta"]
    # Suspending again after a reinstatement starts a new "since".
    new = await store.suspend("acme", SuspendReason.HARD_BOUNCE_RATE, at=T0 + timedelta(days=2))
    assert new.since == T0 + timedelta(days=2)


# -- events ---------------------------------------------------------------------------------------------


async def test_events_filter_by_since_account_kind(store: Store) -> None:
    evs = [
        Event(T0 - timedelta(hours=2), "dropped", "acme", "news", "a@x.test", "suppressed:hard_bounce", "Q1"),
        Event(T0 - timedelta(minutes=30), "delivered", "acme", "news", "b@x.test", None, "Q2"),
        Event(T0, "bounced", "other", None, "c@x.test", "userunknown", "Q3", '{"status": "5.1.1"}'),
        Event(T0 + timedelta(minutes=1), "feedback", None, None, None, "unattributable", None),
    ]
    await store.record_events(evs[:2])
    for e in evs[2:]:
        await store.record_event(e)
    assert await store.events(T0 - timedelta(hours=3)) == evs
    assert await store.events(T0 - timedelta(hours=1)) == evs[1:]
    assert await store.events(T0) == evs[2:]  # since is inclusive
    assert await store.events(T0 - timedelta(hours=3), limit=2) == evs[:2]
    assert await store.events(T0 - timedelta(hours=3), account="acme") == evs[:2]
    assert await store.events(T0 - timedelta(hours=3), kind="bounced") == [evs[2]]
    assert await store.prune_events(T0) == 2
    assert await store.events(T0 - timedelta(days=1)) == evs[2:]


async def test_concurrent_record_event_all_committed(store: Store) -> None:
    await asyncio.gather(
        *[store.record_event(Event(T0 + timedelta(microseconds=i), "delivered", "acme")) for i in range(200)]
    )
    got = await store.events(T0, limit=1000)
    assert [e.at for e in got] == [T0 + timedelta(microseconds=i) for i in range(200)]


# -- lifecycle ------------------------------------------------------------------------------------------


async def test_state_survives_reopen(tmp_path: Path) -> None:
    for backend in BACKENDS:
        s = _make_store(backend, tmp_path)
        await s.open()
        await s.add([entry("keep@example.test")])
        await s.record_event(Event(T0, "suppressed"))
        await s.close()
        await s.close()  # twice is fine
        s = _make_store(backend, tmp_path)
        await s.open()
        assert await s.migrate() >= 1
        assert await s.count() == 1
        assert len(await s.events(T0)) == 1
        await s.close()


async def test_open_store_factory(tmp_path: Path) -> None:
    s = await open_store("sqlite", tmp_path / "sub" / "relayd.db", None)
    try:
        assert await s.count() == 0
    finally:
        await s.close()
    with pytest.raises(StoreError):  # nothing listens on port 1
        await open_store("postgresql", None, "postgresql://relayd@127.0.0.1:1/relayd")
    with pytest.raises(ValueError):
        await open_store("mysql", None, None)


# -- sqlite-specific ------------------------------------------------------------------------------------


async def test_sqlite_reserve_is_atomic_across_connections(tmp_path: Path) -> None:
    """Two store objects on one file stand in for two processes (daemon + CLI): the cap still holds."""
    a, b = SqliteStore(tmp_path / "r.db"), SqliteStore(tmp_path / "r.db")
    await a.open()
    await b.open()
    try:
        results = await asyncio.gather(
            *[s.reserve_sends("acme", "news", ["x@x.test"], T0, {DAY: 1}) for s in (a, b) * 20]
        )
        assert sum(len(r) for r in results) == 1
    finally:
        await a.close()
        await b.close()


async def test_sqlite_refuses_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    s = SqliteStore(path)
    await s.open()
    await s.close()
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (999, 'future', 0)")
    conn.close()
    with pytest.raises(SchemaTooNewError):
        await SqliteStore(path).open()


async def test_sqlite_unopened_store_raises_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        await SqliteStore(tmp_path / "x.db").count()


async def test_sqlite_unopenable_path_raises_store_error(tmp_path: Path) -> None:
    (tmp_path / "adir").mkdir()
    with pytest.raises(StoreError):
        await SqliteStore(tmp_path / "adir").open()


async def test_sqlite_migrate_upgrades_existing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file at the current version gets a later migration applied on open, once, and keeps its data."""
    import relayd.store.sqlite.connection as sqlite_backend
    from relayd.store.migrations import LATEST_VERSION, MIGRATIONS, Migration

    path = tmp_path / "old.db"
    async with SqliteStore(path) as s:
        await s.add([entry("old@example.test")])
    nxt = LATEST_VERSION + 1
    v_next = Migration(nxt, "test_column", sqlite=("ALTER TABLE suppression ADD COLUMN note TEXT",))
    monkeypatch.setattr(sqlite_backend, "LATEST_VERSION", nxt)
    monkeypatch.setattr(
        sqlite_backend, "pending", lambda cur: tuple(m for m in (*MIGRATIONS, v_next) if m.version > cur)
    )
    async with SqliteStore(path) as s:
        assert await s.migrate() == nxt
        assert await s.count() == 1
    with sqlite3.connect(path) as conn:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(suppression)")]
        versions = [row[0] for row in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
    conn.close()
    assert "note" in columns and versions == list(range(1, nxt + 1))


async def test_sqlite_record_event_on_closed_store_raises(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "closed.db")
    await s.open()
    await s.close()
    with pytest.raises(StoreError):
        await asyncio.wait_for(s.record_event(Event(T0, "delivered")), timeout=5)


# --- sent ledger ------------------------------------------------------------------------------------


async def test_sent_ledger_round_trip_and_prune(store: Store) -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    await store.record_sent(
        [
            SentRecord("q1", 0, "acme", "news", "a@example.test", t0),
            SentRecord("q1", 1, "acme", None, "b@example.test", t0 + timedelta(days=2)),
        ]
    )
    assert await store.lookup_sent("q1", 0) == SentRecord("q1", 0, "acme", "news", "a@example.test", t0)
    rec = await store.lookup_sent("q1", 1)
    assert rec is not None and rec.list is None and rec.address == "b@example.test"
    assert await store.lookup_sent("q1", 2) is None
    assert await store.prune_sent(t0 + timedelta(days=1)) == 1
    assert await store.lookup_sent("q1", 0) is None
    assert await store.lookup_sent("q1", 1) is not None


# --- feedback counts (count_sent / count_events) -----------------------------------------------------


async def test_count_sent_exact_window_across_hours_and_prune(store: Store) -> None:
    t0 = datetime(2026, 1, 1, 10, 30, tzinfo=UTC)
    times = [t0 + timedelta(minutes=20 * i) for i in range(9)]  # 10:30 .. 13:10, across hour edges
    await store.record_sent(
        SentRecord(f"q{i:015d}", 0, "acme", None, f"r{i}@example.test", at) for i, at in enumerate(times)
    )
    await store.record_sent([SentRecord("qother000000000", 0, "other", None, "x@example.test", t0)])
    for i, at in enumerate(times):
        assert await store.count_sent("acme", at) == 9 - i, at
        assert await store.count_sent("acme", at + timedelta(microseconds=1)) == 8 - i, at
    assert await store.count_sent("acme", t0 - timedelta(days=30)) == 9
    assert await store.count_sent("other", t0 - timedelta(days=30)) == 1
    assert await store.count_sent("nobody", t0 - timedelta(days=30)) == 0
    # whole hours come from the roll-up: pruning the ledger for size does not lower them
    await store.prune_sent(t0 + timedelta(hours=5))
    assert await store.count_sent("acme", t0 + timedelta(minutes=90)) == 4  # from 12:00


async def test_count_events_by_account_address_reason(store: Store) -> None:
    t0 = datetime(2026, 1, 1, 10, 59, tzinfo=UTC)
    evs = [
        Event(t0, "complaint", "acme", None, "a@example.test", "abuse"),
        Event(t0 + timedelta(minutes=2), "complaint", "acme", "news", "b@example.test", "fraud"),
        Event(t0 + timedelta(hours=3), "complaint", "acme", None, "a@example.test", "abuse"),
        Event(t0 + timedelta(hours=3), "complaint", "other", None, "a@example.test", "abuse"),
        Event(t0, "soft_bounce", "acme", None, "a@example.test", "mailboxfull"),
        Event(t0 + timedelta(days=1), "soft_bounce", "other", None, "a@example.test", None),
        Event(t0, "dropped", "acme", None, "trap@example.test", "spamtrap"),
        Event(t0, "unattributed", None, None, None, "dsn"),
    ]
    await store.record_events(evs)
    since = t0 - timedelta(days=1)
    assert await store.count_events("complaint", since, account="acme") == 3
    assert await store.count_events("complaint", t0 + timedelta(seconds=1), account="acme") == 2
    assert await store.count_events("complaint", t0 + timedelta(hours=1), account="acme") == 1
    assert await store.count_events("complaint", since, account="acme", reason="abuse") == 2
    assert await store.count_events("complaint", since) == 4
    assert await store.count_events("soft_bounce", since, address="a@example.test") == 2
    assert await store.count_events("soft_bounce", t0 + timedelta(hours=1), address="a@example.test") == 1
    assert await store.count_events("soft_bounce", since, address="a@example.test", account="acme") == 1
    assert await store.count_events("dropped", since, account="acme", reason="spamtrap") == 1
    assert await store.count_events("dropped", since, account="acme", reason="cap") == 0
    assert await store.count_events("unattributed", since) == 1
    assert await store.count_events("complaint", t0 + timedelta(days=2), account="acme") == 0
    await store.prune_events(t0 + timedelta(days=2))
    assert await store.count_events("complaint", since, account="acme") == 3  # roll-up survives


async def test_sqlite_migration_3_folds_existing_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database written by schema 2 gets the same counts after upgrading as one written by schema 3."""
    import relayd.store.sqlite.connection as sqlite_module
    from relayd.store import migrations

    path = tmp_path / "old.db"
    monkeypatch.setattr(sqlite_module, "LATEST_VERSION", 2)
    monkeypatch.setattr(sqlite_module, "pending", lambda cur: migrations.MIGRATIONS[cur:2])  # stop at 2
    old = SqliteStore(path)
    await old.open()
    t0 = datetime(2026, 1, 1, 10, 15, tzinfo=UTC)
    await old.record_sent([SentRecord("q000000000000001", 0, "acme", None, "a@example.test", t0)])
    await old.close()
    # an event as schema 2 stores it (today's code writes columns that schema lacks)
    with sqlite3.connect(path) as conn:
        conn.execute(
            "INSERT INTO events (at, kind, account, address, reason) VALUES (?, ?, ?, ?, ?)",
            (int(t0.timestamp()) * 1_000_000, "complaint", "acme", "a@example.test", "abuse"),
        )
    conn.close()
    monkeypatch.undo()
    new = SqliteStore(path)
    await new.open()
    try:
        assert await new.count_sent("acme", t0 - timedelta(hours=2)) == 1
        assert await new.count_events("complaint", t0 - timedelta(hours=2), account="acme") == 1
        await new.record_sent([SentRecord("q000000000000002", 0, "acme", None, "b@example.test", t0)])
        assert await new.count_sent("acme", t0 - timedelta(hours=2)) == 2
    finally:
        await new.close()


# --- webhook outbox: events by id, cursors (relayd.edge.webhooks) ------------------------------------------


async def test_events_after_ids_order_account_filter_and_limit(store: Store) -> None:
    assert await store.max_event_id() == 0
    assert await store.events_after(0, "acme", 10) == []
    evs = [
        Event(T0, "delivered", "acme", "news", "a@x.test", None, "Q1"),
        Event(T0 - timedelta(hours=1), "bounced", "other", None, "b@x.test", "userunknown", "Q2"),
        Event(T0, "complaint", "acme", None, "c@x.test", "abuse", "Q3", '{"feedback_type": "abuse"}'),
        Event(T0, "feedback", None, None, None, "unattributable", None),
    ]
    await store.record_events(evs[:2])
    for e in evs[2:]:
        await store.record_event(e)
    everything = await store.events_after(0, None, 100)
    assert [e for _, e in everything] == evs  # id order is recording order, not `at` order
    ids = [i for i, _ in everything]
    assert ids == sorted(ids) and len(set(ids)) == 4
    assert await store.max_event_id() == ids[-1]
    assert await store.events_after(0, "acme", 100) == [(ids[0], evs[0]), (ids[2], evs[2])]
    assert await store.events_after(ids[0], "acme", 100) == [(ids[2], evs[2])]
    assert await store.events_after(ids[2], "acme", 100) == []
    assert await store.events_after(0, None, 2) == everything[:2]
    assert await store.events_after(ids[1], None, 100) == everything[2:]
    assert await store.events_after(0, "nobody", 100) == []


async def test_event_ids_follow_commit_order_under_concurrency(store: Store) -> None:
    """What the webhook cursor relies on: a reader never sees a gap that a later commit fills."""
    seen: list[int] = []

    async def tail() -> None:
        after = 0
        while len(seen) < 300:
            for i, _ in await store.events_after(after, "acme", 50):
                seen.append(i)
                after = i
            await asyncio.sleep(0)

    reader = asyncio.create_task(tail())
    await asyncio.gather(*[store.record_event(Event(T0, "delivered", "acme")) for _ in range(200)])
    await store.record_events(Event(T0, "deferred", "acme") for _ in range(100))
    await asyncio.wait_for(reader, timeout=10)
    assert seen == [i for i, _ in await store.events_after(0, "acme", 1000)]


async def test_webhook_cursor_round_trip_and_upsert(store: Store) -> None:
    key = "acme https://hooks.example.test/relayd"
    assert await store.get_webhook_cursor(key) is None
    await store.set_webhook_cursor(key, 0)
    assert await store.get_webhook_cursor(key) == 0
    await store.set_webhook_cursor(key, 41)
    await store.set_webhook_cursor("other https://hooks.example.test/relayd", 7)
    assert await store.get_webhook_cursor(key) == 41
    assert await store.get_webhook_cursor("other https://hooks.example.test/relayd") == 7
    await store.set_webhook_cursor(key, 3)  # a plain set, not a max: the dispatcher may start over
    assert await store.get_webhook_cursor(key) == 3


async def test_webhook_cursor_and_event_ids_survive_reopen(tmp_path: Path) -> None:
    for backend in BACKENDS:
        s = _make_store(backend, tmp_path / backend)
        await s.open()
        await s.record_events([Event(T0, "delivered", "acme"), Event(T0, "delivered", "acme")])
        last = await s.max_event_id()
        await s.set_webhook_cursor("acme http://127.0.0.1/hook", last)
        await s.close()
        s = _make_store(backend, tmp_path / backend)
        await s.open()
        try:
            assert await s.get_webhook_cursor("acme http://127.0.0.1/hook") == last
            await s.record_event(Event(T0, "bounced", "acme"))
            after = await s.events_after(last, "acme", 10)
            assert [e.kind for _, e in after] == ["bounced"] and after[0][0] > last
        finally:
            await s.close()


# --- postgresql-specific -------------------------------------------------------------------------------


async def test_postgresql_open_store_factory(pg_dsn: str) -> None:
    s = await open_store("postgresql", None, pg_dsn)
    try:
        assert isinstance(s, PostgresStore) and await s.count() == 0
    finally:
        await s.close()
    with pytest.raises(ValueError):  # the config names the backend but no dsn
        await open_store("postgresql", None, None)


async def test_postgresql_refuses_newer_schema(pg_dsn: str, tmp_path: Path) -> None:
    s = _make_store("postgresql", tmp_path)
    await s.open()
    await s.close()
    schema = _pg_schema(tmp_path)
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(
            f"INSERT INTO {schema}.schema_migrations (version, name, applied_at) VALUES (999, 'future', 0)"
        )
    finally:
        await conn.close()
    with pytest.raises(SchemaTooNewError):
        await _make_store("postgresql", tmp_path).open()


async def test_postgresql_migrate_upgrades_existing_schema(
    pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database at the current version gets a later migration applied on open, once, and keeps its data."""
    import relayd.store.postgresql.connection as pg_backend
    from relayd.store.migrations import LATEST_VERSION, MIGRATIONS, Migration

    async with PostgresStore(pg_dsn, schema=_pg_schema(tmp_path)) as s:
        await s.add([entry("old@example.test")])
    nxt = LATEST_VERSION + 1
    v_next = Migration(
        nxt,
        "test_column",
        sqlite=("ALTER TABLE suppression ADD COLUMN note TEXT",),
        postgresql=("ALTER TABLE suppression ADD COLUMN note TEXT",),
    )
    monkeypatch.setattr(pg_backend, "LATEST_VERSION", nxt)
    monkeypatch.setattr(
        pg_backend, "pending", lambda cur: tuple(m for m in (*MIGRATIONS, v_next) if m.version > cur)
    )
    async with PostgresStore(pg_dsn, schema=_pg_schema(tmp_path)) as s:
        assert await s.migrate() == nxt
        assert await s.count() == 1
    conn = await asyncpg.connect(pg_dsn)
    try:
        schema = _pg_schema(tmp_path)
        columns = await conn.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = $1"
            " AND table_name = 'suppression'",
            schema,
        )
        versions = await conn.fetch(f"SELECT version FROM {schema}.schema_migrations ORDER BY version")
    finally:
        await conn.close()
    assert "note" in {c[0] for c in columns} and [v[0] for v in versions] == list(range(1, nxt + 1))


async def test_postgresql_migration_without_ddl_is_refused(
    pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import relayd.store.postgresql.connection as pg_backend
    from relayd.store.migrations import LATEST_VERSION, MIGRATIONS, Migration

    v_next = Migration(LATEST_VERSION + 1, "sqlite_only", sqlite=("SELECT 1",))
    monkeypatch.setattr(pg_backend, "LATEST_VERSION", LATEST_VERSION + 1)
    monkeypatch.setattr(
        pg_backend, "pending", lambda cur: tuple(m for m in (*MIGRATIONS, v_next) if m.version > cur)
    )
    with pytest.raises(StoreError, match="no PostgreSQL DDL"):
        await PostgresStore(pg_dsn, schema=_pg_schema(tmp_path)).open()


async def test_postgresql_key_order_is_byte_order(tmp_path: Path) -> None:
    """list_entries() and scan() order keys as SQLite does (COLLATE "C"), whatever the database's locale."""
    addresses = ["b@x.test", "B@x.test", "a@x.test", "_@x.test", "é@x.test", "z@x.test"]
    for backend in BACKENDS:
        s = _make_store(backend, tmp_path / backend)
        await s.open()
        try:
            await s.add([entry(a) for a in addresses])
            assert [e.address for e in await s.list_entries(now=T0)] == sorted(addresses), backend
            batches = [b async for b in s.scan(batch_size=2)]
            assert [e.address for b in batches for e in b] == sorted(addresses), backend
        finally:
            await s.close()


async def test_mta_sts_policy_cache_round_trip_replace_and_prune(store: Store) -> None:
    from relayd.store.models import MtaStsRecord

    assert await store.get_mta_sts("example.com") is None
    patterns = ("mx1.example.com", "*.example.net")
    first = MtaStsRecord("example.com", "20260101", "enforce", patterns, 86400, T0)
    await store.put_mta_sts(first)
    assert await store.get_mta_sts("example.com") == first
    # a new policy id replaces the row; another domain's stays
    second = MtaStsRecord("example.com", "20260202", "testing", ("mx.example.com",), 3600, T0 + timedelta(1))
    other = MtaStsRecord("example.org", "abc", "none", (), 60, T0)
    await store.put_mta_sts(second)
    await store.put_mta_sts(other)
    assert await store.get_mta_sts("example.com") == second
    assert await store.get_mta_sts("example.org") == other
    # expired before T0 + 1 day: only example.org's 60-second policy
    assert await store.prune_mta_sts(T0 + timedelta(1)) == 1
    assert await store.get_mta_sts("example.org") is None
    assert await store.get_mta_sts("example.com") == second


async def test_tls_report_counts_add_up_and_one_claim_wins(store: Store) -> None:
    from datetime import date

    from relayd.store.models import TlsSessionCount

    day, next_day = date(2026, 12, 6), date(2026, 12, 7)
    policy = '{"policy-string": ["version: STSv1"], "mx-host": ["*.example.com"]}'

    def count(result: str, mx: str, n: int, on: date = day) -> TlsSessionCount:
        return TlsSessionCount(on, "example.com", "sts", policy, result, mx, "192.0.2.1" if mx else "", n)

    await store.add_tls_sessions([count("", "", 2), count("certificate-expired", "mx1.example.com", 1)])
    await store.add_tls_sessions([count("", "", 3), count("", "", 1, next_day)])
    assert sorted((c.result_type, c.sessions) for c in await store.tls_sessions(day)) == [
        ("", 5),
        ("certificate-expired", 1),
    ]
    assert await store.claim_tls_report(day, "example.com") is True
    assert await store.claim_tls_report(day, "example.com") is False
    assert await store.claim_tls_report(next_day, "example.com") is True
    assert await store.prune_tls_sessions(next_day) == 2
    assert await store.tls_sessions(day) == []
    assert [c.sessions for c in await store.tls_sessions(next_day)] == [1]
