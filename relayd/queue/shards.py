"""All queue shards at once, for the command line (each worker of ``[server] workers`` owns one shard).

The daemon's workers each write their own shard; ``relayd queue ...`` and ``relayd account suspend`` run
next to them and act on every shard (SQLite lets several processes write one file, one at a time).
"""

from __future__ import annotations

from pathlib import Path

from relayd.queue.store import MessageRow, QueueStore
from relayd.supervisor import all_shards, shard_path


class QueueShards:
    def __init__(self, queue_dir: Path) -> None:
        paths = all_shards(queue_dir) or [shard_path(queue_dir, 0)]
        self.shards = [QueueStore(p) for p in paths]

    async def open(self) -> None:
        for shard in self.shards:
            await shard.open()

    async def close(self) -> None:
        for shard in self.shards:
            await shard.close()

    async def list_messages(self, *, state: str | None = None, limit: int = 1000) -> list[MessageRow]:
        rows: list[MessageRow] = []
        for shard in self.shards:
            rows.extend(await shard.list_messages(state=state, limit=limit))
        return sorted(rows, key=lambda r: r.created_at)[:limit]

    async def show(self, queue_id: str) -> MessageRow | None:
        for shard in self.shards:
            row = await shard.show(queue_id)
            if row is not None:
                return row
        return None

    async def retry_now(self, queue_id: str | None = None) -> int:
        return sum([await s.retry_now(queue_id) for s in self.shards])

    async def drop(self, queue_id: str) -> int:
        return sum([await s.drop(queue_id) for s in self.shards])

    async def hold_account(self, account: str) -> int:
        return sum([await s.hold_account(account) for s in self.shards])

    async def release_account(self, account: str) -> int:
        return sum([await s.release_account(account) for s in self.shards])

    async def drop_matching(self, account: str, list_name: str | None, address: str, reason: str) -> int:
        return sum([await s.drop_matching(account, list_name, address, reason) for s in self.shards])
