"""relayd.committhread: jobs waiting together commit together; a failing job is rolled back alone; a failed
transaction fails every job in it; stop() commits what was given first. On a real SQLite file, both modes."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from relayd.committhread import CommitThread


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


@pytest.fixture(params=[False, True], ids=["thread", "inline"])
async def writer(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[CommitThread]:
    db = _connect(tmp_path / "w.db")
    w = CommitThread("test-writer", db, error=_error, lock_timeout=0.3, inline=request.param)
    w.start()
    yield w
    await w.stop()
    db.close()


async def test_jobs_return_their_values_once_committed(writer: CommitThread, tmp_path: Path) -> None:
    counts = await asyncio.gather(*(writer.run(_insert(f"v{i}")) for i in range(50)))
    assert counts == [1] * 50
    assert len(_rows(tmp_path / "w.db")) == 50


async def test_a_failing_job_is_rolled_back_alone(tmp_path: Path) -> None:
    db = _connect(tmp_path / "w.db")
    w = CommitThread("test-writer", db, error=_error)
    w.start()
    gate = threading.Event()

    def hold(db: sqlite3.Connection) -> None:  # keeps the writer busy until the others are queued
        db.execute("INSERT INTO t VALUES ('first')")
        gate.wait(10)

    def half_then_fail(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO t VALUES ('half')")
        raise ValueError("boom")

    try:
        first = asyncio.ensure_future(w.run(hold))
        await asyncio.sleep(0.05)
        rest = [
            asyncio.ensure_future(w.run(_insert("a"))),
            asyncio.ensure_future(w.run(half_then_fail)),
            asyncio.ensure_future(w.run(_insert("b"))),
            asyncio.ensure_future(w.run(_insert("a"))),  # a duplicate key
        ]
        await asyncio.sleep(0.05)
        gate.set()
        outcomes = await asyncio.gather(first, *rest, return_exceptions=True)
    finally:
        await w.stop()
        db.close()
    assert outcomes[0] is None and outcomes[1] == 1 and outcomes[3] == 1
    assert isinstance(outcomes[2], Refused) and "boom" in str(outcomes[2])
    assert isinstance(outcomes[4], Refused) and "UNIQUE" in str(outcomes[4])
    assert _rows(tmp_path / "w.db") == ["a", "b", "first"]


async def test_a_failed_transaction_fails_every_job_and_the_writer_goes_on(
    writer: CommitThread, tmp_path: Path
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
    writer: CommitThread, tmp_path: Path
) -> None:
    pending = [asyncio.ensure_future(writer.run(_insert(f"p{i}"))) for i in range(20)]
    await asyncio.sleep(0)
    await writer.stop()
    assert [await p for p in pending] == [1] * 20
    assert len(_rows(tmp_path / "w.db")) == 20
    with pytest.raises(Refused, match="not running"):
        await writer.run(_insert("late"))
