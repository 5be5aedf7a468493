"""Disk full: new mail is refused with 4xx (452 4.3.1 when the queue knows), nothing is half-written, relayd
recovers by itself when space returns, and both SQLite databases pass ``PRAGMA integrity_check``.

The queue and the store live on a real tmpfs of a few megabytes (tests/endurance/disk.py says why not fault
injection); a balloon file fills it. Needs root to mount; without it these tests fail, they never skip.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from relayd.core.tokens import new_queue_id
from relayd.queue.store import InsufficientStorage, NewMessage, QueueStore
from tests.endurance.disk import SmallDisk, unavailable
from tests.harness import Relayd, Sink, message, wait_until

DISK_SIZE = 16 << 20
BIG_BODY = ("x" * 76 + "\r\n") * 13_000  # ~1 MB: more than a WAL file can absorb in blocks it already has


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[SmallDisk]:
    reason = unavailable()
    if reason is not None:
        pytest.fail(f"disk-full tests need a small filesystem: {reason}", pytrace=False)
    with SmallDisk(tmp_path / "var", DISK_SIZE) as d:
        yield d


def relayd_on(disk: SmallDisk, tmp: Path, sink: Sink, *, store_on_disk: bool = True, **config: str) -> Relayd:
    """A relayd whose queue (and store, unless told otherwise) is on ``disk``; config and log are not."""
    relayd = Relayd(tmp, routes={"example.test": sink.port}, **config)
    text = relayd.config.read_text().replace(f'"{tmp}/queue"', f'"{disk.path}/queue"')
    if store_on_disk:
        text = text.replace(f'"{tmp}/relayd.db"', f'"{disk.path}/relayd.db"')
    relayd.config.write_text(text)
    return relayd


def integrity(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def queue_ids(db: Path) -> set[str]:
    """Message ids in the queue; asserts every message has its recipients and every recipient its message."""
    conn = sqlite3.connect(db)
    try:
        orphans = conn.execute(
            "SELECT COUNT(*) FROM messages m "
            "WHERE NOT EXISTS (SELECT 1 FROM recipients r WHERE r.msg_id = m.id)"
        ).fetchone()[0]
        strays = conn.execute(
            "SELECT COUNT(*) FROM recipients r "
            "WHERE NOT EXISTS (SELECT 1 FROM messages m WHERE m.id = r.msg_id)"
        ).fetchone()[0]
        assert (orphans, strays) == (0, 0), "half-written message in the queue"
        return {row[0] for row in conn.execute("SELECT id FROM messages")}
    finally:
        conn.close()


def delivered_subjects(sink: Sink) -> set[str]:
    out = set()
    for m in sink.messages:
        for line in m.data.split(b"\r\n"):
            if line.startswith(b"Subject: "):
                out.add(line[9:].decode())
                break
    return out


def queued_as(reply: tuple[int, bytes]) -> str:
    assert reply[0] == 250, reply
    return reply[1].decode().rsplit(" ", 1)[1]


def test_below_min_free_space_new_mail_gets_452_and_comes_back_by_itself(
    disk: SmallDisk, tmp_path: Path, sink: Sink
) -> None:
    relayd = relayd_on(disk, tmp_path, sink, queue_extra='min_free_space = "4MB"')
    with relayd:
        first = queued_as(relayd.submit(message("before"), to=["a@example.test"]))
        disk.fill(
            leave=3 << 20
        )  # under the 4 MB kept back, with room for the store and the queue's own writes
        for i in range(3):
            code, text = relayd.submit(message(f"refused-{i}"), to=[f"r{i}@example.test"])
            assert (code, text) == (452, b"4.3.1 Insufficient system storage")
        assert relayd.proc is not None and relayd.proc.poll() is None
        disk.drain()
        after = queued_as(relayd.submit(message("after"), to=["b@example.test"]))  # no restart needed
        assert wait_until(lambda: {"before", "after"} <= delivered_subjects(sink))
        assert relayd.stop() == 0
    assert not any(s.startswith("refused") for s in delivered_subjects(sink))
    assert queue_ids(disk.path / "queue" / "queue.db") == {first, after}
    assert integrity(disk.path / "queue" / "queue.db") == "ok"
    assert integrity(disk.path / "relayd.db") == "ok"


def test_enospc_in_the_queue_is_452_too(disk: SmallDisk, tmp_path: Path, sink: Sink) -> None:
    """No space check (min_free_space = 0): the queue's own write hits ENOSPC; the store is elsewhere."""
    relayd = relayd_on(disk, tmp_path, sink, store_on_disk=False, queue_extra='min_free_space = "0"')
    with relayd:
        first = queued_as(relayd.submit(message("before"), to=["a@example.test"]))
        assert wait_until(lambda: "before" in delivered_subjects(sink))
        disk.fill(leave=0)
        replies = [relayd.submit(message(f"full-{i}", BIG_BODY), to=[f"f{i}@example.test"]) for i in range(3)]
        assert all(r == (452, b"4.3.1 Insufficient system storage") for r in replies), replies
        disk.drain()
        after = queued_as(relayd.submit(message("after", BIG_BODY), to=["b@example.test"]))
        assert wait_until(lambda: "after" in delivered_subjects(sink))
        assert relayd.stop() == 0
    assert queue_ids(disk.path / "queue" / "queue.db") == {first, after}
    assert integrity(disk.path / "queue" / "queue.db") == "ok"


def test_completely_full_disk_kill_9_and_restart_while_full(
    disk: SmallDisk, tmp_path: Path, sink: Sink
) -> None:
    """Queue and store on a disk with not one free block: every submission is a 4xx (451 from the store's
    write at acceptance, 452 from the queue), relayd survives kill -9 and restarts while the disk is still
    full, and everything it said 250 to is delivered once space returns."""
    relayd = relayd_on(disk, tmp_path, sink, queue_extra='min_free_space = "0"')
    accepted: dict[str, str] = {}
    with relayd:
        for i in range(5):
            accepted[f"before-{i}"] = queued_as(
                relayd.submit(message(f"before-{i}"), to=[f"a{i}@example.test"])
            )
        disk.fill(leave=0)
        refused = []
        for i in range(4):
            reply = relayd.submit(message(f"full-{i}", BIG_BODY), to=[f"f{i}@example.test"])
            if reply[0] == 250:  # fitted into blocks the databases already had: fine, it must be delivered
                accepted[f"full-{i}"] = queued_as(reply)
            else:
                assert reply[0] in (451, 452), reply
                refused.append(f"full-{i}")
        assert refused, "a completely full disk refused nothing"
        relayd.kill()
        relayd.start()  # still full: relayd must come up and keep answering 4xx, not crash
        code, _ = relayd.submit(message("full-again", BIG_BODY), to=["g@example.test"])
        assert code in (451, 452)
        refused.append("full-again")
        assert relayd.proc is not None and relayd.proc.poll() is None
        disk.drain()
        accepted["after"] = queued_as(relayd.submit(message("after"), to=["b@example.test"]))
        assert wait_until(lambda: set(accepted) <= delivered_subjects(sink), timeout=30), sorted(
            set(accepted) - delivered_subjects(sink)
        )
        assert relayd.stop() == 0
    assert not set(refused) & delivered_subjects(sink)
    assert queue_ids(disk.path / "queue" / "queue.db") == set(accepted.values())
    assert integrity(disk.path / "queue" / "queue.db") == "ok"
    assert integrity(disk.path / "relayd.db") == "ok"


async def test_queue_store_maps_sqlite_full_to_insufficient_storage(disk: SmallDisk) -> None:
    store = QueueStore(disk.path / "queue" / "queue.db")
    await store.open()
    try:

        def msg(size: int) -> NewMessage:
            return NewMessage(new_queue_id(), "acme", "a@acme.example.test", ("b@example.test",), b"x" * size)

        await store.enqueue(msg(100))
        disk.fill(leave=0)
        refused = 0
        for _ in range(20):  # the WAL may absorb a few before it has to grow
            try:
                await store.enqueue(msg(256 << 10))
            except InsufficientStorage:
                refused += 1
                break
        assert refused
        disk.fill(leave=1 << 20)
        with pytest.raises(InsufficientStorage):  # the space check refuses before writing anything
            await store.enqueue(msg(100), min_free=2 << 20)
        disk.drain()
        await store.enqueue(msg(100), min_free=2 << 20)  # and the store recovers without reopening
        assert (await store.counts())["queued"] >= 2
    finally:
        await store.close()
    assert integrity(disk.path / "queue" / "queue.db") == "ok"
