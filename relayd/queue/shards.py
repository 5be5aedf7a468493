"""All queue shards at once, for the command line (each worker of ``[server] workers`` owns one shard).

The daemon's workers each write their own shard; ``relayd queue ...`` and ``relayd account suspend`` run
next to them and act on every shard (SQLite lets several processes write one file, one at a time).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from relayd.core.errors import StorageError
from relayd.queue.store import (
    Action,
    Affected,
    MessageRow,
    QueueEntry,
    QueueStore,
    Selection,
    View,
    message_row,
)


def shard_path(queue_dir: Path, index: int) -> Path:
    """The file of queue shard ``index``: shard 0 is ``queue.db``, the one a single process uses."""
    return queue_dir / ("queue.db" if index == 0 else f"queue-{index}.db")


def all_shards(queue_dir: Path) -> list[Path]:
    """Every queue shard on disk (for the CLI: ``queue list`` shows them all)."""
    return sorted(p for p in queue_dir.glob("queue*.db") if p.name == "queue.db" or p.stem[6:].isdigit())


def read_message(queue_dir: Path, queue_id: str) -> MessageRow | None:
    """Message ``queue_id`` and its recipients from whichever shard holds it, each shard opened read-only
    for this lookup: for a process that never writes the queue (the tenant API), so nothing is created,
    migrated or locked, and WAL readers never wait for the daemon's writers. Blocking: run it in a thread.

    A shard that cannot be opened is skipped; one that fails while being read raises StorageError."""
    for path in all_shards(queue_dir):
        try:
            db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=5.0)
        except sqlite3.Error:
            continue
        try:
            row = message_row(db, queue_id)
            if row is not None:
                return row
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read queue shard {path.name}: {exc}") from exc
        finally:
            db.close()
    return None


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

    async def hold_account(self, account: str) -> int:
        return sum([await s.hold_account(account) for s in self.shards])

    async def release_account(self, account: str) -> int:
        return sum([await s.release_account(account) for s in self.shards])

    async def operate(self, action: Action, selection: Selection) -> list[Affected]:
        """An operator's action on every shard (each shard in its own transaction).

        A running daemon notices without being told: its scan (``[queue] scan_interval``) reads the due
        index, so a released or retried recipient is attempted at the next scan, and a held one is no
        longer due."""
        out: list[Affected] = []
        for shard in self.shards:
            out.extend(await shard.operate(action, selection))
        return out

    async def entries(self, view: View, selection: Selection, *, now: float, limit: int) -> list[QueueEntry]:
        rows: list[QueueEntry] = []
        for shard in self.shards:
            rows.extend(await shard.entries(view, selection, now=now, limit=limit))
        return sorted(rows, key=lambda r: (r.created_at, r.queue_id, r.index))[:limit]

    async def shape(self, now: float) -> list[tuple[str, bool, int, int]]:
        rows: list[tuple[str, bool, int, int]] = []
        for shard in self.shards:
            rows.extend(await shard.shape(now))
        return rows

    async def shard_of(self, queue_id: str) -> QueueStore | None:
        """The shard holding message ``queue_id``, if any."""
        for shard in self.shards:
            if await shard.show(queue_id) is not None:
                return shard
        return None
