"""Schema version 8: the postmaster's inbox and the DMARC aggregate report counts.

Why in the store: mail to abuse@ and postmaster@ must reach a person (RFC 2142), and the person reads it
with ``relayd inbox`` on any node; the DMARC counts of every node add up to one summary per domain.

``inbox`` keeps one row per message kept for a person: its raw bytes (capped by :mod:`relayd.desk.inbox`,
``truncated`` says so), what a listing shows (kind, From, Subject, Date) and its state (``open`` or
``done``). ``source`` (the client address that sent it) and ``received_at`` are indexed together, for the
hourly cap per source that keeps a flood from filling the disk. Times are microseconds since the epoch
like every other table.

``dmarc_reports`` names each aggregate report once (reporter, report id, domain): a report mailed again is
recognised and not counted twice. ``dmarc_counts`` holds the report's rows added up per (domain, UTC day of
the report's begin, reporter, report, source IP); days are days since the epoch, like TLS reporting's.
"""

from __future__ import annotations

from . import Migration

MIGRATION = Migration(
    version=8,
    name="postmaster_desk",
    sqlite=(
        "CREATE TABLE inbox ("
        " id INTEGER PRIMARY KEY AUTOINCREMENT, received_at INTEGER NOT NULL, kind TEXT NOT NULL,"
        " source TEXT NOT NULL, mail_from TEXT NOT NULL, from_header TEXT NOT NULL, subject TEXT NOT NULL,"
        " date_header TEXT NOT NULL, note TEXT NOT NULL, size INTEGER NOT NULL, truncated INTEGER NOT NULL,"
        " state TEXT NOT NULL, done_at INTEGER, raw BLOB NOT NULL)",
        "CREATE INDEX inbox_received ON inbox (received_at)",
        "CREATE INDEX inbox_source ON inbox (source, received_at)",
        "CREATE INDEX inbox_open ON inbox (state) WHERE state = 'open'",
        "CREATE TABLE dmarc_reports ("
        " org TEXT NOT NULL, report_id TEXT NOT NULL, domain TEXT NOT NULL, day INTEGER NOT NULL,"
        " received_at INTEGER NOT NULL, PRIMARY KEY (org, report_id, domain)"
        ") WITHOUT ROWID",
        "CREATE INDEX dmarc_reports_day ON dmarc_reports (day)",
        "CREATE TABLE dmarc_counts ("
        " domain TEXT NOT NULL, day INTEGER NOT NULL, org TEXT NOT NULL, report_id TEXT NOT NULL,"
        " source_ip TEXT NOT NULL, total INTEGER NOT NULL, spf_pass INTEGER NOT NULL,"
        " dkim_pass INTEGER NOT NULL, spf_aligned INTEGER NOT NULL, dkim_aligned INTEGER NOT NULL,"
        " dmarc_pass INTEGER NOT NULL,"
        " quarantined INTEGER NOT NULL, rejected INTEGER NOT NULL,"
        " PRIMARY KEY (domain, day, org, report_id, source_ip)"
        ") WITHOUT ROWID",
        "CREATE INDEX dmarc_counts_day ON dmarc_counts (day)",
    ),
    postgresql=(
        "CREATE TABLE inbox ("
        " id BIGSERIAL PRIMARY KEY, received_at BIGINT NOT NULL, kind TEXT NOT NULL,"
        " source TEXT NOT NULL, mail_from TEXT NOT NULL, from_header TEXT NOT NULL, subject TEXT NOT NULL,"
        " date_header TEXT NOT NULL, note TEXT NOT NULL, size BIGINT NOT NULL, truncated BOOLEAN NOT NULL,"
        " state TEXT NOT NULL, done_at BIGINT, raw BYTEA NOT NULL)",
        "CREATE INDEX inbox_received ON inbox (received_at)",
        "CREATE INDEX inbox_source ON inbox (source, received_at)",
        "CREATE INDEX inbox_open ON inbox (state) WHERE state = 'open'",
        "CREATE TABLE dmarc_reports ("
        " org TEXT NOT NULL, report_id TEXT NOT NULL, domain TEXT NOT NULL, day INTEGER NOT NULL,"
        " received_at BIGINT NOT NULL, PRIMARY KEY (org, report_id, domain))",
        "CREATE INDEX dmarc_reports_day ON dmarc_reports (day)",
        "CREATE TABLE dmarc_counts ("
        " domain TEXT NOT NULL, day INTEGER NOT NULL, org TEXT NOT NULL, report_id TEXT NOT NULL,"
        " source_ip TEXT NOT NULL, total BIGINT NOT NULL, spf_pass BIGINT NOT NULL,"
        " dkim_pass BIGINT NOT NULL, spf_aligned BIGINT NOT NULL, dkim_aligned BIGINT NOT NULL,"
        " dmarc_pass BIGINT NOT NULL,"
        " quarantined BIGINT NOT NULL, rejected BIGINT NOT NULL,"
        " PRIMARY KEY (domain, day, org, report_id, source_ip))",
        "CREATE INDEX dmarc_counts_day ON dmarc_counts (day)",
    ),
)
