"""Schema version 3: ``recipients.account`` and its index, for fair queueing between accounts.

``recipients.account`` repeats ``messages.account`` so that each account's due rows are one index range
(see QueueStore.due). Rows written before it existed, or by another tool, get it filled in at every open
(relayd.queue.store.migrations.migrate), not only once.
"""

from __future__ import annotations

from . import Migration

MIGRATION = Migration(
    version=3,
    name="fair_queueing",
    sqlite=(
        "CREATE INDEX IF NOT EXISTS recipients_account ON recipients (account, next_attempt) "
        "WHERE state = 'queued'",
    ),
    column=("recipients", "account", "TEXT"),
)
