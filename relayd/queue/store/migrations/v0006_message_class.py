"""Schema version 6: ``messages.msg_class``, bulk or transactional (relayd.core.msgclass).

The dequeue check and the copy made at delivery depend on it; mail queued before classes existed is bulk.
"""

from __future__ import annotations

from . import Migration

MIGRATION = Migration(
    version=6,
    name="message_class",
    sqlite=(),
    column=("messages", "msg_class", "TEXT NOT NULL DEFAULT 'bulk'"),
)
