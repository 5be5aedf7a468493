"""Schema version 5: consent records and the confirmation mails sent (double opt-in).

``consent`` holds one row per (account, list, address): the proof that the address asked for that list's
mail (seeds/003 "double opt-in with proof", seeds/004 "date, time, IP of the sign-up"). It is keyed and
clustered the way the consent rule reads it, per message: one account and list, a batch of addresses. A
second index on ``address`` serves ``relayd consent show ADDRESS`` (an operator answering "prove that this
person asked for our mail") without a scan. ``user_agent`` may be NULL (imports rarely have one); ``ip`` is
``''`` when unknown; ``evidence`` is a JSON object.

``optin_sent`` remembers, per (account, list, address), when the last confirmation mail was accepted: at most
one per 24 h, so the ``X-Relayd-Optin`` exemption from ``require_consent`` can't be used to mail someone who
never confirms over and over. One row per key (updated in place), so the table stays as small as the set of
addresses with a pending sign-up; ``sent_at`` is indexed for pruning.

Times are INTEGER (BIGINT) microseconds since the epoch, like every table since version 1.
"""

from __future__ import annotations

from . import Migration

MIGRATION = Migration(
    version=5,
    name="consent",
    sqlite=(
        """
        CREATE TABLE consent (
            account       TEXT    NOT NULL,
            list_name     TEXT    NOT NULL,
            address       TEXT    NOT NULL,
            confirmed_at  INTEGER NOT NULL,
            ip            TEXT    NOT NULL DEFAULT '',
            user_agent    TEXT,
            source        TEXT    NOT NULL DEFAULT '',
            evidence      TEXT    NOT NULL DEFAULT '{}',
            PRIMARY KEY (account, list_name, address)
        ) WITHOUT ROWID
        """,
        "CREATE INDEX consent_address ON consent (address)",
        """
        CREATE TABLE optin_sent (
            account     TEXT    NOT NULL,
            list_name   TEXT    NOT NULL,
            address     TEXT    NOT NULL,
            sent_at     INTEGER NOT NULL,
            PRIMARY KEY (account, list_name, address)
        ) WITHOUT ROWID
        """,
        "CREATE INDEX optin_sent_sent_at ON optin_sent (sent_at)",
    ),
    postgresql=(
        """
        CREATE TABLE consent (
            account       TEXT    NOT NULL,
            list_name     TEXT    NOT NULL,
            address       TEXT    NOT NULL,
            confirmed_at  BIGINT  NOT NULL,
            ip            TEXT    NOT NULL DEFAULT '',
            user_agent    TEXT,
            source        TEXT    NOT NULL DEFAULT '',
            evidence      TEXT    NOT NULL DEFAULT '{}',
            PRIMARY KEY (account, list_name, address)
        )
        """,
        "CREATE INDEX consent_address ON consent (address)",
        """
        CREATE TABLE optin_sent (
            account     TEXT    NOT NULL,
            list_name   TEXT    NOT NULL,
            address     TEXT    NOT NULL,
            sent_at     BIGINT  NOT NULL,
            PRIMARY KEY (account, list_name, address)
        )
        """,
        "CREATE INDEX optin_sent_sent_at ON optin_sent (sent_at)",
    ),
)
