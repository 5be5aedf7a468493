"""Schema version 2: the sent ledger.

Every accepted recipient gets a row ``(queue_id, idx) -> (account, list, address)``. Tokens (VERP return
paths, ``X-Relayd-ID``, unsubscribe links) carry only ``queue_id-idx-mac``, so this is how a bounce, a
complaint or an unsubscribe click weeks later is tied to an account, a list and an address. It lives in the
store, not in a node's queue, because the click may reach any node and the queue forgets finished mail.
"""

from __future__ import annotations

from . import Migration

MIGRATION = Migration(
    version=2,
    name="sent_ledger",
    sqlite=(
        """
        CREATE TABLE sent (
            queue_id   TEXT    NOT NULL,
            idx        INTEGER NOT NULL,
            account    TEXT    NOT NULL,
            list_name  TEXT    NOT NULL DEFAULT '',
            address    TEXT    NOT NULL,
            sent_at    INTEGER NOT NULL,
            PRIMARY KEY (queue_id, idx)
        ) WITHOUT ROWID
        """,
        "CREATE INDEX sent_sent_at ON sent (sent_at)",
    ),
    postgresql=(
        """
        CREATE TABLE sent (
            queue_id   TEXT    COLLATE "C" NOT NULL,
            idx        INTEGER NOT NULL,
            account    TEXT    NOT NULL,
            list_name  TEXT    NOT NULL DEFAULT '',
            address    TEXT    NOT NULL,
            sent_at    BIGINT  NOT NULL,
            PRIMARY KEY (queue_id, idx)
        )
        """,
        "CREATE INDEX sent_sent_at ON sent (sent_at)",
    ),
)
