"""The durable queue: one SQLite database in WAL mode with ``synchronous=FULL``.

Why SQLite and not a file per message (Postfix, Mailman): one transaction stores the message and all its
recipients atomically, so a crash leaves either the whole message or nothing, and many sessions can share
one fsync (group commit): the writer (relayd.store.sqlitewriter) takes every write that is waiting, runs them
in
one transaction and commits once. A session gets its ``250`` only after the commit that holds its
message has returned.

States of a recipient (the only transitions are in :meth:`QueueStore.finish` and :meth:`QueueStore.defer`)::

    queued ──250──> delivered          queued ──5xx──> failed
       │ └─4xx──> queued (next_attempt = later)   └─age > max_age──> expired
       └─ relayd queue drop ──> dropped    held <──> queued (account suspension, or relayd queue hold)

"In flight" is not a state on disk: a recipient being delivered is still ``queued``, so a crash at any moment
leaves it to be delivered again on restart (at-least-once, never lost).

Who held a recipient is ``held_by``: ``suspension`` (the account was suspended; reinstating it releases
them) or ``operator`` (``relayd queue hold``; only ``relayd queue release`` does). A hold written while an
attempt is in flight does not lose that attempt's outcome: a delivery or a bounce moves a held recipient to
its final state too (the mail has left, holding it would send it twice after the release), a deferral
records its attempt and leaves the recipient held.

Failure: every sqlite3/OS error is raised as :class:`relayd.core.errors.StorageError`; the submission listener
answers 451 and the client keeps its message.

Disk full (Postfix's ``queue_minfree``): :meth:`QueueStore.enqueue` refuses a new message with
:class:`InsufficientStorage` (answered ``452 4.3.1``) while the queue's filesystem has less than
``[queue] min_free_space`` free, before it writes anything, so the space that is left goes to what the queue
must still record: delivery outcomes, deferrals, WAL checkpoints. A write that hits ENOSPC anyway
(``SQLITE_FULL``) raises the same error; the batch's transaction is rolled back, so nothing is half-written,
and the next write after space returns simply succeeds (no restart, no repair).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from relayd.core.errors import StorageError
from relayd.core.models import DueRecipient
from relayd.core.msgclass import MessageClass
from relayd.store.sqlitewriter import SqliteWriter

log = logging.getLogger(__name__)

#: how long a batch waits for the write lock held by another process (the shard's other process, the CLI)
_LOCK_TIMEOUT = 5.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id          TEXT PRIMARY KEY,
    account     TEXT NOT NULL,
    mail_from   TEXT NOT NULL,
    list_name   TEXT,
    created_at  REAL NOT NULL,
    size        INTEGER NOT NULL,
    data        BLOB,
    render      INTEGER NOT NULL DEFAULT 0,
    msg_class   TEXT NOT NULL DEFAULT 'bulk'
);
CREATE TABLE IF NOT EXISTS recipients (
    msg_id       TEXT NOT NULL,
    idx          INTEGER NOT NULL,
    address      TEXT NOT NULL,
    state        TEXT NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    updated_at   REAL NOT NULL,
    last_reply   TEXT,
    data         BLOB,
    account      TEXT,
    held_by      TEXT,
    PRIMARY KEY (msg_id, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS recipients_due ON recipients (next_attempt) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS recipients_address ON recipients (address) WHERE state IN ('queued', 'held');
CREATE INDEX IF NOT EXISTS recipients_done ON recipients (updated_at) WHERE state NOT IN ('queued', 'held');
"""

#: fair queueing (see :meth:`QueueStore.due`): ``recipients.account`` repeats ``messages.account`` so that
#: each account's due rows are one index range. Kept out of SCHEMA because SCHEMA must also run on a queue
#: written by an older relayd, whose recipients table has no account column yet (:func:`migrate` adds it).
_ACCOUNT_INDEX = (
    "CREATE INDEX IF NOT EXISTS recipients_account ON recipients (account, next_attempt) "
    "WHERE state = 'queued'"
)


def migrate(db: sqlite3.Connection) -> None:
    """Bring a queue database to the current schema; idempotent, and cheap when there is nothing to do.

    Adds the columns later versions added (``recipients.data`` for per-recipient renderings,
    ``recipients.account`` for fair queueing, ``recipients.held_by`` for who held a recipient,
    ``messages.render`` for copies made at delivery) to a queue
    written by an older relayd, and fills ``account``
    wherever it is missing (a queue filled by another tool): a queued row without an account would still be
    delivered (see :meth:`QueueStore.due`), but outside the fair rotation."""
    db.executescript(SCHEMA)
    columns = {row[1] for row in db.execute("PRAGMA table_info(recipients)")}
    for name, decl in (("data", "BLOB"), ("account", "TEXT"), ("held_by", "TEXT")):
        if name not in columns:
            db.execute(f"ALTER TABLE recipients ADD COLUMN {name} {decl}")
    if "render" not in {row[1] for row in db.execute("PRAGMA table_info(messages)")}:
        db.execute("ALTER TABLE messages ADD COLUMN render INTEGER NOT NULL DEFAULT 0")
    if "msg_class" not in {row[1] for row in db.execute("PRAGMA table_info(messages)")}:
        # the class of a message (relayd.core.msgclass): mail queued before classes existed is bulk
        db.execute("ALTER TABLE messages ADD COLUMN msg_class TEXT NOT NULL DEFAULT 'bulk'")
    db.execute(_ACCOUNT_INDEX)
    db.execute(
        "UPDATE recipients SET account = (SELECT account FROM messages WHERE id = recipients.msg_id) "
        "WHERE account IS NULL AND state IN ('queued', 'held')"
    )


class InsufficientStorage(StorageError):
    """The queue's filesystem is (nearly) full: refuse new mail with ``452 4.3.1`` (RFC 3463 §3.4) until
    space returns. Transient by nature: the client keeps its message and tries again."""


def free_bytes(path: Path) -> int:
    """Bytes available to us on the filesystem holding ``path`` (``f_bavail``: without root's reserve)."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _is_full(exc: BaseException) -> bool:
    """SQLITE_FULL ("database or disk is full") or ENOSPC/EDQUOT from the OS."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return code is not None and code & 0xFF == sqlite3.SQLITE_FULL  # primary code of an extended one
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


class State(StrEnum):
    QUEUED = "queued"
    HELD = "held"
    DELIVERED = "delivered"
    FAILED = "failed"
    EXPIRED = "expired"
    DROPPED = "dropped"


FINAL_STATES = (State.DELIVERED, State.FAILED, State.EXPIRED, State.DROPPED)


@dataclass(frozen=True, slots=True)
class NewMessage:
    """What the submission listener hands to the queue: one message, its recipients, who sent it."""

    queue_id: str
    account: str
    mail_from: str
    recipients: tuple[str, ...]
    data: bytes
    list_name: str | None = None
    #: each recipient gets its own copy, made from ``data`` at delivery (relayd.policy.render: unsubscribe
    #: link, trace token, DKIM signature); False: ``data`` is delivered as it is
    render: bool = False
    #: bulk or transactional: the dequeue check and the copy made at delivery depend on it
    msg_class: MessageClass = MessageClass.BULK


@dataclass(frozen=True, slots=True)
class StoredData:
    """What delivery reads for one recipient: bytes, and whether a copy must be rendered from them.

    A queue written before copies were made at delivery holds finished per-recipient copies
    (``recipients.data``); those are delivered as they are."""

    data: bytes
    render: bool


def _due(row: Sequence[Any]) -> DueRecipient:
    """A :class:`DueRecipient` from a row of (recipient and message columns..., msg_class)."""
    queue_id, index, address, attempts, account, mail_from, created_at, list_name, value = row
    return DueRecipient(
        queue_id, index, address, attempts, account, mail_from, created_at, list_name, _class_of(value)
    )


def _class_of(value: str) -> MessageClass:
    """The stored class; one this version does not know is taken as bulk, which applies every rule."""
    try:
        return MessageClass(value)
    except ValueError:
        return MessageClass.BULK


@dataclass(frozen=True, slots=True)
class RecipientRow:
    queue_id: str
    index: int
    address: str
    state: str
    attempts: int
    next_attempt: float
    updated_at: float
    last_reply: str | None


@dataclass(frozen=True, slots=True)
class MessageRow:
    queue_id: str
    account: str
    mail_from: str
    list_name: str | None
    created_at: float
    size: int
    recipients: tuple[RecipientRow, ...]
    msg_class: MessageClass = MessageClass.BULK


class Action(StrEnum):
    """What an operator does to recipients from the command line (Postfix's postsuper/postqueue)."""

    HOLD = "hold"
    RELEASE = "release"
    RETRY = "retry"
    DROP = "drop"


class View(StrEnum):
    """The states ``relayd queue list`` shows, as an operator thinks of them (Postfix's queues).

    ``deferred``: queued, tried before, waiting for its next attempt; ``active``: queued and due now or
    never tried; ``held``: kept until released; ``done``: delivered, failed, expired or dropped. The
    states on disk (:class:`State`) are views of their own."""

    PENDING = "pending"  # every unfinished recipient: the default
    DEFERRED = "deferred"
    ACTIVE = "active"
    HELD = "held"
    DONE = "done"
    QUEUED = "queued"
    DELIVERED = "delivered"
    FAILED = "failed"
    EXPIRED = "expired"
    DROPPED = "dropped"


#: the SQL condition of each view; ``?`` is the current time
_VIEW_SQL: dict[View, tuple[str, int]] = {
    View.PENDING: ("r.state IN ('queued', 'held')", 0),
    View.DEFERRED: ("r.state = 'queued' AND r.attempts > 0 AND r.next_attempt > ?", 1),
    View.ACTIVE: ("r.state = 'queued' AND (r.attempts = 0 OR r.next_attempt <= ?)", 1),
    View.HELD: ("r.state = 'held'", 0),
    View.DONE: ("r.state NOT IN ('queued', 'held')", 0),
    View.QUEUED: ("r.state = 'queued'", 0),
    View.DELIVERED: ("r.state = 'delivered'", 0),
    View.FAILED: ("r.state = 'failed'", 0),
    View.EXPIRED: ("r.state = 'expired'", 0),
    View.DROPPED: ("r.state = 'dropped'", 0),
}

#: the part of a recipient address after its last ``@``, lower-cased (rtrim strips every character but
#: ``@`` from the right: linear in the address, which RCPT bounds)
_RCPT_DOMAIN = "lower(substr(r.address, length(rtrim(r.address, replace(r.address, '@', ''))) + 1))"

#: qshape's age buckets in minutes: a recipient counts in the first bucket its message's age is within,
#: or in the last one (older than all of them)
AGE_BUCKETS = (5, 10, 20, 40, 80, 160, 320, 640, 1280)


@dataclass(frozen=True, slots=True)
class Selection:
    """Which recipients an operator means: every criterion given must match. Nothing given selects every
    recipient (the command line refuses that for hold, release and drop)."""

    queue_ids: tuple[str, ...] = ()
    domain: str | None = None
    account: str | None = None
    recipient: str | None = None
    sender: str | None = None
    created_before: float | None = None

    def sql(self) -> tuple[str, list[Any]]:
        """`` AND ...`` conditions over ``recipients r JOIN messages m``, and their parameters."""
        parts: list[str] = []
        params: list[Any] = []
        if self.queue_ids:
            parts.append(f"r.msg_id IN ({', '.join('?' * len(self.queue_ids))})")
            params.extend(self.queue_ids)
        if self.domain is not None:
            parts.append(f"{_RCPT_DOMAIN} = ?")
            params.append(self.domain.lower().rstrip("."))
        if self.account is not None:
            parts.append("m.account = ?")
            params.append(self.account)
        if self.recipient is not None:
            parts.append("lower(r.address) = ?")
            params.append(self.recipient.lower())
        if self.sender is not None:
            parts.append("lower(m.mail_from) = ?")
            params.append(self.sender.lower())
        if self.created_before is not None:
            parts.append("m.created_at < ?")
            params.append(self.created_before)
        return "".join(f" AND {p}" for p in parts), params


@dataclass(frozen=True, slots=True)
class Affected:
    """A recipient an operator's action selected; ``changed`` False: left as it was (a release of a
    recipient the suspension of its account holds)."""

    queue_id: str
    index: int
    address: str
    account: str
    held_by: str | None
    changed: bool


@dataclass(frozen=True, slots=True)
class QueueEntry:
    """One recipient with its message's envelope: a row of ``relayd queue list``."""

    queue_id: str
    index: int
    address: str
    state: str
    attempts: int
    next_attempt: float
    updated_at: float
    last_reply: str | None
    held_by: str | None
    account: str
    mail_from: str
    list_name: str | None
    created_at: float
    size: int


#: per action: which recipients it may change, and what it sets (``?``: the current time)
_ACTION_SQL: dict[Action, tuple[str, str, int]] = {
    Action.HOLD: (
        "(r.state = 'queued' OR (r.state = 'held' AND COALESCE(r.held_by, 'suspension') <> 'operator'))",
        "state = 'held', held_by = 'operator', updated_at = ?",
        1,
    ),
    Action.RELEASE: (
        "r.state = 'held'",
        "state = 'queued', held_by = NULL, next_attempt = ?, updated_at = ?",
        2,
    ),
    Action.RETRY: ("r.state = 'queued' AND r.next_attempt > ?", "next_attempt = ?", 1),
    Action.DROP: (
        "r.state IN ('queued', 'held')",
        "state = 'dropped', held_by = NULL, last_reply = 'dropped by operator', updated_at = ?, data = NULL",
        1,
    ),
}


def _operate(action: Action, selection: Selection, now: float, db: sqlite3.Connection) -> list[Affected]:
    """Select and change in the caller's write transaction (see :meth:`QueueStore.operate`)."""
    which, sets, n_now = _ACTION_SQL[action]
    where, params = selection.sql()
    rows = db.execute(
        "SELECT r.msg_id, r.idx, r.address, m.account, r.held_by FROM recipients r "
        f"JOIN messages m ON m.id = r.msg_id WHERE {which}{where} ORDER BY r.msg_id, r.idx",
        [now, *params] if action is Action.RETRY else params,
    ).fetchall()
    out = [
        Affected(q, i, a, acct, held, action is not Action.RELEASE or held == "operator")
        for q, i, a, acct, held in rows
    ]
    change = [(x.queue_id, x.index) for x in out if x.changed]
    db.executemany(
        f"UPDATE recipients SET {sets} WHERE msg_id = ? AND idx = ?",
        [(*[now] * n_now, q, i) for q, i in change],
    )
    if action is Action.DROP:
        db.executemany(_FREE_DATA, [(q, q) for q in {q for q, _ in change}])
    return out


@dataclass(slots=True)
class _Op:
    """One statement of a write."""

    sql: str
    params: Sequence[Any] | Sequence[Sequence[Any]]
    many: bool = False
    touched: str | None = None  # message id whose data may be freed after this op


_FREE_DATA = (
    "UPDATE messages SET data = NULL WHERE id = ? AND data IS NOT NULL AND NOT EXISTS "
    "(SELECT 1 FROM recipients WHERE msg_id = ? AND state IN ('queued', 'held'))"
)


def _apply(ops: list[_Op], db: sqlite3.Connection) -> int:
    """One caller's statements (in the writer's shared transaction); the last one's row count."""
    rowcount = 0
    touched: set[str] = set()
    for op in ops:
        cur = db.executemany(op.sql, op.params) if op.many else db.execute(op.sql, op.params)
        rowcount = cur.rowcount
        if op.touched:
            touched.add(op.touched)
    if touched:
        db.executemany(_FREE_DATA, [(t, t) for t in touched])
    return rowcount


def _storage_error(exc: Exception) -> StorageError:
    error = (InsufficientStorage if _is_full(exc) else StorageError)(f"queue write failed: {exc}")
    error.__cause__ = exc
    return error


class QueueStore:
    """Async access to the queue database: a group-committing writer (relayd.store.sqlitewriter) plus inline
    reads. Reads are short indexed lookups in WAL mode (readers never wait for the writer) and run on the
    loop thread.
    """

    def __init__(self, path: Path, *, batch_limit: int = 512, outcomes_only: bool = False) -> None:
        self.path = path
        self._batch_limit = batch_limit
        #: a shard's delivery process writes only attempt outcomes, and holds the write lock that the
        #: shard's submission process needs for its next ``250`` as briefly as it can:
        #: ``synchronous=NORMAL``, a commit does not wait for an fsync. After a power loss (not a crash)
        #: its last outcomes may be gone and those recipients are delivered once more: at-least-once, as
        #: the queue promises anyway. Every message is still committed with ``FULL`` (and that fsync
        #: writes out the outcomes before it too).
        self._synchronous = "NORMAL" if outcomes_only else "FULL"
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
            error=_storage_error,
            lock_timeout=_LOCK_TIMEOUT,
            batch_limit=self._batch_limit,
        )
        self._writer.start()

    def _connect_writer(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self._synchronous}")
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

    async def _submit(self, ops: list[_Op]) -> int:
        """Commit ``ops`` (together, in one transaction with whatever else is waiting); the last op's row
        count."""
        if self._writer is None:
            raise StorageError("queue writer is not running")
        return await self._writer.run(functools.partial(_apply, ops))

    async def enqueue(self, msg: NewMessage, *, held: bool = False, min_free: int = 0) -> None:
        """Store ``msg`` durably; returns once committed. Raises StorageError, or InsufficientStorage when
        less than ``min_free`` bytes plus the message would be left on the queue's filesystem."""
        now = time.time()
        state = State.HELD if held else State.QUEUED
        if min_free > 0:
            size = len(msg.data)
            try:
                free = free_bytes(self.path.parent)
            except OSError as exc:
                raise StorageError(f"cannot stat the queue's filesystem: {exc}") from exc
            if free < min_free + size:
                raise InsufficientStorage(f"{free} bytes free on the queue filesystem, {min_free} kept back")
        await self._submit(
            [
                _Op(
                    "INSERT INTO messages (id, account, mail_from, list_name, created_at, size, data, "
                    "render, msg_class) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        msg.queue_id,
                        msg.account,
                        msg.mail_from,
                        msg.list_name,
                        now,
                        len(msg.data),
                        msg.data,
                        int(msg.render),
                        msg.msg_class.value,
                    ),
                ),
                _Op(
                    "INSERT INTO recipients (msg_id, idx, address, state, attempts, next_attempt, "
                    "updated_at, account) VALUES (?, ?, ?, ?, 0, ?, ?, ?)",
                    [
                        (msg.queue_id, i, rcpt, state, now, now, msg.account)
                        for i, rcpt in enumerate(msg.recipients)
                    ],
                    many=True,
                ),
            ]
        )

    async def finish(self, queue_id: str, index: int, state: State, reply: str, attempts: int) -> None:
        """Move a recipient to a final state (delivered, failed, expired). A recipient held while its
        attempt was in flight takes the outcome as well: the attempt happened."""
        assert state in FINAL_STATES
        await self._submit(
            [
                _Op(
                    "UPDATE recipients SET state = ?, last_reply = ?, attempts = ?, updated_at = ?, "
                    "data = NULL, held_by = NULL "
                    "WHERE msg_id = ? AND idx = ? AND state IN ('queued', 'held')",
                    (state, reply, attempts, time.time(), queue_id, index),
                    touched=queue_id,
                )
            ]
        )

    async def defer(self, queue_id: str, index: int, next_attempt: float, reply: str, attempts: int) -> None:
        """Record a failed attempt and when to try again; a recipient held meanwhile stays held (the
        release makes it due)."""
        await self._submit(
            [
                _Op(
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
                _Op(
                    "UPDATE recipients SET next_attempt = ? "
                    "WHERE msg_id = ? AND idx = ? AND state = 'queued'",
                    (next_attempt, queue_id, index),
                )
            ]
        )

    async def retry_now(self, queue_id: str | None = None) -> int:
        """Make deferred recipients due now (all, or of one message). Returns how many."""
        return await self._update_count(
            "UPDATE recipients SET next_attempt = ? WHERE state = 'queued'"
            + (" AND msg_id = ?" if queue_id else ""),
            (time.time(), queue_id) if queue_id else (time.time(),),
        )

    async def drop(self, queue_id: str) -> int:
        """Drop every unfinished recipient of a message (the operator's decision; recorded as 'dropped')."""
        return await self._update_count(
            "UPDATE recipients SET state = 'dropped', last_reply = 'dropped by operator', updated_at = ?, "
            "data = NULL WHERE msg_id = ? AND state IN ('queued', 'held')",
            (time.time(), queue_id),
            touched=queue_id,
        )

    async def drop_recipient(self, queue_id: str, index: int, reason: str) -> None:
        """Drop one recipient (suppressed after it was queued, unsubscribed, ...)."""
        await self._submit(
            [
                _Op(
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
        return await self._submit_fn(functools.partial(_operate, action, selection, time.time()))

    async def _submit_fn(self, fn: Callable[[sqlite3.Connection], list[Affected]]) -> list[Affected]:
        if self._writer is None:
            raise StorageError("queue writer is not running")
        return await self._writer.run(fn)

    async def _update_count(self, sql: str, params: Sequence[Any], touched: str | None = None) -> int:
        return await self._submit([_Op(sql, params, touched=touched)])

    async def purge(self, older_than: float) -> None:
        """Forget finished recipients and their messages after ``keep_finished``."""
        await self._submit(
            [
                _Op(
                    "DELETE FROM recipients WHERE state NOT IN ('queued', 'held') AND updated_at < ?",
                    (older_than,),
                ),
                _Op(
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
        self, now: float, limit: int, *, per_account: Callable[[str], int] | None = None
    ) -> list[DueRecipient]:
        """The recipients whose next attempt is due, fair between accounts; ids and envelope, never bodies.

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
        rows = await self._fetch("SELECT data, render FROM messages WHERE id = ?", (queue_id,))
        if not rows or rows[0][0] is None:
            return None
        return StoredData(bytes(rows[0][0]), bool(rows[0][1]))

    async def recipient_data(self, queue_id: str, index: int) -> StoredData | None:
        """What to deliver to one recipient: its own finished copy if an older relayd stored one, else
        the message (with whether a copy is to be rendered from it)."""
        rows = await self._fetch(
            "SELECT r.data, m.data, m.render FROM recipients r JOIN messages m ON m.id = r.msg_id "
            "WHERE r.msg_id = ? AND r.idx = ?",
            (queue_id, index),
        )
        if not rows:
            return None
        own, shared, render = rows[0]
        if own is not None:
            return StoredData(bytes(own), False)
        return StoredData(bytes(shared), bool(render)) if shared is not None else None

    async def show(self, queue_id: str) -> MessageRow | None:
        msgs = await self._fetch(
            "SELECT id, account, mail_from, list_name, created_at, size, msg_class FROM messages "
            "WHERE id = ?",
            (queue_id,),
        )
        if not msgs:
            return None
        rcpts = await self._fetch(
            "SELECT msg_id, idx, address, state, attempts, next_attempt, updated_at, last_reply "
            "FROM recipients WHERE msg_id = ? ORDER BY idx",
            (queue_id,),
        )
        qid, account, mail_from, list_name, created_at, size, value = msgs[0]
        return MessageRow(
            qid,
            account,
            mail_from,
            list_name,
            created_at,
            size,
            tuple(RecipientRow(*r) for r in rcpts),
            _class_of(value),
        )

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
        cond, n_now = _VIEW_SQL[view]
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
            f"SELECT dom, deferred, {bucket} AS bucket, COUNT(*) FROM (SELECT {_RCPT_DOMAIN} AS dom, "
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
