"""Restart with a big queue: time from start to the first delivery, and RSS.

    .venv/bin/python bench/restart.py [--messages 200000]

Fills a queue shard directly (as a crashed relayd would leave it: every recipient still 'queued'), starts
relayd on it with a counting sink as the route, and prints how long the first delivery took, the delivery
rate over the first seconds, and the peak RSS. Recovery must not load the queue into memory: the scheduler
reads due rows a window at a time.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.keeping_sink import KeepingSink
from bench.loadgen import make_message
from bench.submit import free_port, proc_cpu_and_rss, wait_port, write_config
from relayd.queue.store import SCHEMA


def fill(db_path: Path, n: int) -> None:
    db_path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(db_path)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(SCHEMA)
    # as relayd stores an accepted message: its Received field + the content, each recipient's copy to be
    # rendered (footer, List-Unsubscribe) and DKIM-signed at delivery -- recovery pays that for every message
    received = (
        b"Received: from app.test ([127.0.0.1])\r\n\tby relayd.bench (relayd) with ESMTPA id restart;\r\n"
        b"\tMon, 23 Nov 2026 12:00:00 +0000\r\n"
    )
    body = received + make_message(5120, 0, "r@example.test")
    now = time.time() - 60
    batch = 20_000
    for start in range(0, n, batch):
        msgs, rcpts = [], []
        for i in range(start, min(n, start + batch)):
            qid = f"restart{i:09d}"
            msgs.append((qid, "acme", "bench@acme.example.test", "news", now, len(body), body, 1))
            rcpts.append((qid, 0, f"r{i}@example.test", "queued", 0, now, now))
        db.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?)", msgs)
        db.executemany(
            "INSERT INTO recipients (msg_id, idx, address, state, attempts, next_attempt, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            rcpts,
        )
        db.commit()
    db.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--watch", type=float, default=10.0, help="seconds to watch deliveries after the first")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="relayd-restart-") as d:
        tmp = Path(d)
        sink = KeepingSink(tmp / "kept")  # counts; keeps nothing unless asked
        port = free_port()
        cfg = write_config(tmp, port, sink.port, "", 1)
        t0 = time.perf_counter()
        fill(tmp / "queue" / "queue.db", args.messages)
        size = (tmp / "queue" / "queue.db").stat().st_size
        print(
            f"queue filled: {args.messages} messages, {size / 1e6:.0f} MB on disk, "
            f"{time.perf_counter() - t0:.1f}s"
        )
        log = (tmp / "relayd.log").open("wb")
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "relayd", "serve", "--config", str(cfg), "--log-level", "warning"],
            stdout=log,
            stderr=log,
            env={**os.environ},
        )
        try:
            while sink.messages == 0 and time.perf_counter() - start < 60:
                time.sleep(0.005)
            first = time.perf_counter() - start
            wait_port(port)
            c0 = sink.messages
            time.sleep(args.watch)
            rate = (sink.messages - c0) / args.watch
            _, rss = proc_cpu_and_rss(proc.pid)
        finally:
            proc.terminate()
            proc.wait(30)
            sink.stop()
        print(
            f"first delivery {first:.2f}s after start; then {rate:.0f} deliveries/s; "
            f"peak RSS {rss / 1024:.0f} MB"
        )


if __name__ == "__main__":
    main()
