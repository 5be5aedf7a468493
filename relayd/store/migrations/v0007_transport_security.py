"""Schema version 7: the MTA-STS policy cache (RFC 8461 §5.1) and the TLS reporting counts (RFC 8460).

Why in the store: every node of a cluster delivers to the same domains, and a policy fetched by one is good
for all until its ``max_age``; kept per process it would be fetched once per process and forgotten at each
restart. Why it must outlive a restart at all: a cached ``enforce`` policy is what defends a domain whose
TXT record an attacker has stripped (RFC 8461 §10.1), so a restart must not drop it.

One row per policy domain, replaced when a policy with a new id is fetched. ``mx`` holds the policy's MX
patterns, one per line; times are microseconds since the epoch like every other table.

TLS reporting counts sessions per day (days since the epoch, UTC), policy domain and policy, and failures
also per result type and receiving host; every node adds to the same rows, so a domain gets one report a
day from the cluster. ``tlsrpt_sent`` is the claim a node takes before sending a day's report, so that two
nodes never both send it.
"""

from __future__ import annotations

from . import Migration

MIGRATION = Migration(
    version=7,
    name="transport_security",
    sqlite=(
        "CREATE TABLE mta_sts_policies ("
        " domain TEXT PRIMARY KEY, policy_id TEXT NOT NULL, mode TEXT NOT NULL, mx TEXT NOT NULL,"
        " max_age INTEGER NOT NULL, fetched_at INTEGER NOT NULL, expires_at INTEGER NOT NULL"
        ") WITHOUT ROWID",
        "CREATE INDEX mta_sts_policies_expires ON mta_sts_policies (expires_at)",
        "CREATE TABLE tlsrpt_counts ("
        " day INTEGER NOT NULL, domain TEXT NOT NULL, policy_type TEXT NOT NULL, policy TEXT NOT NULL,"
        " result_type TEXT NOT NULL, receiving_mx TEXT NOT NULL, receiving_ip TEXT NOT NULL,"
        " sessions INTEGER NOT NULL,"
        " PRIMARY KEY (day, domain, policy_type, policy, result_type, receiving_mx, receiving_ip)"
        ") WITHOUT ROWID",
        "CREATE TABLE tlsrpt_sent ("
        " day INTEGER NOT NULL, domain TEXT NOT NULL, sent_at INTEGER NOT NULL, PRIMARY KEY (day, domain)"
        ") WITHOUT ROWID",
    ),
    postgresql=(
        "CREATE TABLE mta_sts_policies ("
        " domain TEXT PRIMARY KEY, policy_id TEXT NOT NULL, mode TEXT NOT NULL, mx TEXT NOT NULL,"
        " max_age BIGINT NOT NULL, fetched_at BIGINT NOT NULL, expires_at BIGINT NOT NULL)",
        "CREATE INDEX mta_sts_policies_expires ON mta_sts_policies (expires_at)",
        "CREATE TABLE tlsrpt_counts ("
        " day INTEGER NOT NULL, domain TEXT NOT NULL, policy_type TEXT NOT NULL, policy TEXT NOT NULL,"
        " result_type TEXT NOT NULL, receiving_mx TEXT NOT NULL, receiving_ip TEXT NOT NULL,"
        " sessions BIGINT NOT NULL,"
        " PRIMARY KEY (day, domain, policy_type, policy, result_type, receiving_mx, receiving_ip))",
        "CREATE TABLE tlsrpt_sent ("
        " day INTEGER NOT NULL, domain TEXT NOT NULL, sent_at BIGINT NOT NULL, PRIMARY KEY (day, domain))",
    ),
)
