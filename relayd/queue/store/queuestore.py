"""QueueStore: one queue shard's database, written through group commit and read inline.

The states, the durability promise and the failure modes are described in relayd.queue.store; this
module holds the store itself, the writes it submits (statements in relayd.queue.store.writes) and the
reads the scheduler, the command line and the feedback handlers make.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from relayd.core.errors import StorageError
from relayd.core.models import DueRecipient
from relayd.core.msgclass import MessageClass
from relayd.queue.store.migrations import migrate
from relayd.queue.store.models import (
    AGE_BUCKETS,
    FINAL_STATES,
    RCPT_DOMAIN,
    VIEW_SQL,
    Action,
    Affected,
    MessageRow,
    NewMessage,
    QueueEntry,
    RecipientRow,
    Selection,
    State,
    StoredData,
    View,
    class_of,
)
from relayd.queue.store.writes import InsufficientStorage, Op, apply_ops, free_bytes, operate, storage_error
from relayd.store.sqlitewriter import SqliteWriter

#: how long a batch waits for the write lock held by another process (the shard's other process, the CLI)
_LOCK_TIMEOUT = 5.0
#: a message longer than this is kept in ``messages.body``, written and read in pieces (migration v0007)
BODY_ABOVE = 256 * 1024


def message_row(db: sqlite3.Connection, queue_id: str) -> MessageRow | None:
    """Message ``queue_id`` and its recipients, read on ``db`` (the store's reader, or a read-only
    connection of another process: relayd.queue.shards.read_message). Raises sqlite3.Error."""
    msgs = db.execute(
        "SELECT id, account, mail_from, list_name, created_at, size, msg_class FROM messages WHERE id = ?",
        (queue_id,),
    ).fetchall()
    if not msgs:
        return None
    rcpts = db.execute(
        "SELECT msg_id, idx, address, state, attempts, next_attempt, updated_at, last_reply "
        "FROM recipients WHERE msg_id = ? ORDER BY idx",
        (queue_id,),
    ).fetchall()
    qid, account, mail_from, list_name, created_at, size, value = msgs[0]
    return MessageRow(
        qid,
        account,
        mail_from,
        list_name,
        created_at,
        size,
        tuple(RecipientRow(*r) for r in rcpts),
        class_of(value),
    )


def _due(row: Sequence[Any]) -> DueRecipient:
    """A :class:`DueRecipient` from a row of (recipient and message columns..., msg_class)."""
    queue_id, index, address, attempts, account, mail_from, created_at, list_name, value = row
    return DueRecipient(
        queue_id, index, address, attempts, account, mail_from, created_at, list_name, class_of(value)
    )


#: a recipient's final state; one held while its attempt was in flight takes it as well (the attempt happened)
_FINISH = (
    "UPDATE recipients SET state = ?, last_reply = ?, attempts = ?, updated_at = ?, data = NULL, "
    "held_by = NULL WHERE msg_id = ? AND idx = ? AND state IN ('queued', 'held')"
)


#: WAL pages (of 4 KiB) past which a writer that leaves checkpoints to another process checkpoints anyway
WAL_BACKSTOP = 25_000


class QueueStore:
    """Async access to the queue database: a group-committing writer (relayd.store.sqlitewriter) plus inline
    reads. Reads are short indexed lookups in WAL mode (readers never wait for the writer) and run on the
    loop thread.
    """

    def __init__(
        self, path: Path, *, batch_limit: int = 512, outcomes_only: bool = False, checkpoints: bool = True
    ) -> None:
        self.path = path
        self._batch_limit = batch_limit
        #: a shard's delivery process writes only attempt outcomes, and holds the write lock that the
        #: shard's submission process needs for its next ``250`` as briefly as it can:
        #: ``synchronous=NORMAL``, a commit does not wait for an fsync. After a power loss (not a crash)
        #: its last outcomes may be gone and those recipients are delivered once more: at-least-once, as
        #: the queue promises anyway. Every message is still committed with ``FULL`` (and that fsync
        #: writes out the outcomes before it too).
        self._synchronous = "NORMAL" if outcomes_only else "FULL"
        #: a shard's submission process leaves checkpoints to its delivery process (``checkpoints=False``):
        #: a commit that crosses SQLite's WAL threshold runs the checkpoint itself, writing back and
        #: fsyncing the database file, and every ``250`` of its batch waited for that (tens of ms, the
        #: probe's p99). It still checkpoints past :data:`WAL_BACKSTOP` pages, should delivery stall.
        self._autocheckpoint = 1000 if checkpoints else WAL_BACKSTOP
        self._db: sqlite3.Connection | None = None
        self._ro: sqlite3.Connection | None = None
        self._writer: SqliteWriter | None = None

    async def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = await asyncio.to_thread(self._connect_writer)
            self._ro = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
            self._ro.execute("PRAGMA query_only = 1")
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"cannot open queue {self.path}: {exc}") from exc
        self._writer = SqliteWriter(
            "queue-writer",
            self._db,
            error=storage_error,
            lock_timeout=_LOCK_TIMEOUT,
            batch_limit=self._batch_limit,
        )
        self._writer.start()

    def _connect_writer(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self._synchronous}")
        db.execute(f"PRAGMA wal_autocheckpoint={self._autocheckpoint}")
        migrate(db)
        db.execute("PRAGMA busy_timeout = 0")  # write_lock() waits for the lock, in short steps
        return db

    async def close(self) -> None:
        """Finish every write already requested, then close; each batch is a transaction, so nothing is
        ever half-written."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            await writer.stop()
        if self._db is not None:
            db, self._db = self._db, None
            db.close()
        if self._ro is not None:
            self._ro.close()
            self._ro = None

    # --- writes (group commit) -------------------------------------------------------------------------

    async def _submit(self, ops: list[Op], *, after: asyncio.Future[Any] | None = None) -> int:
        """Commit ``ops`` (together, in one transaction with whatever else is waiting, and behind ``after``
        if given); the last op's row count."""
        if self._writer is None:
            raise StorageError("queue writer is not running")
        return await self._writer.run(functools.partial(apply_ops, ops), after=after)

    async def enqueue(
        self,
        msg: NewMessage,
        *,
        held: bool = False,
        min_free: int = 0,
        after: asyncio.Future[Any] | None = None,
    ) -> None:
        """Store ``msg`` durably; returns once committed. Raises StorageError, or InsufficientStorage when
        less than ``min_free`` bytes plus the message would be left on the queue's filesystem.

        ``after``: a write the message must never be on disk without (its sent-ledger rows), begun just
        before; the message is committed only once it is, and not at all if it fails (its error is
        raised)."""
        now = time.time()
        state = State.HELD if held else State.QUEUED
        if min_free > 0:
            size = msg.size
            try:
                free = free_bytes(self.path.parent)
            except OSError as exc:
                raise StorageError(f"cannot stat the queue's filesystem: {exc}") from exc
            if free < min_free + size:
                raise InsufficientStorage(f"{free} bytes free on the queue filesystem, {min_free} kept back")
        size = msg.size
        big = size > BODY_ABOVE  # kept in ``body`` (migration v0007), ``data`` left empty
        await self._submit(
            [
                Op(
                    "INSERT INTO messages (id, account, mail_from, list_name, created_at, size, data, "
                    "render, msg_class, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, "
                    + ("zeroblob(?))" if big else "?)"),
                    (
                        msg.queue_id,
                        msg.account,
                        msg.mail_from,
                        msg.list_name,
                        now,
                        size,
                        b"" if big else msg.head + msg.data,
                        int(msg.render),
                        msg.msg_class.value,
                        size if big else None,
                    ),
                    body=(msg.head, msg.data) if big else None,
                ),
                Op(
                    "INSERT INTO recipients (msg_id, idx, address, state, attempts, next_attempt, "
                    "updated_at, account) VALUES (?, ?, ?, ?, 0, ?, ?, ?)",
                    [
                        (msg.queue_id, i, rcpt, state, now, now, msg.account)
                        for i, rcpt in enumerate(msg.recipients)
                    ],
                    many=True,
                ),
            ],
            after=after,
        )

    async def finish(self, queue_id: str, index: int, state: State, reply: str, attempts: int) -> None:
        """Move a recipient to a final state (delivered, failed, expired). A recipient held while its
        attempt was in flight takes the outcome as well: the attempt happened."""
        assert state in FINAL_STATES
        await self._submit(
            [Op(_FINISH, (state, reply, attempts, time.time(), queue_id, index), touched=queue_id)]
        )

    async def finish_many(self, done: Sequence[tuple[str, int, State, str, int]]) -> None:
        """:meth:`finish` for several recipients, (queue id, index, state, reply, attempts) each, in one
        write: the copies of a message sent one after another end together (one statement per message,
        and one check whether its data can be freed)."""
        now = time.time()
        by_message: dict[str, list[tuple[Any, ...]]] = {}
        for queue_id, index, state, reply, attempts in done:
            assert state in FINAL_STATES
            by_message.setdefault(queue_id, []).append((state, reply, attempts, now, queue_id, index))
        if by_message:
            await self._submit(
                [Op(_FINISH, rows, many=True, touched=queue_id) for queue_id, rows in by_message.items()]
            )

    async def defer(self, queue_id: str, index: int, next_attempt: float, reply: str, attempts: int) -> None:
        """Record a failed attempt and when to try again; a recipient held meanwhile stays held (the
        release makes it due)."""
        await self._submit(
            [
                Op(
                    "UPDATE recipients SET next_attempt = ?, last_reply = ?, attempts = ?, updated_at = ? "
                    "WHERE msg_id = ? AND idx = ? AND state IN ('queued', 'held')",
                    (next_attempt, reply, attempts, time.time(), queue_id, index),
                )
            ]
        )

    async def postpone(self, queue_id: str, index: int, next_attempt: float) -> None:
        """Wait without an attempt (traffic shaping held the recipient back): only the due time moves, so
        neither ``attempts`` nor ``last_reply`` say anything happened -- retry schedule and expiry are
        untouched."""
        await self._submit(
            [
                Op(
                    "UPDATE recipients SET next_attempt = ? "
                    "WHERE msg_id = ? AND idx = ? AND state = 'queued'",
                    (next_attempt, queue_id, index),
                )
            ]
        )

    async def drop_recipient(self, queue_id: str, index: int, reason: str) -> None:
        """Drop one recipient (suppressed after it was queued, unsubscribed, ...)."""
        await self._submit(
            [
                Op(
                    "UPDATE recipients SET state = 'dropped', last_reply = ?, updated_at = ?, data = NULL "
                    "WHERE msg_id = ? AND idx = ? AND state IN ('queued', 'held')",
                    (reason, time.time(), queue_id, index),
                    touched=queue_id,
                )
            ]
        )

    async def drop_matching(
        self,
        account: str,
        list_name: str | None,
        address: str,
        reason: str,
        *,
        keep_transactional: bool = False,
    ) -> int:
        """Drop every unfinished recipient ``address`` of ``account`` (and of ``list_name`` when given):
        an unsubscribe or complaint removes the recipient from mailings already in the queue.
        ``keep_transactional``: an unsubscribe leaves transactional mail queued (a complaint does not)."""
        sql = (
            "UPDATE recipients SET state = 'dropped', last_reply = ?, updated_at = ?, data = NULL "
            "WHERE address = ? AND state IN ('queued', 'held') AND msg_id IN "
            "(SELECT id FROM messages WHERE account = ?"
        )
        params: list[Any] = [reason, time.time(), address, account]
        if list_name is not None:
            sql += " AND list_name = ?"
            params.append(list_name)
        if keep_transactional:
            sql += " AND msg_class != ?"
            params.append(MessageClass.TRANSACTIONAL.value)
        return await self._update_count(sql + ")", params)

    async def hold_account(self, account: str) -> int:
        """Suspension: park the account's queued recipients as 'held' (kept, not delivered)."""
        return await self._update_count(
            "UPDATE recipients SET state = 'held', held_by = 'suspension', updated_at = ? "
            "WHERE state = 'queued' AND msg_id IN (SELECT id FROM messages WHERE account = ?)",
            (time.time(), account),
        )

    async def release_account(self, account: str) -> int:
        """Reinstatement: the recipients its suspension held become due at once; those an operator held
        stay held (a queue written before ``held_by`` existed knew only suspension holds)."""
        now = time.time()
        return await self._update_count(
            "UPDATE recipients SET state = 'queued', held_by = NULL, next_attempt = ?, updated_at = ? "
            "WHERE state = 'held' AND COALESCE(held_by, 'suspension') = 'suspension' "
            "AND msg_id IN (SELECT id FROM messages WHERE account = ?)",
            (now, now, account),
        )

    async def operate(self, action: Action, selection: Selection) -> list[Affected]:
        """An operator's ``hold``, ``release``, ``retry`` or ``drop`` of the selected recipients; the
        recipients it changed.

        Selection and update run in one write transaction, so a recipient whose attempt ends meanwhile is
        either changed here or has its outcome, never half of each (see :meth:`finish`). ``release``
        releases operator holds only; what a suspension holds is released by reinstating the account.
        ``retry`` moves only recipients waiting for a later attempt (the others are due already)."""
        return await self._submit_fn(functools.partial(operate, action, selection, time.time()))

    async def _submit_fn(self, fn: Callable[[sqlite3.Connection], list[Affected]]) -> list[Affected]:
        if self._writer is None:
            raise StorageError("queue writer is not running")
        return await self._writer.run(fn)

    async def _update_count(self, sql: str, params: Sequence[Any]) -> int:
        return await self._submit([Op(sql, params)])

    async def purge(self, older_than: float) -> None:
        """Forget finished recipients and their messages after ``keep_finished``."""
        await self._submit(
            [
                Op(
                    "DELETE FROM recipients WHERE state NOT IN ('queued', 'held') AND updated_at < ?",
                    (older_than,),
                ),
                Op(
                    "DELETE FROM messages WHERE data IS NULL AND created_at < ? AND NOT EXISTS "
                    "(SELECT 1 FROM recipients WHERE msg_id = messages.id)",
                    (older_than,),
                ),
            ]
        )

    # --- reads -------------------------------------------------------------------------------------------

    async def _fetch(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """A read on the loop thread (short, indexed; WAL readers don't wait for the writer)."""
        if self._ro is None:
            raise StorageError("queue is closed")
        try:
            return self._ro.execute(sql, params).fetchall()
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"queue read failed: {exc}") from exc

    async def due(
        self,
        now: float,
        limit: int,
        *,
        per_account: Callable[[str], int] | None = None,
        taken: Callable[[str, int], bool] | None = None,
    ) -> list[DueRecipient]:
        """The recipients whose next attempt is due, fair between accounts; ids and envelope, never bodies.
        Rows for which ``taken(queue id, index)`` is true (their attempt is in flight: the caller's window
        holds them, still 'queued' on disk) are left out before they are made into objects; under a
        backlog they are most of what a scan reads.

        Each account's due rows are read on their own, oldest first, at most ``per_account(account)`` of
        them (default ``limit``; 0 skips the account), and the lists are interleaved round-robin: one
        account's backlog of a million rows never hides another account's ten (KumoMTA keeps a scheduled
        queue per tenant for the same reason). Each read is one range of the ``recipients_account`` index,
        so a scan costs O(accounts x limit), not O(queue).
        """
        accounts: list[str | None] = []
        last = ""
        while True:  # a loose index scan: one short lookup per account that has queued rows
            rows = await self._fetch(
                "SELECT MIN(account) FROM recipients WHERE state = 'queued' AND account > ?", (last,)
            )
            if not rows or rows[0][0] is None:
                break
            last = rows[0][0]
            accounts.append(last)
        accounts.append(None)  # rows no migration could attribute (written by other tools): never stranded
        found: list[list[DueRecipient]] = []
        for account in accounts:
            n = per_account(account) if per_account is not None and account is not None else limit
            if n <= 0:
                continue
            where = "r.account = ?" if account is not None else "r.account IS NULL"
            rows = await self._fetch(
                "SELECT r.msg_id, r.idx, r.address, r.attempts, m.account, m.mail_from, m.created_at, "
                "m.list_name, m.msg_class FROM recipients r JOIN messages m ON m.id = r.msg_id "
                f"WHERE {where} AND r.state = 'queued' AND r.next_attempt <= ? "
                "ORDER BY r.next_attempt LIMIT ?",
                (account, now, n) if account is not None else (now, n),
            )
            if taken is not None:
                rows = [row for row in rows if not taken(row[0], row[1])]
            if rows:
                found.append([_due(row) for row in rows])
        out: list[DueRecipient] = []
        for i in range(max((len(rows) for rows in found), default=0)):
            out.extend(rows[i] for rows in found if i < len(rows))
        return out

    async def next_due_time(self) -> float | None:
        rows = await self._fetch("SELECT MIN(next_attempt) FROM recipients WHERE state = 'queued'", ())
        return rows[0][0] if rows and rows[0][0] is not None else None

    async def committed(self, queue_id: str) -> list[DueRecipient]:
        """The recipients of a message another process has just committed (relayd.queue.handoff) that
        are still queued and due, in one read."""
        rows = await self._fetch(
            "SELECT r.msg_id, r.idx, r.address, r.attempts, m.account, m.mail_from, m.created_at, "
            "m.list_name, m.msg_class FROM recipients r JOIN messages m ON m.id = r.msg_id "
            "WHERE r.msg_id = ? AND r.state = 'queued' AND r.next_attempt <= ? AND r.data IS NULL "
            "ORDER BY r.idx",
            (queue_id, time.time()),
        )
        return [_due(row) for row in rows]

    async def message_data(self, queue_id: str) -> StoredData | None:
        """The message as stored (without any per-recipient copy an older relayd kept)."""
        rows = await self._read_data(
            "SELECT NULL, data, render, body IS NOT NULL, rowid FROM messages WHERE id = ?", (queue_id,)
        )
        return rows[0] if rows else None

    async def recipient_data(self, queue_id: str, index: int) -> StoredData | None:
        """What to deliver to one recipient: its own finished copy if an older relayd stored one, else
        the message (with whether a copy is to be rendered from it)."""
        rows = await self._read_data(
            "SELECT r.data, m.data, m.render, m.body IS NOT NULL, m.rowid FROM recipients r "
            "JOIN messages m ON m.id = r.msg_id WHERE r.msg_id = ? AND r.idx = ?",
            (queue_id, index),
        )
        return rows[0] if rows else None

    async def _read_data(self, sql: str, params: Sequence[Any]) -> list[StoredData | None]:
        """Rows of (own copy, data, render, has body, message rowid) as :class:`StoredData`, a big
        message's ``body`` read into one buffer (``Blob.read``: no second copy inside SQLite), in one read
        transaction, so a body freed meanwhile is never half seen."""
        if self._ro is None:
            raise StorageError("queue is closed")
        db = self._ro
        try:
            db.execute("BEGIN")
            try:
                out: list[StoredData | None] = []
                for own, data, render, has_body, rowid in db.execute(sql, params).fetchall():
                    if own is not None:
                        out.append(StoredData(bytes(own), False))
                    elif data is None:
                        out.append(None)
                    elif has_body:
                        with db.blobopen("messages", "body", rowid, readonly=True) as blob:
                            out.append(StoredData(blob.read(), bool(render)))
                    else:
                        out.append(StoredData(bytes(data), bool(render)))
                return out
            finally:
                db.execute("COMMIT")
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"queue read failed: {exc}") from exc

    async def show(self, queue_id: str) -> MessageRow | None:
        """A message and its recipients (``relayd queue show``)."""
        if self._ro is None:
            raise StorageError("queue is closed")
        try:
            return message_row(self._ro, queue_id)
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"queue read failed: {exc}") from exc

    async def list_messages(self, *, state: str | None = None, limit: int = 1000) -> list[MessageRow]:
        where = (
            "WHERE EXISTS (SELECT 1 FROM recipients r WHERE r.msg_id = m.id AND r.state = ?)" if state else ""
        )
        ids = await self._fetch(
            f"SELECT m.id FROM messages m {where} ORDER BY m.created_at LIMIT ?",
            (state, limit) if state else (limit,),
        )
        out = []
        for (qid,) in ids:
            row = await self.show(qid)
            if row is not None:
                out.append(row)
        return out

    async def entries(
        self, view: View, selection: Selection, *, now: float, limit: int = 1000
    ) -> list[QueueEntry]:
        """The recipients in ``view`` that ``selection`` matches, oldest message first, at most ``limit``."""
        cond, n_now = VIEW_SQL[view]
        where, params = selection.sql()
        rows = await self._fetch(
            "SELECT r.msg_id, r.idx, r.address, r.state, r.attempts, r.next_attempt, r.updated_at, "
            "r.last_reply, r.held_by, m.account, m.mail_from, m.list_name, m.created_at, m.size "
            f"FROM recipients r JOIN messages m ON m.id = r.msg_id WHERE {cond}{where} "
            "ORDER BY m.created_at, r.msg_id, r.idx LIMIT ?",
            [*[now] * n_now, *params, limit],
        )
        return [QueueEntry(*row) for row in rows]

    async def shape(self, now: float) -> list[tuple[str, bool, int, int]]:
        """qshape's figures: (recipient domain, deferred?, age bucket, recipients) for every unfinished
        recipient, counted in SQL (no row leaves the database). The bucket is an index into
        :data:`AGE_BUCKETS`, ``len(AGE_BUCKETS)`` for older ones."""
        bucket = (
            "CASE "
            + " ".join(f"WHEN age <= {b} THEN {i}" for i, b in enumerate(AGE_BUCKETS))
            + f" ELSE {len(AGE_BUCKETS)} END"
        )
        rows = await self._fetch(
            f"SELECT dom, deferred, {bucket} AS bucket, COUNT(*) FROM (SELECT {RCPT_DOMAIN} AS dom, "
            "(r.state = 'queued' AND r.attempts > 0 AND r.next_attempt > ?) AS deferred, "
            "(? - m.created_at) / 60.0 AS age FROM recipients r JOIN messages m ON m.id = r.msg_id "
            "WHERE r.state IN ('queued', 'held')) GROUP BY dom, deferred, bucket",
            (now, now),
        )
        return [(dom, bool(deferred), b, n) for dom, deferred, b, n in rows]

    async def oldest_pending(self) -> float | None:
        """Creation time of the oldest message that still has a queued recipient (held mail is excluded:
        it waits for an operator, not for us)."""
        rows = await self._fetch(
            "SELECT MIN(m.created_at) FROM recipients r JOIN messages m ON m.id = r.msg_id "
            "WHERE r.state = 'queued'",
            (),
        )
        return rows[0][0] if rows and rows[0][0] is not None else None

    async def counts(self) -> dict[str, int]:
        rows = await self._fetch("SELECT state, COUNT(*) FROM recipients GROUP BY state", ())
        return {state: n for state, n in rows}
