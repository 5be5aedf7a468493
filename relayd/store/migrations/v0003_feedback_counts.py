"""Schema version 3: hourly roll-ups and indexes for the feedback loop and account reputation.

Why roll-ups: an account's complaint and hard-bounce *rates* are judged after every complaint and bounce
(DESIGN.md thresholds), over a 30-day window. Counting the raw rows each time would read up to a month of a
bulk sender's ledger (millions of rows) per bounce. ``sent_hourly`` and ``event_hourly`` hold one row per
(account, hour) and (account, kind, reason, hour), so a 30-day count reads at most 720 rows per kind; the
first, partial hour of a window is counted exactly from the raw rows through the new indexes, so the
window is exact to the microsecond (which matters right after a reinstatement, see
``relayd.feedback.reputation``).

The roll-ups are kept by triggers, not by the Python code that writes ``sent`` and ``events``: every writer
(the daemon, the CLI, an import) keeps them right without knowing they exist, in the same transaction.
Pruning the raw rows does not touch the roll-ups (they are tiny: accounts x kinds x hours).

``events_address_kind_at`` serves the per-address soft-bounce count (``soft_bounce_limit`` within
``soft_bounce_window``); ``events_account_kind_at`` and ``sent_account_at`` the exact partial hour.
Existing rows are folded into the roll-ups here, so an upgraded database judges the same figures.
"""

from __future__ import annotations

from . import Migration

HOUR_US = 3_600_000_000

MIGRATION = Migration(
    version=3,
    name="feedback_counts",
    sqlite=(
        """
        CREATE TABLE sent_hourly (
            account  TEXT    NOT NULL,
            hour     INTEGER NOT NULL,
            n        INTEGER NOT NULL,
            PRIMARY KEY (account, hour)
        ) WITHOUT ROWID
        """,
        """
        CREATE TABLE event_hourly (
            account  TEXT    NOT NULL,
            kind     TEXT    NOT NULL,
            reason   TEXT    NOT NULL DEFAULT '',
            hour     INTEGER NOT NULL,
            n        INTEGER NOT NULL,
            PRIMARY KEY (account, kind, reason, hour)
        ) WITHOUT ROWID
        """,
        "CREATE INDEX sent_account_at ON sent (account, sent_at)",
        "CREATE INDEX events_account_kind_at ON events (account, kind, at)",
        "CREATE INDEX events_address_kind_at ON events (address, kind, at) WHERE address IS NOT NULL",
        f"""
        CREATE TRIGGER sent_hourly_count AFTER INSERT ON sent BEGIN
            INSERT INTO sent_hourly (account, hour, n) VALUES (NEW.account, NEW.sent_at / {HOUR_US}, 1)
            ON CONFLICT (account, hour) DO UPDATE SET n = n + 1;
        END
        """,
        f"""
        CREATE TRIGGER event_hourly_count AFTER INSERT ON events WHEN NEW.account IS NOT NULL BEGIN
            INSERT INTO event_hourly (account, kind, reason, hour, n)
            VALUES (NEW.account, NEW.kind, coalesce(NEW.reason, ''), NEW.at / {HOUR_US}, 1)
            ON CONFLICT (account, kind, reason, hour) DO UPDATE SET n = n + 1;
        END
        """,
        f"""
        INSERT INTO sent_hourly (account, hour, n)
        SELECT account, sent_at / {HOUR_US}, count(*) FROM sent GROUP BY 1, 2
        """,
        f"""
        INSERT INTO event_hourly (account, kind, reason, hour, n)
        SELECT account, kind, coalesce(reason, ''), at / {HOUR_US}, count(*) FROM events
        WHERE account IS NOT NULL GROUP BY 1, 2, 3, 4
        """,
    ),
    # PostgreSQL: statement-level triggers over the transition table, not one upsert per row: the backend
    # inserts a whole message (or a group commit of events) in one statement, and one grouped upsert then
    # touches each roll-up row once. ORDER BY makes every writer lock roll-up rows in the same order, so
    # two nodes committing ledgers of several accounts at once cannot deadlock. `SET search_path FROM
    # CURRENT` pins the functions to the schema they were created in (a store may live in its own schema).
    postgresql=(
        """
        CREATE TABLE sent_hourly (
            account  TEXT    NOT NULL,
            hour     BIGINT  NOT NULL,
            n        BIGINT  NOT NULL,
            PRIMARY KEY (account, hour)
        )
        """,
        """
        CREATE TABLE event_hourly (
            account  TEXT    NOT NULL,
            kind     TEXT    NOT NULL,
            reason   TEXT    NOT NULL DEFAULT '',
            hour     BIGINT  NOT NULL,
            n        BIGINT  NOT NULL,
            PRIMARY KEY (account, kind, reason, hour)
        )
        """,
        "CREATE INDEX sent_account_at ON sent (account, sent_at)",
        "CREATE INDEX events_account_kind_at ON events (account, kind, at)",
        "CREATE INDEX events_address_kind_at ON events (address, kind, at) WHERE address IS NOT NULL",
        f"""
        CREATE FUNCTION sent_hourly_count() RETURNS trigger LANGUAGE plpgsql
        SET search_path FROM CURRENT AS $$
        BEGIN
            INSERT INTO sent_hourly (account, hour, n)
            SELECT account, sent_at / {HOUR_US}, count(*) FROM new_rows GROUP BY 1, 2 ORDER BY 1, 2
            ON CONFLICT (account, hour) DO UPDATE SET n = sent_hourly.n + excluded.n;
            RETURN NULL;
        END
        $$
        """,
        """
        CREATE TRIGGER sent_hourly_count AFTER INSERT ON sent REFERENCING NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION sent_hourly_count()
        """,
        f"""
        CREATE FUNCTION event_hourly_count() RETURNS trigger LANGUAGE plpgsql
        SET search_path FROM CURRENT AS $$
        BEGIN
            INSERT INTO event_hourly (account, kind, reason, hour, n)
            SELECT account, kind, coalesce(reason, ''), at / {HOUR_US}, count(*) FROM new_rows
            WHERE account IS NOT NULL GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
            ON CONFLICT (account, kind, reason, hour) DO UPDATE SET n = event_hourly.n + excluded.n;
            RETURN NULL;
        END
        $$
        """,
        """
        CREATE TRIGGER event_hourly_count AFTER INSERT ON events REFERENCING NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION event_hourly_count()
        """,
        f"""
        INSERT INTO sent_hourly (account, hour, n)
        SELECT account, sent_at / {HOUR_US}, count(*) FROM sent GROUP BY 1, 2
        """,
        f"""
        INSERT INTO event_hourly (account, kind, reason, hour, n)
        SELECT account, kind, coalesce(reason, ''), at / {HOUR_US}, count(*) FROM events
        WHERE account IS NOT NULL GROUP BY 1, 2, 3, 4
        """,
    ),
)
