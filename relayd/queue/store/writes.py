"""The statements of the queue's writes, run in the group-committing writer's transaction.

Each function here takes the writer's connection last (relayd.store.sqlitewriter runs it with
``functools.partial``), so one transaction may hold many callers' writes; what a write changes is decided
inside that transaction, never from a read made before it.

Failure: sqlite3 and OS errors become :class:`relayd.core.errors.StorageError` (:func:`storage_error`), a
full disk :class:`InsufficientStorage`.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relayd.core.errors import StorageError
from relayd.queue.store.models import Action, Affected, Selection


class InsufficientStorage(StorageError):
    """The queue's filesystem is (nearly) full: refuse new mail with ``452 4.3.1`` (RFC 3463 §3.4) until
    space returns. Transient by nature: the client keeps its message and tries again."""


def free_bytes(path: Path) -> int:
    """Bytes available to us on the filesystem holding ``path`` (``f_bavail``: without root's reserve)."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def is_full(exc: BaseException) -> bool:
    """SQLITE_FULL ("database or disk is full") or ENOSPC/EDQUOT from the OS."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return code is not None and code & 0xFF == sqlite3.SQLITE_FULL  # primary code of an extended one
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


#: per action: which recipients it may change, and what it sets (``?``: the current time)
ACTION_SQL: dict[Action, tuple[str, str, int]] = {
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


def operate(action: Action, selection: Selection, now: float, db: sqlite3.Connection) -> list[Affected]:
    """Select and change in the caller's write transaction (see :meth:`QueueStore.operate`)."""
    which, sets, n_now = ACTION_SQL[action]
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
        db.executemany(FREE_DATA, [(q, q) for q in {q for q, _ in change}])
    return out


@dataclass(slots=True)
class Op:
    """One statement of a write."""

    sql: str
    params: Sequence[Any] | Sequence[Sequence[Any]]
    many: bool = False
    touched: str | None = None  # message id whose data may be freed after this op
    #: written in order into the ``body`` of the ``messages`` row this op (an INSERT with a ``zeroblob`` of
    #: their total length there) has just made, a piece at a time: SQLite never holds a copy of the whole
    #: (migration v0007)
    body: tuple[bytes, ...] | None = None


FREE_DATA = (
    "UPDATE messages SET data = NULL, body = NULL WHERE id = ? AND data IS NOT NULL AND NOT EXISTS "
    "(SELECT 1 FROM recipients WHERE msg_id = ? AND state IN ('queued', 'held'))"
)

#: octets per write into a blob
_PIECE = 1 << 20


def apply_ops(ops: list[Op], db: sqlite3.Connection) -> int:
    """One caller's statements (in the writer's shared transaction); the last one's row count."""
    rowcount = 0
    touched: set[str] = set()
    for op in ops:
        cur = db.executemany(op.sql, op.params) if op.many else db.execute(op.sql, op.params)
        rowcount = cur.rowcount
        if op.body is not None:
            assert cur.lastrowid is not None  # an INSERT into messages, a rowid table
            with db.blobopen("messages", "body", cur.lastrowid) as blob:
                for piece in op.body:
                    view = memoryview(piece)
                    for at in range(0, len(view), _PIECE):
                        blob.write(view[at : at + _PIECE])
        if op.touched:
            touched.add(op.touched)
    if touched:
        db.executemany(FREE_DATA, [(t, t) for t in touched])
    return rowcount


def storage_error(exc: Exception) -> StorageError:
    """The writer's error for a failed batch: InsufficientStorage when the disk is full, so the
    submission listener answers ``452`` rather than ``451``."""
    error = (InsufficientStorage if is_full(exc) else StorageError)(f"queue write failed: {exc}")
    error.__cause__ = exc
    return error
