"""Suppression store benchmark: batched ``check`` on a 5 M-entry SQLite store, and a 1 M-row CSV import.

Why: ``check`` runs for every message at RCPT and again at dequeue, and bulk senders keep 5-10 M
suppressed addresses; ``relayd suppress import`` must take a million-row list in well under a minute.
This prints the figures those claims rest on.

    .venv/bin/python bench/suppression.py                      # 5 M entries, 1 M-row CSV
    .venv/bin/python bench/suppression.py --entries 500000 --csv-rows 100000   # quick run

The 5 M-entry database is bulk-loaded with plain sqlite3 into the schema the store's own migration
created (the store API would spend its time building 5 M dataclasses, which is not what is measured
here); it is kept at ``--db`` and reused by later runs with the same ``--entries``. The CSV import goes
through :func:`relayd.store.csvio.import_csv` and the store, as ``relayd suppress import`` does.
Figures are for a warm page cache (the file was just written or read).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relayd.store import SqliteStore
from relayd.store.csvio import HEADER, import_csv

ACCOUNTS = 20
LISTS = 5
NOW = datetime(2025, 6, 1, tzinfo=UTC)
NOW_US = int(NOW.timestamp()) * 1_000_000


def address(i: int) -> str:
    # Fixed-width counter first: generation order is key order, so the bulk load appends to the b-tree.
    return f"user{i:09d}@d{i % 997:03d}.example"


def entry_rows(n: int) -> Iterator[tuple[object, ...]]:
    """~90 % global, ~7 % account, ~3 % list scope; 2 % of all entries already expired."""
    created = NOW_US - 86_400_000_000
    for i in range(n):
        r = i % 100
        a = f"acct{i % ACCOUNTS}"
        expires = NOW_US - 1 if i % 50 == 7 else None
        if r < 90:
            yield (address(i), "global", "", "", "hard_bounce", "bench", created, expires)
        elif r < 97:
            yield (address(i), "account", a, "", "complaint", "bench", created, expires)
        else:
            yield (address(i), "list", a, f"list{i % LISTS}", "unsubscribe", "bench", created, expires)


async def build(db: Path, n: int) -> None:
    marker = db.with_suffix(".entries")
    if db.exists() and marker.exists() and marker.read_text() == str(n):
        print(f"build: reusing {db} ({n:,} entries, {db.stat().st_size / 1e6:,.0f} MB)")
        return
    for p in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm"), marker):
        p.unlink(missing_ok=True)
    db.parent.mkdir(parents=True, exist_ok=True)
    store = SqliteStore(db)
    await store.open()  # creates the schema through the real migration
    await store.close()
    start = time.perf_counter()
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -262144")
    rows = entry_rows(n)
    step = 1_000_000
    while True:
        chunk = [r for _, r in zip(range(step), rows, strict=False)]
        if not chunk:
            break
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO suppression (address, scope, account, list_name, reason, source, created_at,"
            " expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            chunk,
        )
        conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("ANALYZE")
    conn.close()
    marker.write_text(str(n))
    took = time.perf_counter() - start
    print(f"build: {n:,} entries in {took:.1f} s ({n / took:,.0f} rows/s), {db.stat().st_size / 1e6:,.0f} MB")


def batches(n: int, size: int, count: int, rng: random.Random) -> list[list[str]]:
    """Recipient batches: half of the addresses suppressed (some expired), half unknown."""
    out = []
    for _ in range(count):
        batch = []
        for _ in range(size):
            if rng.random() < 0.5:
                batch.append(address(rng.randrange(n)))
            else:
                batch.append(f"nobody{rng.randrange(10**9):09d}@d{rng.randrange(997):03d}.example")
        out.append(batch)
    return out


def pct(values: Sequence[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


async def bench_check(db: Path, n: int, iterations: int, concurrency: int) -> None:
    rng = random.Random(42)
    async with SqliteStore(db) as store:
        # Warm up: page cache, statement cache.
        for b in batches(n, 10, 2000, rng):
            await store.check(b, "acct3", "list1", NOW)
        for size in (1, 10):
            work = batches(n, size, iterations, rng)
            latencies = []
            hits = 0
            start = time.perf_counter()
            for b in work:
                t = time.perf_counter()
                hits += len(await store.check(b, "acct3", "list1", NOW))
                latencies.append(time.perf_counter() - t)
            took = time.perf_counter() - start
            print(
                f"check {size:>2} rcpt, sequential : {iterations / took:>8,.0f} batches/s"
                f" {iterations * size / took:>9,.0f} addresses/s   p50 {pct(latencies, 50) * 1e6:6.0f} µs"
                f"   p99 {pct(latencies, 99) * 1e6:6.0f} µs   ({hits:,} hits)"
            )

            queue = iter(work)
            latencies = []
            start = time.perf_counter()
            await asyncio.gather(*[_worker(store, queue, latencies) for _ in range(concurrency)])
            took = time.perf_counter() - start
            print(
                f"check {size:>2} rcpt, {concurrency} concurrent: {iterations / took:>8,.0f} batches/s"
                f" {iterations * size / took:>9,.0f} addresses/s   p50 {pct(latencies, 50) * 1e6:6.0f} µs"
                f"   p99 {pct(latencies, 99) * 1e6:6.0f} µs"
            )


async def _worker(store: SqliteStore, queue: Iterator[list[str]], latencies: list[float]) -> None:
    for b in queue:  # the workers share one iterator: each batch is checked once
        t = time.perf_counter()
        await store.check(b, "acct3", "list1", NOW)
        latencies.append(time.perf_counter() - t)


def write_csv(path: Path, rows: int) -> None:
    created = (NOW - timedelta(days=3)).isoformat().replace("+00:00", "Z")
    expires = (NOW + timedelta(days=30)).isoformat().replace("+00:00", "Z")
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(",".join(HEADER) + "\n")
        lines = []
        order = list(range(rows))
        random.Random(7).shuffle(order)  # real lists come in no order; sorted input is the easy case
        for i in order:
            # Mixed case exercises normalisation; the numbers interleave with the bulk-loaded entries, so an
            # import into the large store inserts all over its b-tree, not at one end.
            a = f"User{i * 5 + 2:09d}@Imp{i % 500}.Example"
            r = i % 20
            if r < 16:
                lines.append(f"{a},global,,,hard_bounce,{created},\n")
            elif r < 18:
                lines.append(f"{a},account,acct{i % ACCOUNTS},,complaint,{created},{expires}\n")
            else:
                lines.append(f"{a},list,acct{i % ACCOUNTS},list{i % LISTS},unsubscribe,,\n")
            if len(lines) >= 100_000:
                f.writelines(lines)
                lines = []
        f.writelines(lines)


async def bench_import(csv_path: Path, db: Path, rows: int, label: str) -> None:
    async with SqliteStore(db) as store:
        before = await store.count()
        start = time.perf_counter()
        result = await import_csv(store, csv_path, now=NOW)
        took = time.perf_counter() - start
        after = await store.count()
    assert result.imported == rows and not result.errors, (result.imported, result.errors[:3])
    assert after - before == rows, (before, after)
    print(f"import {rows:,} CSV rows {label}: {took:.1f} s ({rows / took:,.0f} rows/s)")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=5_000_000)
    ap.add_argument("--db", type=Path, default=Path("var/bench/suppression.db"))
    ap.add_argument("--iterations", type=int, default=20_000, help="check batches per measurement")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--csv-rows", type=int, default=1_000_000)
    ap.add_argument("--skip-import-into-large", action="store_true", help="only import into an empty store")
    args = ap.parse_args()

    print(f"sqlite {sqlite3.sqlite_version}, python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    await build(args.db, args.entries)
    await bench_check(args.db, args.entries, args.iterations, args.concurrency)

    with tempfile.TemporaryDirectory(dir=args.db.parent) as tmp:
        csv_path = Path(tmp) / "suppressions.csv"
        start = time.perf_counter()
        write_csv(csv_path, args.csv_rows)
        print(f"(wrote {csv_path.stat().st_size / 1e6:.0f} MB CSV in {time.perf_counter() - start:.1f} s)")
        await bench_import(csv_path, Path(tmp) / "empty.db", args.csv_rows, "into an empty store")
        if not args.skip_import_into_large:
            copy = Path(tmp) / "large.db"
            shutil.copyfile(args.db, copy)
            await bench_import(csv_path, copy, args.csv_rows, f"into the {args.entries:,}-entry store")


if __name__ == "__main__":
    asyncio.run(main())
