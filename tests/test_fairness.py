"""Fair queueing between accounts: one account's backlog never makes another account's mail wait behind it."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

from relayd.queue.shards import shard_path
from relayd.queue.store import NewMessage, QueueStore, StoredData
from tests.harness import Relayd, message, wait_until
from tests.test_shaping import CountingSink, submit_many


def _msg(account: str, i: int, domain: str = "example.test") -> NewMessage:
    return NewMessage(
        queue_id=f"{account}{i:06d}",
        account=account,
        mail_from=f"app@{account}.example.test",
        recipients=(f"{account}{i}@{domain}",),
        data=message(f"{account} {i}", msgid=f"<{account}.{i}@example.test>"),
    )


async def _fill(path: Path, msgs: list[NewMessage]) -> None:
    store = QueueStore(path)
    await store.open()
    try:
        await asyncio.gather(*(store.enqueue(m) for m in msgs))  # concurrent: group commit batches them
    finally:
        await store.close()


async def test_due_interleaves_accounts_whatever_their_backlog(tmp_path: Path) -> None:
    store = QueueStore(tmp_path / "queue.db")
    await store.open()
    try:
        await asyncio.gather(*(store.enqueue(_msg("big", i)) for i in range(500)))
        await asyncio.gather(*(store.enqueue(_msg("small", i)) for i in range(5)))
        rows = await store.due(time.time() + 1, 20)
        assert [r.account for r in rows[:10]] == ["big", "small"] * 5
        assert len(rows) == 25  # 20 of big, all 5 of small
        held = {"big": 20}

        def only_big(account: str) -> int:
            return 3 + held.get(account, 0) if account == "big" else 0

        rows = await store.due(time.time() + 1, 3, per_account=only_big)
        assert {r.account for r in rows} == {"big"} and len(rows) == 23
    finally:
        await store.close()


async def test_queue_of_an_older_relayd_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE messages (id TEXT PRIMARY KEY, account TEXT NOT NULL, mail_from TEXT NOT NULL,
            list_name TEXT, created_at REAL NOT NULL, size INTEGER NOT NULL, data BLOB);
        CREATE TABLE recipients (msg_id TEXT NOT NULL, idx INTEGER NOT NULL, address TEXT NOT NULL,
            state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL NOT NULL,
            updated_at REAL NOT NULL, last_reply TEXT, data BLOB, PRIMARY KEY (msg_id, idx)) WITHOUT ROWID;
        INSERT INTO messages VALUES ('old1', 'acme', 'a@acme.example.test', NULL, 1.0, 3, 'abc');
        INSERT INTO recipients VALUES ('old1', 0, 'x@example.test', 'queued', 0, 1.0, 1.0, NULL, NULL);
        """
    )
    db.commit()
    db.close()
    store = QueueStore(path)
    await store.open()
    try:
        rows = await store.due(time.time(), 10)
        assert [(r.queue_id, r.account) for r in rows] == [("old1", "acme")]
    finally:
        await store.close()


async def test_queue_of_the_first_relayd_without_per_recipient_data_is_migrated(tmp_path: Path) -> None:
    """The first queue schema had no ``recipients.data``: its mail is still delivered after an upgrade."""
    path = tmp_path / "queue.db"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE messages (id TEXT PRIMARY KEY, account TEXT NOT NULL, mail_from TEXT NOT NULL,
            list_name TEXT, created_at REAL NOT NULL, size INTEGER NOT NULL, data BLOB);
        CREATE TABLE recipients (msg_id TEXT NOT NULL, idx INTEGER NOT NULL, address TEXT NOT NULL,
            state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL NOT NULL,
            updated_at REAL NOT NULL, last_reply TEXT, PRIMARY KEY (msg_id, idx)) WITHOUT ROWID;
        INSERT INTO messages VALUES ('first', 'acme', 'a@acme.example.test', NULL, 1.0, 3, X'616263');
        INSERT INTO recipients VALUES ('first', 0, 'x@example.test', 'queued', 0, 1.0, 1.0, NULL);
        """
    )
    db.commit()
    db.close()
    store = QueueStore(path)
    await store.open()
    try:
        [row] = await store.due(time.time(), 10)
        assert (row.queue_id, row.account) == ("first", "acme")
        assert await store.recipient_data("first", 0) == StoredData(b"abc", render=False)
    finally:
        await store.close()


async def test_queue_with_finished_per_recipient_copies_delivers_them_as_they_are(tmp_path: Path) -> None:
    """Before copies were made at delivery, relayd stored each recipient's finished copy in
    ``recipients.data``: after an upgrade those are delivered unchanged, never rendered a second time."""
    path = tmp_path / "queue.db"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE messages (id TEXT PRIMARY KEY, account TEXT NOT NULL, mail_from TEXT NOT NULL,
            list_name TEXT, created_at REAL NOT NULL, size INTEGER NOT NULL, data BLOB);
        CREATE TABLE recipients (msg_id TEXT NOT NULL, idx INTEGER NOT NULL, address TEXT NOT NULL,
            state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL NOT NULL,
            updated_at REAL NOT NULL, last_reply TEXT, data BLOB, account TEXT,
            PRIMARY KEY (msg_id, idx)) WITHOUT ROWID;
        INSERT INTO messages VALUES ('old', 'acme', 'a@acme.example.test', NULL, 1.0, 3, NULL);
        INSERT INTO recipients VALUES ('old', 0, 'x@t.test', 'queued', 0, 1, 1, NULL, X'783021', 'acme');
        INSERT INTO recipients VALUES ('old', 1, 'y@t.test', 'queued', 0, 1, 1, NULL, X'793121', 'acme');
        """
    )
    db.commit()
    db.close()
    store = QueueStore(path)
    await store.open()
    try:
        assert await store.recipient_data("old", 0) == StoredData(b"x0!", render=False)
        assert await store.recipient_data("old", 1) == StoredData(b"y1!", render=False)
        await store.enqueue(
            NewMessage("new", "acme", "a@acme.example.test", ("z@example.test",), b"zz", render=True)
        )
        assert await store.recipient_data("new", 0) == StoredData(b"zz", render=True)
    finally:
        await store.close()


def test_small_account_is_not_stuck_behind_a_big_backlog_to_the_same_destination(tmp_path: Path) -> None:
    relayd = Relayd(tmp_path, routes={"example.test": 0})
    asyncio.run(_fill(shard_path(tmp_path / "queue", 0), [_msg("acme", i) for i in range(5000)]))
    with CountingSink(delay=0.01) as sink:
        # a slow destination: two connections, 10 ms per message -- 5,000 messages take well over 20 s
        relayd.config.write_text(
            relayd.config.read_text().replace('"127.0.0.1:0"', f'"127.0.0.1:{sink.port}"')
            + '\n[shaping.slow]\ndomains = ["example.test"]\nconnections = 2\n'
        )
        with relayd:
            assert wait_until(lambda: sink.delivered() >= 100)  # the backlog is flowing
            queued_at = sink.delivered()
            submit_many(relayd, 10, prefix="small", user="other")  # each is queued and dispatched at once
            assert wait_until(lambda: sum(r.startswith("small") for r in sink.counter.delivered) == 10)
            order = list(sink.counter.delivered)
    positions = [i - queued_at for i, r in enumerate(order) if r.startswith("small")]
    # round-robin with the backlog: every other delivery is one of them (give or take what was in flight)
    assert max(positions) <= 40, positions
    assert len(order) < 1000  # and the backlog was nowhere near done
