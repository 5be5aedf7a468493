"""relayd.store.sqlitewriter and relayd.store.sqlitelock: jobs waiting together commit together; a failing
job is rolled
back alone; a failed transaction fails every job in it; stop() commits what was given first; waiting for
another connection's write lock lets the event loop go on. On real SQLite files."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from relayd.store.sqlitelock import write_lock
from relayd.store.sqlitewriter import JobRefused, SqliteWriter


class Refused(Exception):
    pass


def _error(exc: Exception) -> Refused:
    return Refused(str(exc))


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE IF NOT EXISTS t (v TEXT PRIMARY KEY)")
    db.execute("PRAGMA busy_timeout = 0")
    return db


def _rows(path: Path) -> list[str]:
    with sqlite3.connect(path) as db:
        return [v for (v,) in db.execute("SELECT v FROM t ORDER BY v")]


def _insert(value: str) -> Callable[[sqlite3.Connection], int]:
    def job(db: sqlite3.Connection) -> int:
        return db.execute("INSERT INTO t VALUES (?)", (value,)).rowcount

    return job


@pytest.fixture
async def writer(tmp_path: Path) -> AsyncIterator[SqliteWriter]:
    db = _connect(tmp_path / "w.db")
    w = SqliteWriter("test-writer", db, error=_error, lock_timeout=0.3)
    w.start()
    yield w
    await w.stop()
    db.close()


async def test_jobs_return_their_values_once_committed(writer: SqliteWriter, tmp_path: Path) -> None:
    counts = await asyncio.gather(*(writer.run(_insert(f"v{i}")) for i in range(50)))
    assert counts == [1] * 50
    assert len(_rows(tmp_path / "w.db")) == 50


async def test_jobs_given_together_share_one_transaction(tmp_path: Path) -> None:
    db = _connect(tmp_path / "w.db")
    statements: list[str] = []
    db.set_trace_callback(statements.append)
    w = SqliteWriter("test-writer", db, error=_error)
    w.start()
    try:
        await asyncio.gather(*(w.run(_insert(f"v{i}")) for i in range(5)))
    finally:
        await w.stop()
        db.close()
    assert statements.count("BEGIN IMMEDIATE") == 1 and statements.count("COMMIT") == 1
    assert len(_rows(tmp_path / "w.db")) == 5


async def test_a_failing_job_is_rolled_back_alone(writer: SqliteWriter, tmp_path: Path) -> None:
    def half_then_fail(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO t VALUES ('half')")
        raise ValueError("boom")

    outcomes = await asyncio.gather(
        writer.run(_insert("a")),
        writer.run(half_then_fail),
        writer.run(_insert("b")),
        writer.run(_insert("a")),  # a duplicate key
        return_exceptions=True,
    )
    assert outcomes[0] == 1 and outcomes[2] == 1
    assert isinstance(outcomes[1], Refused) and "boom" in str(outcomes[1])
    assert isinstance(outcomes[3], Refused) and "UNIQUE" in str(outcomes[3])
    assert _rows(tmp_path / "w.db") == ["a", "b"]


async def test_a_job_that_refuses_is_rolled_back_alone_and_its_caller_gets_its_exception_as_is(
    writer: SqliteWriter, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A refusal (relayd.store.sqlite.sends: a send cap used since it was checked) is the job's decision,
    not the store failing: not wrapped by ``error`` (its caller tells it apart), not logged as a failure."""

    class Full(JobRefused):
        pass

    refusal = Full("cap used meanwhile")

    def half_then_refuse(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO t VALUES ('half')")
        raise refusal

    outcomes = await asyncio.gather(
        writer.run(_insert("a")),
        writer.run(half_then_refuse),
        writer.run(_insert("b")),
        return_exceptions=True,
    )
    assert outcomes[0] == 1 and outcomes[2] == 1
    assert outcomes[1] is refusal
    assert _rows(tmp_path / "w.db") == ["a", "b"]
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


async def test_a_failed_transaction_fails_every_job_and_the_writer_goes_on(
    writer: SqliteWriter, tmp_path: Path
) -> None:
    other = sqlite3.connect(tmp_path / "w.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock past lock_timeout
    try:
        outcomes = await asyncio.gather(
            writer.run(_insert("x")),
            writer.run(_insert("y")),
            return_exceptions=True,
        )
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert all(isinstance(o, Refused) and "locked" in str(o) for o in outcomes), outcomes
    assert await writer.run(_insert("z")) == 1
    assert _rows(tmp_path / "w.db") == ["z"]


async def test_stop_commits_what_was_given_and_later_jobs_are_refused(
    writer: SqliteWriter, tmp_path: Path
) -> None:
    pending = [asyncio.ensure_future(writer.run(_insert(f"p{i}"))) for i in range(20)]
    await asyncio.sleep(0)
    await writer.stop()
    assert [await p for p in pending] == [1] * 20
    assert len(_rows(tmp_path / "w.db")) == 20
    with pytest.raises(Refused, match="not running"):
        await writer.run(_insert("late"))


# --- a write that must follow another (after=) --------------------------------------------------------


@pytest.fixture
async def two_writers(tmp_path: Path) -> AsyncIterator[tuple[SqliteWriter, SqliteWriter]]:
    """A first writer (the sent ledger's, in relayd) and a second (the queue's) on files of their own."""
    dbs = [_connect(tmp_path / "first.db"), _connect(tmp_path / "second.db")]
    writers = (
        SqliteWriter("first", dbs[0], error=_error, lock_timeout=0.3),
        SqliteWriter("second", dbs[1], error=_error, lock_timeout=0.3),
    )
    for w in writers:
        w.start()
    yield writers
    for w in writers:
        await w.stop()
    for db in dbs:
        db.close()


async def test_a_write_given_after_another_commits_behind_it_in_the_same_turn(
    two_writers: tuple[SqliteWriter, SqliteWriter], tmp_path: Path
) -> None:
    first, second = two_writers
    seen: list[bool] = []

    def behind(db: sqlite3.Connection) -> int:
        seen.append(ledger.done() and _rows(tmp_path / "first.db") == ["ledger"])  # committed, not pending
        return db.execute("INSERT INTO t VALUES ('queued')").rowcount

    ledger = first.submit(_insert("ledger"))
    queued = second.submit(behind, after=ledger)
    await asyncio.sleep(0)  # one turn of the loop: both writers run in it, the first one first
    assert ledger.done() and queued.done()
    assert seen == [True] and await queued == 1
    assert _rows(tmp_path / "second.db") == ["queued"]


async def test_a_write_whose_prerequisite_failed_fails_with_its_error_and_writes_nothing(
    two_writers: tuple[SqliteWriter, SqliteWriter], tmp_path: Path
) -> None:
    first, second = two_writers
    await first.run(_insert("dup"))
    ledger = first.submit(_insert("dup"))  # fails: a duplicate key
    outcomes = await asyncio.gather(
        second.run(_insert("queued"), after=ledger),
        second.run(_insert("other")),  # in the same batch, with no prerequisite: committed
        return_exceptions=True,
    )
    assert isinstance(outcomes[0], Refused) and outcomes[0] is ledger.exception()
    assert outcomes[1] == 1
    assert _rows(tmp_path / "second.db") == ["other"]


def _parked(writer: SqliteWriter) -> tuple[asyncio.Future[None], asyncio.Future[int]]:
    """A prerequisite not done yet, and a write of "parked" given ``after`` it."""
    prerequisite: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    return prerequisite, asyncio.ensure_future(writer.run(_insert("parked"), after=prerequisite))


async def test_a_write_waiting_for_its_prerequisite_holds_up_neither_the_lock_nor_other_writes(
    two_writers: tuple[SqliteWriter, SqliteWriter], tmp_path: Path
) -> None:
    prerequisite, parked = _parked(two_writers[1])
    assert await two_writers[1].run(_insert("other")) == 1  # not behind the parked one
    other = sqlite3.connect(tmp_path / "second.db", isolation_level=None, timeout=0)
    try:
        other.execute("BEGIN IMMEDIATE")  # the write lock is free: nobody holds it while waiting
        other.execute("ROLLBACK")
    finally:
        other.close()
    assert not parked.done()
    prerequisite.set_result(None)
    assert await parked == 1
    assert _rows(tmp_path / "second.db") == ["other", "parked"]


async def test_stop_commits_a_parked_write_once_its_prerequisite_is_done(
    two_writers: tuple[SqliteWriter, SqliteWriter], tmp_path: Path
) -> None:
    prerequisite, parked = _parked(two_writers[1])
    await asyncio.sleep(0)
    stopping = asyncio.ensure_future(two_writers[1].stop())
    await asyncio.sleep(0.05)
    assert not stopping.done()  # the writer waits for the parked job, not forgets it
    prerequisite.set_result(None)
    await stopping
    assert await parked == 1
    assert _rows(tmp_path / "second.db") == ["parked"]


# --- the write lock --------------------------------------------------------------------------------------


def _conn(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0)
    db.execute("PRAGMA journal_mode=WAL")
    return db


async def test_write_lock_is_taken_soon_after_another_connection_frees_it_and_the_loop_goes_on(
    tmp_path: Path,
) -> None:
    path = tmp_path / "lock.db"
    holder, waiter = _conn(path), _conn(path)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN IMMEDIATE")
    freed_at: list[float] = []
    ticks = 0

    def free_later() -> None:
        time.sleep(0.3)
        holder.execute("INSERT INTO t VALUES (1)")
        freed_at.append(time.monotonic())
        holder.execute("COMMIT")

    async def tick() -> None:  # another session of the same loop
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    thread = threading.Thread(target=free_later)
    thread.start()
    await write_lock(waiter, timeout=5.0)  # waits while the other connection holds it
    got_at = time.monotonic()
    ticker.cancel()
    thread.join()
    assert waiter.in_transaction
    assert waiter.execute("SELECT COUNT(*) FROM t").fetchone() == (1,)  # it ran after the other commit
    assert got_at >= freed_at[0]
    assert ticks >= 10  # the loop ran other work for the 0.3 s the lock was held
    waiter.execute("COMMIT")


async def test_write_lock_held_briefly_is_waited_for_without_a_turn_of_the_loop(tmp_path: Path) -> None:
    """Under load a turn of the loop is several ms; a lock held for less than ``spin`` is waited for on the
    spot. (``spin`` is a second here, so a slow machine can't make the thread miss it; 2 ms by default.)"""
    path = tmp_path / "lock.db"
    holder, waiter = _conn(path), _conn(path)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN IMMEDIATE")
    freed_at: list[float] = []

    def free_later() -> None:
        time.sleep(0.05)
        holder.execute("INSERT INTO t VALUES (1)")
        freed_at.append(time.monotonic())
        holder.execute("COMMIT")

    turned: list[int] = []
    asyncio.get_running_loop().call_soon(turned.append, 1)
    thread = threading.Thread(target=free_later)
    thread.start()
    await write_lock(waiter, timeout=5.0, spin=1.0)
    got_at = time.monotonic()
    assert turned == []  # nothing else ran on the loop meanwhile
    thread.join()
    assert waiter.in_transaction
    assert waiter.execute("SELECT COUNT(*) FROM t").fetchone() == (1,)
    assert got_at >= freed_at[0]
    waiter.execute("COMMIT")


async def test_write_lock_gives_up_with_the_busy_error_after_its_timeout(tmp_path: Path) -> None:
    path = tmp_path / "lock.db"
    holder, waiter = _conn(path), _conn(path)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            await write_lock(waiter, timeout=0.2)
        assert not waiter.in_transaction
    finally:
        holder.execute("ROLLBACK")


async def test_a_writer_cancelled_while_waiting_for_the_lock_leaves_nobody_waiting(tmp_path: Path) -> None:
    db = _connect(tmp_path / "w.db")
    w = SqliteWriter("test-writer", db, error=_error, lock_timeout=30)
    w.start()
    other = sqlite3.connect(tmp_path / "w.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        jobs = [asyncio.ensure_future(w.run(_insert(f"c{i}"))) for i in range(3)]
        await asyncio.sleep(0.05)  # the writer holds the first and waits for the lock
        assert w._task is not None
        w._task.cancel()
        outcomes = await asyncio.wait_for(asyncio.gather(*jobs, return_exceptions=True), 5)
    finally:
        other.execute("ROLLBACK")
        other.close()
        db.close()
    assert all(isinstance(o, asyncio.CancelledError) for o in outcomes), outcomes
    assert _rows(tmp_path / "w.db") == []
