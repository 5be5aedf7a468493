"""SQL text that both backends run the same way, given how their driver writes placeholders.

``mark(n)`` returns the placeholder for the n-th parameter (1-based): ``?`` for sqlite3, ``$n`` for asyncpg.
What differs between the dialects beyond placeholders (``unnest`` arrays against ``executemany``,
``RETURNING`` against a row count, advisory locks) stays in each backend's modules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from .models import Reason, Scope

__all__ = [
    "ACCOUNT_COLUMNS",
    "API_KEY_COLUMNS",
    "CONSENT_COLUMNS",
    "CONSENT_UPSERT_CONFLICT",
    "DMARC_ADD_CONFLICT",
    "DMARC_COLUMNS",
    "ENTRY_COLUMNS",
    "ENTRY_UPSERT_CONFLICT",
    "EVENT_COLUMNS",
    "INBOX_COLUMNS",
    "INBOX_LIST_COLUMNS",
    "SENT_COLUMNS",
    "TLS_ADD_CONFLICT",
    "TLS_COLUMNS",
    "Mark",
    "api_key_insert",
    "api_key_list",
    "api_key_revoke",
    "api_key_select",
    "consent_page",
    "events_since",
    "keep_reasons",
    "mta_sts_upsert",
    "sent_lookup",
    "sent_page",
    "suppression_list",
    "suppression_page",
    "suppression_remove",
]

#: ``mark(n)``: the placeholder of the n-th parameter.
Mark = Callable[[int], str]

ENTRY_COLUMNS: Final = "address, scope, account, list_name, reason, source, created_at, expires_at"
ACCOUNT_COLUMNS: Final = "account, suspended, reason, details, since"
EVENT_COLUMNS: Final = (
    "at, kind, account, list_name, address, reason, queue_id, evidence, dedup_key, count, last_seen"
)
SENT_COLUMNS: Final = "queue_id, idx, account, list_name, address, sent_at"
CONSENT_COLUMNS: Final = "account, list_name, address, confirmed_at, ip, user_agent, source, evidence"
TLS_COLUMNS: Final = "day, domain, policy_type, policy, result_type, receiving_mx, receiving_ip, sessions"
#: Columns written for an inbox item (the id is the database's).
INBOX_COLUMNS: Final = (
    "received_at, kind, source, mail_from, from_header, subject, date_header, note, size, truncated,"
    " state, done_at, raw"
)
#: Columns an inbox listing reads: all but the raw bytes.
INBOX_LIST_COLUMNS: Final = (
    "id, received_at, kind, source, mail_from, from_header, subject, date_header, note, size, truncated,"
    " state, done_at"
)
DMARC_COLUMNS: Final = (
    "domain, day, org, report_id, source_ip, total, spf_pass, dkim_pass, spf_aligned, dkim_aligned,"
    " dmarc_pass, quarantined, rejected"
)
API_KEY_COLUMNS: Final = "key_id, account, key_hash, name, created_at, revoked_at"

#: An entry replacing the one of its key, after ``INSERT INTO suppression (ENTRY_COLUMNS) ...``.
ENTRY_UPSERT_CONFLICT: Final = (
    " ON CONFLICT (address, scope, account, list_name) DO UPDATE SET"
    " reason = excluded.reason, source = excluded.source,"
    " created_at = excluded.created_at, expires_at = excluded.expires_at"
)
#: A consent record replacing the one of its key, after ``INSERT INTO consent (CONSENT_COLUMNS) ...``.
CONSENT_UPSERT_CONFLICT: Final = (
    " ON CONFLICT (account, list_name, address) DO UPDATE SET"
    " confirmed_at = excluded.confirmed_at, ip = excluded.ip, user_agent = excluded.user_agent,"
    " source = excluded.source, evidence = excluded.evidence"
)
#: A TLS count added to its row (created at 0), after ``INSERT INTO tlsrpt_counts (TLS_COLUMNS) ...``.
TLS_ADD_CONFLICT: Final = (
    " ON CONFLICT (day, domain, policy_type, policy, result_type, receiving_mx, receiving_ip)"
    " DO UPDATE SET sessions = tlsrpt_counts.sessions + excluded.sessions"
)
#: DMARC counts added to their row, after ``INSERT INTO dmarc_counts (DMARC_COLUMNS) ...``.
DMARC_ADD_CONFLICT: Final = (
    " ON CONFLICT (domain, day, org, report_id, source_ip) DO UPDATE SET"
    " total = dmarc_counts.total + excluded.total, spf_pass = dmarc_counts.spf_pass + excluded.spf_pass,"
    " dkim_pass = dmarc_counts.dkim_pass + excluded.dkim_pass,"
    " spf_aligned = dmarc_counts.spf_aligned + excluded.spf_aligned,"
    " dkim_aligned = dmarc_counts.dkim_aligned + excluded.dkim_aligned,"
    " dmarc_pass = dmarc_counts.dmarc_pass + excluded.dmarc_pass,"
    " quarantined = dmarc_counts.quarantined + excluded.quarantined,"
    " rejected = dmarc_counts.rejected + excluded.rejected"
)


def keep_reasons(keep: frozenset[Reason]) -> str:
    """The upsert condition that leaves entries with a reason in ``keep`` as they are (``''`` for none).

    The reasons are enum values, written into the text: no quoting issue."""
    if not keep:
        return ""
    kept = ", ".join(f"'{Reason(r).value}'" for r in sorted(keep))
    return f" WHERE suppression.reason NOT IN ({kept})"


def suppression_list(
    mark: Mark,
    *,
    address: str | None,
    scope: Scope | None,
    account: str | None,
    list_name: str | None,
    reason: Reason | None,
    not_expired_at_us: int | None,
    limit: int,
    offset: int,
) -> tuple[str, list[Any]]:
    """The query behind ``Store.list_entries``: entries matching every filter given, ordered by key, one
    page; ``not_expired_at_us`` (microseconds since the epoch) leaves out entries expired by then."""
    where: list[str] = []
    params: list[Any] = []
    for column, value in (
        ("address", address),
        ("scope", None if scope is None else Scope(scope).value),
        ("account", account),
        ("list_name", list_name),
        ("reason", None if reason is None else Reason(reason).value),
    ):
        if value is not None:
            params.append(value)
            where.append(f"{column} = {mark(len(params))}")
    if account is not None and scope is None:
        where.append("scope <> 'global'")  # lets the planner use the partial index on account
    if not_expired_at_us is not None:
        params.append(not_expired_at_us)
        where.append(f"(expires_at IS NULL OR expires_at > {mark(len(params))})")
    sql = f"SELECT {ENTRY_COLUMNS} FROM suppression"
    if where:
        sql += " WHERE " + " AND ".join(where)
    params += [limit, offset]
    page = f"LIMIT {mark(len(params) - 1)} OFFSET {mark(len(params))}"
    sql += f" ORDER BY address, scope, account, list_name {page}"
    return sql, params


def mta_sts_upsert(mark: Mark) -> str:
    """Insert or replace the policy of a domain, from the values of :func:`relayd.store.rows.mta_sts_row`."""
    values = ", ".join(mark(i) for i in range(1, 8))
    return (
        "INSERT INTO mta_sts_policies (domain, policy_id, mode, mx, max_age, fetched_at, expires_at)"
        f" VALUES ({values}) ON CONFLICT (domain) DO UPDATE SET policy_id = excluded.policy_id,"
        " mode = excluded.mode, mx = excluded.mx, max_age = excluded.max_age,"
        " fetched_at = excluded.fetched_at, expires_at = excluded.expires_at"
    )


def api_key_insert(mark: Mark) -> str:
    """Insert a key unless its id exists (the caller sees no row returned then)."""
    values = ", ".join(mark(i) for i in range(1, 7))
    return (
        f"INSERT INTO api_keys ({API_KEY_COLUMNS}) VALUES ({values}) ON CONFLICT (key_id) DO NOTHING"
        " RETURNING key_id"
    )


def api_key_select(mark: Mark) -> str:
    return f"SELECT {API_KEY_COLUMNS} FROM api_keys WHERE key_id = {mark(1)}"


def api_key_list(mark: Mark, *, by_account: bool) -> str:
    where = f" WHERE account = {mark(1)}" if by_account else ""
    return f"SELECT {API_KEY_COLUMNS} FROM api_keys{where} ORDER BY account, created_at, key_id"


def api_key_revoke(mark: Mark) -> str:
    """Revoke a valid key: ``revoked_at`` = ``mark(1)`` where ``key_id`` = ``mark(2)``; returns its id."""
    return (
        f"UPDATE api_keys SET revoked_at = {mark(1)} WHERE key_id = {mark(2)} AND revoked_at IS NULL"
        " RETURNING key_id"
    )


def suppression_remove(
    mark: Mark, address: str, scope: Scope | None, account: str | None, list_name: str | None
) -> tuple[str, list[Any]]:
    """The DELETE behind ``Store.remove``: with ``scope`` the exact key, else every entry of the address,
    narrowed to ``account`` / ``list_name`` when they are given."""
    if scope is not None:
        sql = (
            f"DELETE FROM suppression WHERE address = {mark(1)} AND scope = {mark(2)}"
            f" AND account = {mark(3)} AND list_name = {mark(4)}"
        )
        return sql, [address, Scope(scope).value, account or "", list_name or ""]
    sql = f"DELETE FROM suppression WHERE address = {mark(1)}"
    params: list[Any] = [address]
    if account is not None:
        params.append(account)
        sql += f" AND account = {mark(len(params))}"
    if list_name is not None:
        params.append(list_name)
        sql += f" AND list_name = {mark(len(params))}"
    return sql, params


def events_since(
    mark: Mark, since_us: int, limit: int, account: str | None, kind: str | None
) -> tuple[str, list[Any]]:
    """The query behind ``Store.events``: events at or after ``since_us``, oldest first, one page."""
    sql = f"SELECT {EVENT_COLUMNS} FROM events WHERE at >= {mark(1)}"
    params: list[Any] = [since_us]
    if account is not None:
        params.append(account)
        sql += f" AND account = {mark(len(params))}"
    if kind is not None:
        params.append(kind)
        sql += f" AND kind = {mark(len(params))}"
    params.append(limit)
    sql += f" ORDER BY at, id LIMIT {mark(len(params))}"
    return sql, params


def sent_lookup(mark: Mark) -> str:
    """The ledger row of (``queue_id``, ``idx``) = (``mark(1)``, ``mark(2)``)."""
    return f"SELECT {SENT_COLUMNS} FROM sent WHERE queue_id = {mark(1)} AND idx = {mark(2)}"


def sent_page(mark: Mark) -> str:
    """Keyset pagination over the ledger's key: up to ``mark(3)`` rows after (``mark(1)``, ``mark(2)``)."""
    return (
        f"SELECT {SENT_COLUMNS} FROM sent WHERE (queue_id, idx) > ({mark(1)}, {mark(2)})"
        f" ORDER BY queue_id, idx LIMIT {mark(3)}"
    )


def suppression_page(mark: Mark, *, first: bool) -> str:
    """Keyset pagination over the suppression key: the first ``mark(1)`` entries, or (``first=False``) up
    to ``mark(5)`` entries after the key (``mark(1)`` .. ``mark(4)``)."""
    if first:
        return (
            f"SELECT {ENTRY_COLUMNS} FROM suppression ORDER BY address, scope, account, list_name"
            f" LIMIT {mark(1)}"
        )
    return (
        f"SELECT {ENTRY_COLUMNS} FROM suppression"
        f" WHERE (address, scope, account, list_name) > ({mark(1)}, {mark(2)}, {mark(3)}, {mark(4)})"
        f" ORDER BY address, scope, account, list_name LIMIT {mark(5)}"
    )


def consent_page(
    mark: Mark, *, account: str | None, list_name: str | None, address: str | None, after: bool
) -> tuple[str, list[Any]]:
    """Keyset pagination over consent records in key order, with the filters given: the statement and the
    filters' parameters. With ``after``, three more parameters follow them, the last key seen; the page
    size is always the last parameter."""
    where: list[str] = []
    params: list[Any] = []
    for column, value in (("account", account), ("list_name", list_name), ("address", address)):
        if value is not None:
            params.append(value)
            where.append(f"{column} = {mark(len(params))}")
    n = len(params)
    if after:
        where.append(f"(account, list_name, address) > ({mark(n + 1)}, {mark(n + 2)}, {mark(n + 3)})")
        n += 3
    sql = f"SELECT {CONSENT_COLUMNS} FROM consent"
    if where:
        sql += " WHERE " + " AND ".join(where)
    return f"{sql} ORDER BY account, list_name, address LIMIT {mark(n + 1)}", params
