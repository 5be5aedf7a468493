"""Schema version 1: suppression, send log, account state, events.

Representation choices (shared by all backends, so the SQL in the backends stays the same):

* Times are INTEGER microseconds since the Unix epoch, UTC: compact (8 bytes against 27 for ISO text on
  5-10 M suppression rows), exact, and compared as plain integers.
  (``datetime(created_at / 1000000, 'unixepoch')`` reads them in the sqlite3 shell.)
* Absent account/list is ``''``, not NULL: a PRIMARY KEY/UNIQUE over columns that may be NULL does not
  make duplicates conflict (NULLs are distinct in SQL), and ``ON CONFLICT`` upserts need that conflict.
* ``suppression`` is keyed and clustered by (address, scope, account, list_name): ``check`` looks up a
  batch of addresses and finds all scopes of one address on one or two adjacent b-tree pages. SQLite's
  ``WITHOUT ROWID`` makes the primary key the table itself, so there is one b-tree, not table + index
  (measured by ``bench/suppression.py``). Most rows are global; a small partial index serves listing
  by account.
* ``send_log`` holds one row per (account, list, address, instant) with a count ``n``, clustered the way
  cap checks read it; a second index on ``sent_at`` lets ``prune`` delete old rows without a full scan.
"""

from __future__ import annotations

from . import Migration

MIGRATION = Migration(
    version=1,
    name="initial",
    sqlite=(
        """
        CREATE TABLE suppression (
            address     TEXT    NOT NULL,
            scope       TEXT    NOT NULL CHECK (scope IN ('global', 'account', 'list')),
            account     TEXT    NOT NULL DEFAULT '',
            list_name   TEXT    NOT NULL DEFAULT '',
            reason      TEXT    NOT NULL,
            source      TEXT    NOT NULL DEFAULT '',
            created_at  INTEGER NOT NULL,
            expires_at  INTEGER,
            PRIMARY KEY (address, scope, account, list_name)
        ) WITHOUT ROWID
        """,
        "CREATE INDEX suppression_account ON suppression (account, list_name) WHERE scope <> 'global'",
        "CREATE INDEX suppression_expires ON suppression (expires_at) WHERE expires_at IS NOT NULL",
        """
        CREATE TABLE send_log (
            account     TEXT    NOT NULL,
            list_name   TEXT    NOT NULL DEFAULT '',
            address     TEXT    NOT NULL,
            sent_at     INTEGER NOT NULL,
            n           INTEGER NOT NULL,
            PRIMARY KEY (account, list_name, address, sent_at)
        ) WITHOUT ROWID
        """,
        "CREATE INDEX send_log_sent_at ON send_log (sent_at)",
        """
        CREATE TABLE account_state (
            account     TEXT    PRIMARY KEY,
            suspended   INTEGER NOT NULL,
            reason      TEXT,
            details     TEXT    NOT NULL DEFAULT '',
            since       INTEGER NOT NULL
        )
        """,
        """
        CREATE TABLE events (
            id          INTEGER PRIMARY KEY,
            at          INTEGER NOT NULL,
            kind        TEXT    NOT NULL,
            account     TEXT,
            list_name   TEXT,
            address     TEXT,
            reason      TEXT,
            queue_id    TEXT,
            evidence    TEXT    NOT NULL DEFAULT '{}'
        )
        """,
        "CREATE INDEX events_at ON events (at)",
        "CREATE INDEX events_account_at ON events (account, at)",
    ),
    postgresql=(
        # Same shapes as SQLite: BIGINT microseconds, '' for no account/list. The key columns are
        # COLLATE "C" so that "ordered by key" (list, scan's keyset pages) is byte order on both backends,
        # and b-tree comparisons skip the locale. PostgreSQL has no clustered tables: the primary key
        # index serves `check`, the heap holds the rows.
        """
        CREATE TABLE suppression (
            address     TEXT    COLLATE "C" NOT NULL,
            scope       TEXT    COLLATE "C" NOT NULL CHECK (scope IN ('global', 'account', 'list')),
            account     TEXT    COLLATE "C" NOT NULL DEFAULT '',
            list_name   TEXT    COLLATE "C" NOT NULL DEFAULT '',
            reason      TEXT    NOT NULL,
            source      TEXT    NOT NULL DEFAULT '',
            created_at  BIGINT  NOT NULL,
            expires_at  BIGINT,
            PRIMARY KEY (address, scope, account, list_name)
        )
        """,
        "CREATE INDEX suppression_account ON suppression (account, list_name) WHERE scope <> 'global'",
        "CREATE INDEX suppression_expires ON suppression (expires_at) WHERE expires_at IS NOT NULL",
        """
        CREATE TABLE send_log (
            account     TEXT    COLLATE "C" NOT NULL,
            list_name   TEXT    COLLATE "C" NOT NULL DEFAULT '',
            address     TEXT    COLLATE "C" NOT NULL,
            sent_at     BIGINT  NOT NULL,
            n           INTEGER NOT NULL,
            PRIMARY KEY (account, list_name, address, sent_at)
        )
        """,
        "CREATE INDEX send_log_sent_at ON send_log (sent_at)",
        """
        CREATE TABLE account_state (
            account     TEXT    COLLATE "C" PRIMARY KEY,
            suspended   BOOLEAN NOT NULL,
            reason      TEXT,
            details     TEXT    NOT NULL DEFAULT '',
            since       BIGINT  NOT NULL
        )
        """,
        # Ids come from the identity sequence, but only while the inserting transaction holds the events
        # advisory lock (relayd.store.postgresql.connection), so they are handed out in commit order.
        """
        CREATE TABLE events (
            id          BIGINT  GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            at          BIGINT  NOT NULL,
            kind        TEXT    NOT NULL,
            account     TEXT,
            list_name   TEXT,
            address     TEXT,
            reason      TEXT,
            queue_id    TEXT,
            evidence    TEXT    NOT NULL DEFAULT '{}'
        )
        """,
        "CREATE INDEX events_at ON events (at)",
        "CREATE INDEX events_account_at ON events (account, at)",
    ),
)
