"""The tenants' API keys in PostgreSQL (:class:`relayd.store.protocols.ApiKeyStore`)."""

from __future__ import annotations

from datetime import datetime

from ..models import ApiKey, utcnow
from ..rows import api_key, api_key_row, micros
from ..sql import api_key_insert, api_key_list, api_key_revoke, api_key_select
from .connection import PostgresConnection
from .driver import dollar


class ApiKeyTables(PostgresConnection):
    """Keys are written durably: a revocation must hold after a crash."""

    async def add_api_key(self, key: ApiKey) -> None:
        async with self._transaction(durable=True) as conn:
            rows = await conn.fetch(api_key_insert(dollar), *api_key_row(key))
        if not rows:
            raise ValueError(f"API key id {key.key_id!r} exists already")

    async def get_api_key(self, key_id: str) -> ApiKey | None:
        rows = await self._fetch(api_key_select(dollar), key_id)
        return api_key(tuple(rows[0])) if rows else None

    async def list_api_keys(self, account: str | None = None) -> list[ApiKey]:
        sql = api_key_list(dollar, by_account=account is not None)
        rows = await self._fetch(sql, account) if account is not None else await self._fetch(sql)
        return [api_key(tuple(row)) for row in rows]

    async def revoke_api_key(self, key_id: str, at: datetime | None = None) -> bool:
        async with self._transaction(durable=True) as conn:
            rows = await conn.fetch(api_key_revoke(dollar), micros(at or utcnow()), key_id)
        return bool(rows)
