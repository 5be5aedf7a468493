"""PostgreSQL store across nodes: what the contract suite cannot show with one store object.

Two ``PostgresStore`` objects on one schema have two pools, so they stand in for two relayd nodes. The
outage tests put a TCP proxy between the store and PostgreSQL and cut it, rather than stopping the
cluster, which other test runs on the machine may be using; a second test terminates the server
backends with ``pg_terminate_backend``, as a server restart or a failover does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from relayd.store import (
    CHANNEL_ACCOUNT,
    CHANNEL_SUPPRESSION,
    Event,
    Reason,
    Scope,
    SentRecord,
    SqliteStore,
    StoreError,
    SuppressionEntry,
    SuspendReason,
)
from relayd.store.migrations import LATEST_VERSION
from relayd.store.models import ConsentRecord
from relayd.store.postgresql import PostgresStore
from relayd.store.transfer import export_store, import_store

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
DAY = 86_400


def _schema(request: pytest.FixtureRequest) -> str:
    return "n_" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:16]


def _entry(address: str) -> SuppressionEntry:
    return SuppressionEntry(address, Scope.GLOBAL, None, None, Reason.HARD_BOUNCE, "test", T0)


@pytest.fixture
async def nodes(
    pg_dsn: str, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two nodes on one schema of the test database."""
    a = PostgresStore(pg_dsn, schema=_schema(request))
    b = PostgresStore(pg_dsn, schema=_schema(request))
    await a.open()
    await b.open()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def _wait_for(predicate: Callable[[], bool], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


# -- concurrency across nodes ---------------------------------------------------------------------------


async def test_reserve_day_cap_of_one_across_nodes(nodes: tuple[PostgresStore, PostgresStore]) -> None:
    """50 reservations on each node at once for one recipient on a day=1 list: exactly one wins."""
    a, b = nodes
    results = await asyncio.gather(
        *[s.reserve_sends("acme", "news", ["hot@x.test"], T0, {DAY: 1}) for _ in range(50) for s in (a, b)]
    )
    assert sum(1 for r in results if r == {"hot@x.test"}) == 1
    assert sum(1 for r in results if r == set()) == 99
    assert await b.count_sends("acme", "news", ["hot@x.test"], T0) == {"hot@x.test": 1}


async def test_overlapping_reservations_across_nodes_do_not_deadlock(
    nodes: tuple[PostgresStore, PostgresStore],
) -> None:
    """Batches sharing recipients in opposite orders: the address locks are taken in one global order."""
    a, b = nodes
    addresses = [f"r{i}@x.test" for i in range(20)]
    caps = {DAY: 1000}
    calls = []
    for i in range(40):
        forward = addresses[i % 5 :] + addresses[: i % 5]
        calls.append(a.reserve_sends("acme", "news", forward, T0, caps))
        calls.append(b.reserve_sends("acme", "news", forward[::-1], T0, caps))
    results = await asyncio.gather(*calls)
    assert all(r == set(addresses) for r in results)
    assert await a.count_sends("acme", "news", addresses, T0) == dict.fromkeys(addresses, 80)


async def test_event_ids_follow_commit_order_across_nodes(
    nodes: tuple[PostgresStore, PostgresStore],
) -> None:
    """A webhook dispatcher tailing by id never skips an event that another node commits later.

    Without the events lock this fails about every other run (ids drawn 7 by one node, 8 by the other,
    8 committed first: the tail moves past 7 before it is visible).
    """
    a, b = nodes
    seen: list[int] = []
    writers_done = asyncio.Event()

    async def tail() -> None:
        after = 0
        while True:
            finished = writers_done.is_set()  # read before the poll: a last poll after the writers ended
            batch = await a.events_after(after, "acme", 37)
            for i, _ in batch:
                seen.append(i)
                after = i
            if finished and not batch:
                return

    reader = asyncio.create_task(tail())
    await asyncio.gather(
        *[s.record_event(Event(T0, "delivered", "acme")) for _ in range(150) for s in (a, b)],
        a.record_events(Event(T0, "deferred", "acme") for _ in range(50)),
        b.record_events(Event(T0, "bounced", "acme") for _ in range(50)),
    )
    writers_done.set()
    await asyncio.wait_for(reader, timeout=20)
    everything = [i for i, _ in await b.events_after(0, "acme", 10_000)]
    assert len(everything) == 400
    assert seen == everything


async def test_concurrent_open_migrates_once(pg_dsn: str, request: pytest.FixtureRequest) -> None:
    """Nodes starting together: the advisory lock lets one migrate, the others find the schema current."""
    stores = [PostgresStore(pg_dsn, schema=_schema(request)) for _ in range(4)]
    try:
        await asyncio.gather(*[s.open() for s in stores])
        assert [await s.migrate() for s in stores] == [LATEST_VERSION] * 4
    finally:
        for s in stores:
            await s.close()
    conn = await asyncpg.connect(pg_dsn)
    try:
        versions = await conn.fetch(f"SELECT version FROM {_schema(request)}.schema_migrations ORDER BY 1")
    finally:
        await conn.close()
    assert [v[0] for v in versions] == list(range(1, LATEST_VERSION + 1))


# -- change propagation ---------------------------------------------------------------------------------


async def test_notify_reaches_the_other_node_within_a_second(
    nodes: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = nodes
    got: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    def on_suppression(channel: str, payload: str) -> None:
        got.put_nowait((channel, payload))

    async def on_account(channel: str, payload: str) -> None:  # coroutine callbacks work too
        await got.put((channel, payload))

    await b.subscribe(CHANNEL_SUPPRESSION, on_suppression)
    await b.subscribe(CHANNEL_ACCOUNT, on_account)

    await a.add([_entry("gone@x.test")])
    assert await asyncio.wait_for(got.get(), 1.0) == (CHANNEL_SUPPRESSION, "gone@x.test")
    assert await b.check(["gone@x.test"], "acme", None, now=T0) != {}
    await a.add([_entry("one@x.test"), _entry("two@x.test")])
    assert await asyncio.wait_for(got.get(), 1.0) == (CHANNEL_SUPPRESSION, "")  # several: refresh all
    assert await a.remove("gone@x.test") == 1
    assert await asyncio.wait_for(got.get(), 1.0) == (CHANNEL_SUPPRESSION, "gone@x.test")
    assert await a.remove("gone@x.test") == 0  # nothing changed, nothing sent

    await a.suspend("acme", SuspendReason.MANUAL)
    assert await asyncio.wait_for(got.get(), 1.0) == (CHANNEL_ACCOUNT, "acme")
    state = await b.get_account_state("acme")
    assert state is not None and state.suspended
    await a.reinstate("acme")
    assert await asyncio.wait_for(got.get(), 1.0) == (CHANNEL_ACCOUNT, "acme")
    await a.reinstate("acme")  # already reinstated: no change, no notification
    await b.unsubscribe(CHANNEL_SUPPRESSION, on_suppression)
    await a.add([_entry("late@x.test")])
    await a.suspend("beta", SuspendReason.MANUAL)
    assert await asyncio.wait_for(got.get(), 1.0) == (CHANNEL_ACCOUNT, "beta")
    assert got.empty()


async def test_notification_is_sent_only_on_commit(nodes: tuple[PostgresStore, PostgresStore]) -> None:
    a, b = nodes
    got: list[str] = []
    await b.subscribe(CHANNEL_SUPPRESSION, lambda _c, payload: got.append(payload))
    with pytest.raises(StoreError):  # the insert violates the scope check: the transaction rolls back
        async with a._transaction(durable=True) as conn:
            await a._notify(conn, CHANNEL_SUPPRESSION, "never@x.test")
            await conn.execute(
                "INSERT INTO suppression (address, scope, reason, created_at) VALUES ('x', 'bad', 'm', 0)"
            )
    await a.add([_entry("real@x.test")])
    await _wait_for(lambda: bool(got), 1.0)
    assert got == ["real@x.test"]


# -- failures and recovery ------------------------------------------------------------------------------


class _Proxy:
    """A TCP relay to PostgreSQL that the test can cut (connections reset, port refused) and restore."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.add(up_writer)
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                w.transport.abort()
                self._writers.discard(w)
            self._tasks.discard(task)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()


def _via(dsn: str, port: int) -> str:
    parts = urllib.parse.urlsplit(dsn)
    userinfo = parts.netloc.rpartition("@")[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{userinfo}@127.0.0.1:{port}"))


async def test_unreachable_database_raises_store_error_then_recovers(
    pg_dsn: str, request: pytest.FixtureRequest
) -> None:
    parts = urllib.parse.urlsplit(pg_dsn)
    proxy = _Proxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    await proxy.start()
    dsn = _via(pg_dsn, proxy.port)
    store = PostgresStore(dsn, schema=_schema(request), connect_timeout=2.0, command_timeout=2.0)
    other = PostgresStore(pg_dsn, schema=_schema(request))
    await store.open()
    await other.open()
    notes: list[tuple[str, str]] = []
    await store.subscribe(CHANNEL_SUPPRESSION, lambda c, p: notes.append((c, p)))
    try:
        await store.add([_entry("before@x.test")])
        await proxy.stop()  # the server "goes away": every connection reset, new ones refused

        loop = asyncio.get_running_loop()
        started = loop.time()
        attempts: list[Callable[[], Awaitable[object]]] = [
            lambda: store.check(["before@x.test"], "acme", None, now=T0),
            lambda: store.add([_entry("during@x.test")]),
            lambda: store.record_event(Event(T0, "delivered", "acme")),
            lambda: store.reserve_sends("acme", "news", ["x@x.test"], T0, {DAY: 1}),
            lambda: store.suspend("acme", SuspendReason.MANUAL),
            lambda: store.max_event_id(),
        ]
        for attempt in attempts:
            with pytest.raises(StoreError) as info:
                await attempt()
            assert "relayd_test:***@127.0.0.1" in str(info.value)  # the password is masked
        assert loop.time() - started < 5  # refused at once, not after timeouts
        with pytest.raises(StoreError):
            await PostgresStore(dsn, schema=_schema(request), connect_timeout=2.0).open()

        await other.add([_entry("meanwhile@x.test")])  # a notification this node misses
        await proxy.start()  # same port: the server is back
        assert set(await store.check(["before@x.test", "meanwhile@x.test"], "acme", None, now=T0)) == {
            "before@x.test",
            "meanwhile@x.test",
        }
        await store.record_event(Event(T0, "delivered", "acme"))
        assert await store.max_event_id() >= 1
        # The listener reconnected by itself and asked its subscribers to refresh everything ...
        await _wait_for(lambda: (CHANNEL_SUPPRESSION, "") in notes, 10.0)
        # ... and hears other nodes again.
        await other.add([_entry("after@x.test")])
        await _wait_for(lambda: (CHANNEL_SUPPRESSION, "after@x.test") in notes, 1.0)
    finally:
        await store.close()
        await other.close()
        if proxy._server is not None:
            await proxy.stop()


async def test_terminated_backends_are_replaced(
    nodes: tuple[PostgresStore, PostgresStore], pg_dsn: str
) -> None:
    """After pg_terminate_backend (a restart, a failover), reads and writes go on without a StoreError:
    a read, or a write whose BEGIN failed, is retried once on a fresh connection."""
    a, b = nodes
    notes: list[str] = []
    await a.subscribe(CHANNEL_ACCOUNT, lambda _c, payload: notes.append(payload))
    await a.add([_entry("t@x.test")])
    await a.record_event(Event(T0, "delivered", "acme"))
    killer = await asyncpg.connect(pg_dsn)
    try:
        killed = await killer.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'relayd' AND pid <> pg_backend_pid()"
        )
        assert killed >= 3  # a's pool, a's listener, b's pool
        assert set(await a.check(["t@x.test"], "acme", None, now=T0)) == {"t@x.test"}
        await b.add([_entry("u@x.test")])
        await a.record_event(Event(T0, "delivered", "acme"))
        assert await b.reserve_sends("acme", "news", ["x@x.test"], T0, {DAY: 1}) == {"x@x.test"}
        await _wait_for(lambda: "" in notes, 10.0)  # the listener came back and said "refresh"
        await b.suspend("acme", SuspendReason.MANUAL)
        await _wait_for(lambda: "acme" in notes, 1.0)
    finally:
        await killer.close()


async def test_query_errors_and_closed_store_raise_store_error(
    nodes: tuple[PostgresStore, PostgresStore], pg_dsn: str, request: pytest.FixtureRequest
) -> None:
    a, b = nodes
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(f"DROP TABLE {_schema(request)}.send_log")
    finally:
        await conn.close()
    with pytest.raises(StoreError) as info:
        await a.count_sends("acme", None, ["x@x.test"], T0)
    assert isinstance(info.value.__cause__, asyncpg.UndefinedTableError)
    with pytest.raises(StoreError):
        await a.reserve_sends("acme", None, ["x@x.test"], T0, {DAY: 1})
    await b.close()
    with pytest.raises(StoreError):
        await b.count()
    with pytest.raises(StoreError):
        await asyncio.wait_for(b.record_event(Event(T0, "delivered")), timeout=5)
    with pytest.raises(StoreError):
        await b.subscribe(CHANNEL_ACCOUNT, lambda _c, _p: None)
    assert await a.count() == 0  # the other node is unaffected
    later = T0 + timedelta(days=1)
    assert await a.events(later) == []


# -- consent and the move from SQLite (not in the contract suite yet) -----------------------------------


async def test_consent_records_and_optin_reservation_across_nodes(
    nodes: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = nodes
    rec = ConsentRecord("acme", "news", "c@x.test", T0, "192.0.2.1", None, "double-opt-in", '{"q": "Q1"}')
    assert await a.add_consent([rec, ConsentRecord("acme", "news", "c@x.test", T0, "", "UA", "csv:x")]) == 2
    assert await b.get_consent("acme", "news", "c@x.test") == ConsentRecord(
        "acme", "news", "c@x.test", T0, "", "UA", "csv:x"
    )  # the last of one key wins
    await a.add_consent(
        [rec]
        + [ConsentRecord("acme", ln, f"{i}@x.test", T0, "", None, "s") for i in range(5) for ln in ("a", "b")]
    )
    assert await b.has_consent("acme", "news", ["c@x.test", "0@x.test", "c@x.test"]) == {"c@x.test"}
    batches = [batch async for batch in b.consents(account="acme", batch_size=4)]
    assert [len(x) for x in batches] == [4, 4, 3]
    flat = [(r.list, r.address) for x in batches for r in x]
    assert flat == sorted(flat)
    assert [r.address async for x in b.consents(list_name="news") for r in x] == ["c@x.test"]
    assert [len(x) async for x in b.consents(address="1@x.test")] == [2]

    results = await asyncio.gather(
        *[s.reserve_optin("acme", "news", ["new@x.test"], T0, DAY) for _ in range(25) for s in (a, b)]
    )
    assert sum(len(r) for r in results) == 1  # one confirmation mail, whichever node asked first
    assert (
        await a.reserve_optin("acme", "news", ["new@x.test"], T0 + timedelta(seconds=DAY - 1), DAY) == set()
    )
    assert await b.reserve_optin("acme", "news", ["new@x.test"], T0 + timedelta(seconds=DAY), DAY) == {
        "new@x.test"
    }
    assert await a.prune_optin(T0 + timedelta(days=2)) == 1


async def test_move_from_sqlite_to_postgresql(
    nodes: tuple[PostgresStore, PostgresStore], tmp_path: Path
) -> None:
    """`relayd store export` on SQLite then `import` on PostgreSQL (README "Scaling out") keeps everything."""
    pg, _ = nodes
    src = SqliteStore(tmp_path / "old.db")
    await src.open()
    try:
        await src.add([_entry(f"g{i}@x.test") for i in range(3000)])
        await src.suspend("acme", SuspendReason.COMPLAINT_RATE, "0.3 %", at=T0)
        await src.record_events(
            [Event(T0, "complaint", "acme", None, "c@x.test", "abuse", f"q{i}") for i in range(5)]
        )
        await src.record_sent([SentRecord(f"q{i:015d}", 0, "acme", "news", "u@x.test", T0) for i in range(5)])
        await src.add_consent(
            [ConsentRecord("acme", "news", "u@x.test", T0, "192.0.2.1", "UA", "double-opt-in")]
        )
        buf = io.StringIO()
        exported = await export_store(src, buf)
    finally:
        await src.close()
    imported = await import_store(pg, buf.getvalue().splitlines())
    assert imported.errors == [] and imported.counts == exported.counts
    assert await pg.count() == 3000
    assert [e.queue_id for _, e in await pg.events_after(0, "acme")] == [f"q{i}" for i in range(5)]
    assert await pg.count_sent("acme", T0 - timedelta(days=1)) == 5
    assert await pg.has_consent("acme", "news", ["u@x.test"]) == {"u@x.test"}
    state = await pg.get_account_state("acme")
    assert state is not None and state.suspended


async def test_lock_wait_is_bounded_by_command_timeout(pg_dsn: str, request: pytest.FixtureRequest) -> None:
    """A node stuck holding a lock costs the others a StoreError (451) after command_timeout, not a hang,
    and leaves their connections usable."""
    from relayd.store.postgresql import driver as pg

    store = PostgresStore(pg_dsn, schema=_schema(request), command_timeout=0.5)
    await store.open()
    holder = await asyncpg.connect(pg_dsn)
    try:
        events_key = pg.lock_key(store._schema_name)
        sends_key = pg.lock_key(store._schema_name, "acme", "news", "x@x.test")
        await holder.execute(
            "SELECT pg_advisory_lock($1, $2), pg_advisory_lock($3, $4)",
            pg.LOCK_EVENTS,
            events_key,
            pg.LOCK_SENDS,
            sends_key,
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(StoreError):
            await store.record_event(Event(T0, "delivered", "acme"))
        with pytest.raises(StoreError):
            await store.reserve_sends("acme", "news", ["x@x.test"], T0, {DAY: 1})
        assert loop.time() - started < 3
        await holder.execute("SELECT pg_advisory_unlock_all()")
        await store.record_event(Event(T0, "delivered", "acme"))
        assert await store.reserve_sends("acme", "news", ["x@x.test"], T0, {DAY: 1}) == {"x@x.test"}
        assert len(await store.events(T0)) == 1
    finally:
        await holder.close()
        await store.close()
