"""The queue store on its own, on real files: numbered migrations, operator selections, read models.

No daemon and no network: each test opens a QueueStore (or runs its migration) on a SQLite file in
``tmp_path`` and reads the result back from the file itself, as another process would.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relayd.queue.shards import read_message
from relayd.queue.store import (
    Action,
    Affected,
    MessageRow,
    NewMessage,
    QueueEntry,
    QueueStore,
    RecipientRow,
    Selection,
    State,
    View,
    migrate,
)
from relayd.queue.store.migrations import LATEST_VERSION, MIGRATIONS

#: the queue of the first relayd: no per-recipient data, no account, no holds, no rendering, no classes
FIRST_SCHEMA = """
CREATE TABLE messages (id TEXT PRIMARY KEY, account TEXT NOT NULL, mail_from TEXT NOT NULL,
    list_name TEXT, created_at REAL NOT NULL, size INTEGER NOT NULL, data BLOB);
CREATE TABLE recipients (msg_id TEXT NOT NULL, idx INTEGER NOT NULL, address TEXT NOT NULL,
    state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL NOT NULL,
    updated_at REAL NOT NULL, last_reply TEXT, PRIMARY KEY (msg_id, idx)) WITHOUT ROWID;
INSERT INTO messages VALUES ('first', 'acme', 'a@acme.example.test', 'news', 1.0, 3, X'616263');
INSERT INTO recipients VALUES ('first', 0, 'x@example.test', 'queued', 0, 1.0, 1.0, NULL);
INSERT INTO recipients VALUES ('first', 1, 'y@example.test', 'held', 0, 1.0, 1.0, NULL);
"""


def _recorded(path: Path) -> list[tuple[int, str, int]]:
    db = sqlite3.connect(path)
    try:
        return db.execute(
            "SELECT version, name, applied_at FROM schema_migrations ORDER BY version"
        ).fetchall()
    finally:
        db.close()


def _columns(path: Path, table: str) -> list[str]:
    db = sqlite3.connect(path)
    try:
        return [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
    finally:
        db.close()


def _indexes(path: Path) -> set[str]:
    db = sqlite3.connect(path)
    try:
        return {
            r[0]
            for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")
        }
    finally:
        db.close()


async def _open(path: Path) -> QueueStore:
    store = QueueStore(path)
    await store.open()
    return store


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[QueueStore]:
    s = await _open(tmp_path / "queue.db")
    try:
        yield s
    finally:
        await s.close()


# --- migrations ----------------------------------------------------------------------------------------


def test_migrations_are_numbered_without_gaps() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, LATEST_VERSION + 1))
    assert len({m.name for m in MIGRATIONS}) == len(MIGRATIONS)


async def test_a_new_queue_records_every_version_once(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    await (await _open(path)).close()
    first = _recorded(path)
    assert [(v, n) for v, n, _ in first] == [(m.version, m.name) for m in MIGRATIONS]
    await (await _open(path)).close()  # a second open (a restart, the other process of the shard)
    assert _recorded(path) == first  # nothing applied again, the times unchanged
    assert _columns(path, "recipients")[-3:] == ["data", "account", "held_by"]
    assert _columns(path, "messages")[-4:] == ["data", "render", "msg_class", "body"]
    assert {"recipients_due", "recipients_address", "recipients_done", "recipients_account"} <= _indexes(path)


async def test_a_queue_of_the_first_relayd_opens_and_is_upgraded(tmp_path: Path) -> None:
    """Unrecorded and missing five columns: each version adds its column in the order the unversioned
    migration did (the orphan-shard merge copies rows with ``SELECT *``), and the mail is still there."""
    old, new = tmp_path / "old.db", tmp_path / "new.db"
    db = sqlite3.connect(old)
    db.executescript(FIRST_SCHEMA)
    db.close()
    store = await _open(old)
    try:
        [due] = await store.due(time.time(), 10)
        assert (due.queue_id, due.index, due.account, due.list_name) == ("first", 0, "acme", "news")
        row = await store.show("first")
        assert row is not None and [r.state for r in row.recipients] == ["queued", "held"]
        assert [a.changed for a in await store.operate(Action.RELEASE, Selection(queue_ids=("first",)))] == [
            False  # held before held_by existed: a suspension hold, which only reinstatement releases
        ]
    finally:
        await store.close()
    await (await _open(new)).close()
    for table in ("messages", "recipients"):
        assert _columns(old, table) == _columns(new, table)
    assert [v for v, _, _ in _recorded(old)] == list(range(1, LATEST_VERSION + 1))
    assert _indexes(old) == _indexes(new)


def test_migrate_is_idempotent_and_fills_the_account_at_every_open(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    db = sqlite3.connect(path, isolation_level=None)
    try:
        migrate(db)
        recorded = _recorded(path)
        # a row written by another tool, without the account fair queueing reads
        db.execute(
            "INSERT INTO messages (id, account, mail_from, created_at, size) VALUES ('t', 'zed', '', 1, 0)"
        )
        db.execute(
            "INSERT INTO recipients (msg_id, idx, address, state, next_attempt, updated_at) "
            "VALUES ('t', 0, 'r@example.test', 'queued', 1, 1)"
        )
        migrate(db)
        assert db.execute("SELECT account FROM recipients").fetchall() == [("zed",)]
        assert not db.in_transaction
    finally:
        db.close()
    assert _recorded(path) == recorded


def test_a_partly_recorded_queue_gets_only_the_versions_it_lacks(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    db = sqlite3.connect(path, isolation_level=None)
    try:
        migrate(db)
        db.execute("DELETE FROM schema_migrations WHERE version > 3")
        before = {v: t for v, _, t in _recorded(path)}
        migrate(db)  # versions 4.. find their columns there already and only record themselves
    finally:
        db.close()
    after = {v: t for v, _, t in _recorded(path)}
    assert sorted(after) == list(range(1, LATEST_VERSION + 1))
    assert all(after[v] == t for v, t in before.items())


# --- operator actions ----------------------------------------------------------------------------------


async def _fill(store: QueueStore) -> None:
    await store.enqueue(NewMessage("A", "acme", "app@acme.test", ("x@slow.test", "y@far.test"), b"a"))
    await store.enqueue(NewMessage("B", "other", "news@other.test", ("Z@SLOW.test",), b"b"))


def _changed(affected: list[Affected]) -> list[tuple[str, int]]:
    return [(a.queue_id, a.index) for a in affected if a.changed]


async def test_hold_and_release_by_domain_and_account(store: QueueStore) -> None:
    await _fill(store)
    held = await store.operate(Action.HOLD, Selection(domain="SLOW.test."))
    assert _changed(held) == [("A", 0), ("B", 0)]  # the domain matches in any case, with a final dot
    assert {
        (e.queue_id, e.held_by) for e in await store.entries(View.HELD, Selection(), now=time.time())
    } == {
        ("A", "operator"),
        ("B", "operator"),
    }
    released = await store.operate(Action.RELEASE, Selection(account="acme"))
    assert _changed(released) == [("A", 0)]
    [row] = await store.entries(View.HELD, Selection(), now=time.time())
    assert (row.queue_id, row.account) == ("B", "other")


async def test_release_leaves_what_a_suspension_holds(store: QueueStore) -> None:
    await _fill(store)
    assert await store.hold_account("acme") == 2
    assert _changed(
        await store.operate(Action.HOLD, Selection(queue_ids=("A",), recipient="X@slow.test"))
    ) == [
        ("A", 0)  # an operator hold over a suspension hold: now only the operator releases it
    ]
    affected = await store.operate(Action.RELEASE, Selection(queue_ids=("A",)))
    assert [(a.index, a.held_by, a.changed) for a in affected] == [
        (0, "operator", True),
        (1, "suspension", False),
    ]
    assert await store.release_account("acme") == 1


async def test_retry_moves_only_recipients_waiting_for_a_later_attempt(store: QueueStore) -> None:
    await _fill(store)
    later = time.time() + 3600
    await store.defer("A", 1, later, "451 4.7.1 later", 1)
    assert _changed(await store.operate(Action.RETRY, Selection())) == [("A", 1)]
    assert {(r.queue_id, r.index) for r in await store.due(time.time() + 1, 10)} == {
        ("A", 0),
        ("A", 1),
        ("B", 0),
    }


async def test_drop_by_sender_frees_the_message_once_nothing_waits(store: QueueStore) -> None:
    await _fill(store)
    await store.finish("A", 0, State.DELIVERED, "250 ok", 1)
    dropped = await store.operate(Action.DROP, Selection(sender="APP@acme.test"))
    assert _changed(dropped) == [("A", 1)]  # the delivered recipient is not selectable any more
    assert await store.message_data("A") is None  # nothing left to deliver: the body is freed
    assert await store.message_data("B") is not None
    row = await store.show("A")
    assert row is not None
    assert [(r.state, r.last_reply) for r in row.recipients] == [
        ("delivered", "250 ok"),
        ("dropped", "dropped by operator"),
    ]


async def test_selection_by_creation_time_and_nothing_matching(store: QueueStore) -> None:
    await _fill(store)
    assert await store.operate(Action.DROP, Selection(created_before=0.0)) == []
    assert await store.operate(Action.HOLD, Selection(queue_ids=("nope",))) == []
    assert len(await store.entries(View.PENDING, Selection(), now=time.time())) == 3


# --- read models ---------------------------------------------------------------------------------------


def test_a_queue_entry_is_a_recipient_row_with_its_envelope() -> None:
    rcpt = [f.name for f in dataclasses.fields(RecipientRow)]
    entry = [f.name for f in dataclasses.fields(QueueEntry)]
    assert issubclass(QueueEntry, RecipientRow) and entry[: len(rcpt)] == rcpt
    assert entry[len(rcpt) :] == ["held_by", "account", "mail_from", "list_name", "created_at", "size"]


async def test_an_entry_repeats_the_recipient_row_of_its_message(store: QueueStore) -> None:
    await _fill(store)
    row = await store.show("A")
    assert row is not None
    entries = await store.entries(View.PENDING, Selection(queue_ids=("A",)), now=time.time())
    shared = [f.name for f in dataclasses.fields(RecipientRow)]
    assert [RecipientRow(*(getattr(e, n) for n in shared)) for e in entries] == list(row.recipients)
    assert all((e.account, e.mail_from, e.size) == ("acme", "app@acme.test", 1) for e in entries)


async def test_read_message_reads_any_shard_read_only(tmp_path: Path) -> None:
    assert read_message(tmp_path, "A") is None
    assert list(tmp_path.iterdir()) == []  # nothing created where there is no queue
    shard = await _open(tmp_path / "queue-1.db")
    try:
        await _fill(shard)
        expected = await shard.show("B")
    finally:
        await shard.close()
    await (await _open(tmp_path / "queue.db")).close()
    found = read_message(tmp_path, "B")
    assert isinstance(found, MessageRow) and found == expected
    assert read_message(tmp_path, "missing") is None


async def test_due_leaves_out_the_rows_the_caller_has_taken(store: QueueStore) -> None:
    """The scheduler's in-flight recipients are still 'queued' on disk; under a backlog they are most of
    what its scan reads, and are left out before they are made into objects (the scan checks again)."""
    await _fill(store)
    in_flight = {("A", 0), ("B", 0)}
    rows = await store.due(time.time() + 1, 10, taken=lambda queue_id, index: (queue_id, index) in in_flight)
    assert [(r.queue_id, r.index) for r in rows] == [("A", 1)]
    assert len(await store.due(time.time() + 1, 10)) == 3
