"""AUTH cost per connection against a real relayd whose accounts have N=2^17 scrypt hashes (OWASP's cost).

Each sample is one connection (connect, EHLO, AUTH PLAIN, QUIT); the figure is the AUTH round trip.

* cold: the first login of each account: nothing remembered, one full scrypt check in the daemon;
* warm: logins of one account again and again: remembered for a few minutes, no scrypt at all;
* cold, concurrent: ``--concurrent`` clients log in to fresh accounts at once; the daemon runs at most two
  checks at a time, so they queue, and its peak memory stays near two checks' worth (2 x 128 MiB).

Peak RSS is the daemon's VmHWM after each phase (a high-water mark: it never goes down).

    python -m bench.auth [--accounts 40] [--warm 200] [--concurrent 8]
"""

from __future__ import annotations

import argparse
import base64
import smtplib
import statistics
import tempfile
import threading
import time
from pathlib import Path

from relayd.core.passwords import hash_password
from tests.harness import Relayd

PASSWORD = "bench password"


def _auth_ms(port: int, account: str) -> float:
    blob = base64.b64encode(f"\0{account}\0{PASSWORD}".encode()).decode()
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
        s.ehlo("bench.test")
        t0 = time.perf_counter()
        code, _ = s.docmd("AUTH", "PLAIN " + blob)
        ms = (time.perf_counter() - t0) * 1000
    if code != 235:
        raise RuntimeError(f"AUTH as {account} answered {code}")
    return ms


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _report(name: str, samples: list[float], pid: int) -> None:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    print(
        f"{name:<22} n={len(samples):>4}  median {statistics.median(samples):8.1f} ms  p99 {p99:8.1f} ms"
        f"  max {ordered[-1]:8.1f} ms   relayd peak RSS {_peak_rss_mb(pid):6.0f} MB"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--accounts", type=int, default=40, help="cold samples (one fresh account each)")
    ap.add_argument("--warm", type=int, default=200, help="warm samples (one account)")
    ap.add_argument("--concurrent", type=int, default=8, help="clients logging in at once, cold")
    args = ap.parse_args()

    t0 = time.perf_counter()
    stored = hash_password(PASSWORD)  # today's default cost
    print(f"hash_password (N=2^17, r=8, p=1) in this process: {(time.perf_counter() - t0) * 1000:.0f} ms")
    names = [f"cold{i}" for i in range(args.accounts)] + [f"conc{i}" for i in range(args.concurrent)]
    accounts = "".join(
        f'\n[accounts.{n}]\npassword_hash = "{stored}"\ndomains = ["{n}.example.test"]\n' for n in names
    )
    with (
        tempfile.TemporaryDirectory() as tmp,
        Relayd(Path(tmp), routes={"example.test": 9}, accounts=accounts) as d,
    ):
        assert d.proc is not None
        pid = d.proc.pid
        print(f"relayd peak RSS after start: {_peak_rss_mb(pid):.0f} MB")
        cold = [_auth_ms(d.port, f"cold{i}") for i in range(args.accounts)]
        _report("cold (scrypt)", cold, pid)
        warm = [_auth_ms(d.port, "cold0") for _ in range(args.warm)]
        _report("warm (remembered)", warm, pid)
        concurrent: list[float] = []
        lock = threading.Lock()

        def one(name: str) -> None:
            ms = _auth_ms(d.port, name)
            with lock:
                concurrent.append(ms)

        threads = [threading.Thread(target=one, args=(f"conc{i}",)) for i in range(args.concurrent)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        _report(f"cold, {args.concurrent} at once", concurrent, pid)


if __name__ == "__main__":
    main()
