"""Schema version 9: the tenants' API keys.

Why in the store: every node serves the API, so a key created with ``relayd account api-key create`` on
one node must work on all, and a revocation must hold everywhere at the next request.

One row per key: its public id (the primary key, looked up once per request), the account it acts for,
a name the operator gave it, the SHA-256 of the whole key as hex (never the key: a 256-bit random key
needs no slow hash, and a copy of the database then grants nothing), and when it was created and revoked
(microseconds since the epoch like every other table; ``revoked_at`` NULL while it is valid). Revoked keys
keep their row so the listing shows what existed.
"""

from __future__ import annotations

from . import Migration

MIGRATION = Migration(
    version=9,
    name="api_keys",
    sqlite=(
        "CREATE TABLE api_keys ("
        " key_id TEXT PRIMARY KEY, account TEXT NOT NULL, key_hash TEXT NOT NULL, name TEXT NOT NULL,"
        " created_at INTEGER NOT NULL, revoked_at INTEGER"
        ") WITHOUT ROWID",
        "CREATE INDEX api_keys_account ON api_keys (account, created_at)",
    ),
    postgresql=(
        "CREATE TABLE api_keys ("
        ' key_id TEXT COLLATE "C" PRIMARY KEY, account TEXT COLLATE "C" NOT NULL, key_hash TEXT NOT NULL,'
        " name TEXT NOT NULL, created_at BIGINT NOT NULL, revoked_at BIGINT)",
        "CREATE INDEX api_keys_account ON api_keys (account, created_at)",
    ),
)
