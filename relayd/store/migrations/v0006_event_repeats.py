"""Schema version 6: a repeated report is one event with a count.

Why: the account rates (``relayd.feedback.reputation``) count events through ``event_hourly``, which the
insert
triggers of version 3 keep. If every copy of a report is a row, one genuine DSN replayed a hundred times
counts a hundred hard bounces, and a forger floods the log with rows. So an event that is *about one
thing* carries a key (``hard_bounce:<queue id>-<index>``, ``unattributed:dsn:<source>:<hour>``), unique
among events: writing it again adds to ``count`` and moves ``last_seen`` instead of adding a row. An
upsert that updates is not an insert, so the roll-up triggers (SQLite's row-level ``AFTER INSERT`` and
PostgreSQL's statement-level one over the ``NEW TABLE`` of inserted rows) count each key once: the rates
count distinct recipient copies. Events without a key (most of them) are appended as before.

The unique index is partial (``dedup_key IS NOT NULL``), so unkeyed events cost it nothing.
"""

from __future__ import annotations

from . import Migration

MIGRATION = Migration(
    version=6,
    name="event_repeats",
    sqlite=(
        "ALTER TABLE events ADD COLUMN dedup_key TEXT",
        "ALTER TABLE events ADD COLUMN count INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE events ADD COLUMN last_seen INTEGER",
        "CREATE UNIQUE INDEX events_dedup_key ON events (dedup_key) WHERE dedup_key IS NOT NULL",
    ),
    postgresql=(
        "ALTER TABLE events ADD COLUMN dedup_key TEXT",
        "ALTER TABLE events ADD COLUMN count BIGINT NOT NULL DEFAULT 1",
        "ALTER TABLE events ADD COLUMN last_seen BIGINT",
        "CREATE UNIQUE INDEX events_dedup_key ON events (dedup_key) WHERE dedup_key IS NOT NULL",
    ),
)
