"""The durable queue: one SQLite database in WAL mode with ``synchronous=FULL``.

Why SQLite and not a file per message (Postfix, Mailman): one transaction stores the message and all its
recipients atomically, so a crash leaves either the whole message or nothing, and many sessions can share
one fsync (group commit): the writer (relayd.store.sqlitewriter) takes every write that is waiting, runs them
in one transaction and commits once. A session gets its ``250`` only after the commit that holds its
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

Modules: :mod:`~relayd.queue.store.models` (what is stored and read back), :mod:`~relayd.queue.store.writes`
(the statements of each write), :mod:`~relayd.queue.store.migrations` (the numbered schema versions) and
:mod:`~relayd.queue.store.queuestore` (:class:`QueueStore`).

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

from relayd.queue.store.migrations import migrate
from relayd.queue.store.migrations.v0001_initial import SCHEMA
from relayd.queue.store.models import (
    AGE_BUCKETS,
    FINAL_STATES,
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
)
from relayd.queue.store.queuestore import QueueStore, message_row
from relayd.queue.store.writes import InsufficientStorage, free_bytes

__all__ = [
    "AGE_BUCKETS",
    "FINAL_STATES",
    "SCHEMA",
    "Action",
    "Affected",
    "InsufficientStorage",
    "MessageRow",
    "NewMessage",
    "QueueEntry",
    "QueueStore",
    "RecipientRow",
    "Selection",
    "State",
    "StoredData",
    "View",
    "free_bytes",
    "message_row",
    "migrate",
]
