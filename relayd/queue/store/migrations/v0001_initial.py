"""Schema version 1: messages and their recipients, as the queue stood when versions began to be recorded.

Why one message row and a row per recipient: one transaction stores a message and all its recipients, so a
crash leaves the whole message or nothing; each recipient then moves through its states on its own. The
tables carry the columns versions 2 to 6 add (``IF NOT EXISTS``: an older file keeps its tables and gets
those columns from the later versions), so a new file is created in one step with the same schema as before
versions were recorded.
"""

from __future__ import annotations

from . import Migration

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

MIGRATION = Migration(
    version=1,
    name="initial",
    sqlite=tuple(s.strip() for s in SCHEMA.split(";") if s.strip()),
)
