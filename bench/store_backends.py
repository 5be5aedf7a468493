"""Store backends side by side: suppression checks and the per-message write path, SQLite vs PostgreSQL.

Why: several relayd nodes can share one PostgreSQL database, so every RCPT (``check``) and every accepted
message (``record_sent`` + ``record_event``) becomes a network round trip instead of a b-tree lookup in
the process's own file. This prints what that costs, per backend, through the real store classes:

* ``check`` of 1 and of 10 recipients (about 10 % of them suppressed), one caller at a time and 16
  concurrent callers (a listener with 16 SMTP sessions in DATA);
* the write path of one accepted message: ``record_sent`` of its recipient plus ``record_event``, one at
  a time and 16 concurrent (both backends group-commit concurrent callers).

    .venv/bin/python bench/store_backends.py                     # 200k entries, 3 s per figure
    .venv/bin/python bench/store_backends.py --entries 50000 --seconds 1
    .venv/bin/python bench/store_backends.py --dsn postgresql://relayd@127.0.0.1/relayd_bench

Without ``--dsn`` a scratch database ``relayd_bench_<pid>`` is created on the local cluster (started if
needed, as for the tests: ``tests/conftest_pg.py``) and dropped at the end; with ``--dsn`` the tables go
in a scratch schema of that database, dropped at the end. Both stores run with their default settings
(SQLite: 2 reader connections; PostgreSQL: a pool of at most 10 connections) and ``synchronous`` /
``synchronous_commit`` as the backends choose per kind of write. Latencies are per call, p50 and p99.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg

from relayd.store import (
    Event,
    PostgresStore,
    Reason,
    Scope,
    SentRecord,
    SqliteStore,
    Store,
    SuppressionEntry,
)

NOW = datetime(2025, 6, 1, tzinfo=UTC)
ACCOUNTS = 20
CONCURRENCY = 16


def address(i: int) -> str:
    return f"user{i:09d}@d{i % 997:03d}.example"


def entries(n: int) -> Iterator[SuppressionEntry]:
    """The mix of bench/suppression.py: ~90 % global, ~7 % account, ~3 % list scope."""
    for i in range(n):
        r = i % 100
        a = f"acct{i % ACCOUNTS}"
        if r < 90:
            yield SuppressionEntry(address(i), Scope.GLOBAL, None, None, Reason.HARD_BOUNCE, "bench", NOW)
        elif r < 97:
            yield SuppressionEntry(address(i), Scope.ACCOUNT, a, None, Reason.COMPLAINT, "bench", NOW)
        else:
            yield SuppressionEntry(
                address(i), Scope.LIST, a, f"list{i % 5}", Reason.UNSUBSCRIBE, "bench", NOW
            )


async def load(store: Store, n: int) -> float:
    start = time.perf_counter()
    batch: list[SuppressionEntry] = []
    for e in entries(n):
        batch.append(e)
        if len(batch) == 50_000:
            await store.add(batch)
            batch = []
    if batch:
        await store.add(batch)
    return time.perf_counter() - start


def recipients(rng: random.Random, n_entries: int, k: int) -> list[str]:
    """``k`` addresses, each suppressed with probability ~0.1 (the rest were never added)."""
    return [address(rng.randrange(n_entries * 10)) for _ in range(k)]


class Figure:
    """Calls per second and latency percentiles of one measurement."""

    def __init__(self, calls: int, seconds: float, latencies: list[float]) -> None:
        self.rate = calls / seconds
        q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [latencies[0]] * 99
        self.p50_ms = q[49] * 1000
        self.p99_ms = q[98] * 1000

    def __str__(self) -> str:
        return f"{self.rate:>9,.0f}/s {self.p50_ms:>6.2f} {self.p99_ms:>7.2f}"


async def measure(op: Callable[[random.Random], Awaitable[object]], seconds: float, workers: int) -> Figure:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        while (t0 := time.perf_counter()) < deadline:
            await op(rng)
            latencies.append(time.perf_counter() - t0)

    await op(random.Random(0))  # warm up: prepared statements, pool connections, page cache
    start = time.perf_counter()
    await asyncio.gather(*[worker(i) for i in range(workers)])
    return Figure(len(latencies), time.perf_counter() - start, latencies)


async def run(store: Store, n_entries: int, seconds: float) -> dict[str, Figure]:
    figures: dict[str, Figure] = {}
    for k in (1, 10):
        for workers in (1, CONCURRENCY):

            async def check(rng: random.Random, k: int = k) -> object:
                return await store.check(
                    recipients(rng, n_entries, k), f"acct{rng.randrange(ACCOUNTS)}", "list1"
                )

            figures[f"check {k:>2} rcpt, {workers:>2} concurrent"] = await measure(check, seconds, workers)
    counter = iter(range(10**12))
    for workers in (1, CONCURRENCY):

        async def message(rng: random.Random) -> None:
            qid = f"Q{next(counter):015d}"
            rcpt = recipients(rng, n_entries, 1)[0]
            await store.record_sent([SentRecord(qid, 0, "acct1", "list1", rcpt, NOW)])
            await store.record_event(Event(NOW, "delivered", "acct1", "list1", rcpt, None, qid))

        figures[f"write (sent+event), {workers:>2} concurrent"] = await measure(message, seconds, workers)
    return figures


async def bench_sqlite(n: int, seconds: float) -> tuple[float, dict[str, Figure]]:
    with tempfile.TemporaryDirectory(prefix="relayd-bench-") as tmp:
        store = SqliteStore(Path(tmp) / "relayd.db")
        await store.open()
        try:
            loaded = await load(store, n)
            return loaded, await run(store, n, seconds)
        finally:
            await store.close()


async def bench_postgresql(dsn: str, schema: str, n: int, seconds: float) -> tuple[float, dict[str, Figure]]:
    store = PostgresStore(dsn, schema=schema)
    await store.open()
    try:
        loaded = await load(store, n)
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f"ANALYZE {schema}.suppression")  # autovacuum may not have run yet
        finally:
            await conn.close()
        return loaded, await run(store, n, seconds)
    finally:
        await store.close()
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=200_000, help="suppression entries (default 200k)")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each figure (default 3)")
    parser.add_argument("--dsn", help="PostgreSQL database to use (default: a scratch database)")
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        dsn = args.dsn
        if dsn is None:
            from tests.conftest_pg import scratch_database

            dsn = stack.enter_context(scratch_database(f"relayd_bench_{os.getpid()}"))
        schema = f"bench_{os.getpid()}"
        print(f"{args.entries:,} suppression entries, {args.seconds:g} s per figure", flush=True)
        sqlite_load, sqlite = asyncio.run(bench_sqlite(args.entries, args.seconds))
        print(f"sqlite: loaded in {sqlite_load:.1f} s", flush=True)
        pg_load, pg = asyncio.run(bench_postgresql(dsn, schema, args.entries, args.seconds))
        print(f"postgresql: loaded in {pg_load:.1f} s", flush=True)

    head = (
        f"{'':34} {'sqlite':>11} {'p50 ms':>6} {'p99 ms':>7}   {'postgresql':>11} {'p50 ms':>6} {'p99 ms':>7}"
    )
    print()
    print(head)
    print("-" * len(head))
    for name in sqlite:
        print(f"{name:34} {sqlite[name]}   {pg[name]}")


if __name__ == "__main__":
    main()
