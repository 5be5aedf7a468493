"""Baseline throughput of the core relay: accepted/s, delivered/s (at a sink) and 250 latency.

    .venv/bin/python bench/submit.py [--messages 5000] [--concurrency 20] [--size 5120] [--auth]

Starts a counting sink (own process), relayd (own process, routes everything to the sink) and drives it
with an asyncio load generator (this process), one message per connection.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.keeping_sink import KeepingSink
from bench.loadgen import run_load
from relayd.core.passwords import hash_password


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pipeline_config(tmp: Path) -> str:
    """The whole policy pipeline: DKIM rsa-2048, imprint, caps on the list, discard patterns."""
    from relayd.mail.dkim import keygen

    key, _ = keygen("acme.example.test", "bench", "rsa", tmp / "dkim")
    return f"""
[[dkim]]
domain = "acme.example.test"
selector = "bench"
key_file = "{key}"
algorithm = "rsa"
"""


def write_config(tmp: Path, port: int, sink_port: int, extra: str = "", workers: int = 1) -> Path:
    cfg = tmp / "bench.toml"
    cfg.write_text(f"""
[server]
hostname = "relayd.bench"
secret_file = "{tmp}/secret.key"
workers = {workers}
[http]
listen = "127.0.0.1:{free_port()}"
[inbound]
listen = ["127.0.0.1:{free_port()}"]
[submission]
listen = ["127.0.0.1:{port}"]
max_connections_per_ip = 1000
[queue]
path = "{tmp}/queue"
[store]
path = "{tmp}/relayd.db"
[delivery]
mode = "routes"
routes = {{ "*" = "127.0.0.1:{sink_port}" }}
tls = "none"
[policy]
discard_patterns = ["*@*.invalid", "abuse@*", "postmaster@*"]
{extra}
[accounts.acme]
password_hash = "{hash_password("bench-password", n=2**12)}"
domains = ["acme.example.test"]
networks = ["127.0.0.0/8"]
imprint = "ACME Ltd, 1 Example Street, 12345 Example City, Registered in Example"
[accounts.acme.lists.news]
caps = {{ day = 5, week = 20, month = 50 }}
""")
    return cfg


def wait_port(port: int, timeout: float = 15) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"relayd did not start on {port}")


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its descendants (relayd's main process and its workers)."""
    out = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in task.read_text().split():
            out.extend(tree_pids(int(child)))
    return out


def proc_cpu_and_rss(pid: int) -> tuple[float, int]:
    """(CPU seconds, sum of peak RSS in KB) over a process and its descendants, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    cpu, hwm = 0.0, 0
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / ticks
            with open(f"/proc/{p}/status") as f:
                hwm += next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            continue
    return cpu, hwm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=20)
    ap.add_argument("--size", type=int, default=5120)
    ap.add_argument("--recipients", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2, help="relayd worker processes ([server] workers)")
    ap.add_argument("--log-level", default="info", help="relayd's --log-level (default info, its default)")
    ap.add_argument("--auth", action="store_true", help="AUTH PLAIN on every connection (default: networks)")
    ap.add_argument(
        "--profile", metavar="FILE", help="run relayd under py-spy, write collapsed stacks to FILE"
    )
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="relayd-bench-") as d:
        tmp = Path(d)
        sink = KeepingSink(tmp / "kept")  # counts; keeps nothing unless asked
        port = free_port()
        cfg = write_config(tmp, port, sink.port, pipeline_config(tmp), args.workers)
        log = (tmp / "relayd.log").open("wb")
        cmd = [sys.executable, "-m", "relayd", "serve", "--config", str(cfg), "--log-level", args.log_level]
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=log,
        )
        try:
            wait_port(port)
            spy = None
            if args.profile:
                spy = subprocess.Popen(
                    [
                        "py-spy",
                        "record",
                        "--subprocesses",
                        "--format",
                        "raw",
                        "-r",
                        "200",
                        "-d",
                        "6",
                        "-p",
                        str(proc.pid),
                        "-o",
                        args.profile,
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            cpu0, _ = proc_cpu_and_rss(proc.pid)
            t0 = time.perf_counter()
            auth = ("acme", "bench-password") if args.auth else None
            res = asyncio.run(
                run_load(
                    port,
                    messages=args.messages,
                    concurrency=args.concurrency,
                    size=args.size,
                    recipients=args.recipients,
                    auth=auth,
                )
            )
            expected = res.accepted * args.recipients
            while sink.messages < expected and time.perf_counter() - t0 < res.elapsed + 120:
                time.sleep(0.01)
            t_done = time.perf_counter() - t0
            cpu1, rss = proc_cpu_and_rss(proc.pid)
            if spy is not None:
                spy.wait(60)
        finally:
            proc.terminate()
            proc.wait(30)
            sink.stop()
        delivered = sink.messages
        print(
            f"relayd, whole pipeline (DKIM rsa-2048, footer+imprint, caps, discard), {args.size} B messages, "
            f"{args.recipients} rcpt, {args.concurrency} clients, "
            f"one message per connection{', AUTH PLAIN' if args.auth else ''}"
        )
        print("  " + res.summary())
        print(
            f"  delivered {delivered} at the sink in {t_done:.2f}s = "
            f"{delivered / t_done:.0f} msg/s end to end"
        )
        print(
            f"  relayd CPU {1000 * (cpu1 - cpu0) / max(1, res.accepted):.2f} ms/message, "
            f"peak RSS {rss / 1024:.0f} MB"
        )
        print(f"  load generator peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
