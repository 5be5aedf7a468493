"""SQL that both backends run the same way, given how their driver writes placeholders.

``mark(n)`` returns the placeholder for the n-th parameter (1-based): ``?`` for sqlite3, ``$n`` for asyncpg.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from .base import Reason, Scope

ENTRY_COLUMNS: Final = "address, scope, account, list_name, reason, source, created_at, expires_at"


def suppression_list(
    mark: Callable[[int], str],
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
    """The query behind ``Store.list``: entries matching every filter given, ordered by key, one page;
    ``not_expired_at_us`` (microseconds since the epoch) leaves out entries expired by then."""
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
