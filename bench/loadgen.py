"""An asyncio SMTP load generator: N concurrent clients, one message per connection, latency of the 250.

Raw streams rather than smtplib/aiosmtplib so the generator costs little CPU next to the server it measures.
"""

from __future__ import annotations

import asyncio
import base64
import statistics
import time
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    accepted: int = 0
    refused: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0

    def pct(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(len(xs) * p / 100))] * 1000

    def summary(self) -> str:
        rate = self.accepted / self.elapsed if self.elapsed else 0.0
        mean = statistics.fmean(self.latencies) * 1000 if self.latencies else float("nan")
        return (
            f"accepted {self.accepted} in {self.elapsed:.2f}s = {rate:.0f} msg/s; refused {self.refused}, "
            f"errors {self.errors}; 250 latency p50 {self.pct(50):.1f} ms, p99 {self.pct(99):.1f} ms, "
            f"mean {mean:.1f} ms"
        )


def make_message(size: int, n: int, rcpt: str) -> bytes:
    head = (
        f"From: Bench <bench@acme.example.test>\r\nTo: <{rcpt}>\r\nSubject: bench message {n}\r\n"
        f"Message-ID: <bench-{n}-{time.time_ns()}@acme.example.test>\r\n"
        "Date: Mon, 23 Nov 2026 12:00:00 +0000\r\n"
        "List-Id: ACME News <news.acme.example.test>\r\nX-Campaign-ID: bench-2026-11\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    ).encode()
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            return line


async def _one(
    port: int, sender: str, rcpts: list[str], data: bytes, auth: tuple[str, str] | None, res: LoadResult
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await _reply(reader)
        writer.write(b"EHLO loadgen.test\r\n")
        await _reply(reader)
        if auth:
            blob = base64.b64encode(f"\0{auth[0]}\0{auth[1]}".encode())
            writer.write(b"AUTH PLAIN " + blob + b"\r\n")
            if not (await _reply(reader)).startswith(b"235"):
                res.refused += 1
                return
        writer.write(f"MAIL FROM:<{sender}>\r\n".encode())
        if not (await _reply(reader)).startswith(b"250"):
            res.refused += 1
            return
        ok = 0
        for r in rcpts:
            writer.write(f"RCPT TO:<{r}>\r\n".encode())
            if (await _reply(reader)).startswith(b"250"):
                ok += 1
        if not ok:
            res.refused += 1
            return
        writer.write(b"DATA\r\n")
        await _reply(reader)
        writer.write(data.replace(b"\r\n.", b"\r\n..") + b".\r\n")
        t0 = time.perf_counter()
        final = await _reply(reader)
        res.latencies.append(time.perf_counter() - t0)
        if final.startswith(b"250"):
            res.accepted += 1
        else:
            res.refused += 1
        writer.write(b"QUIT\r\n")
        await writer.drain()
    finally:
        writer.close()


async def run_load(
    port: int,
    *,
    messages: int,
    concurrency: int,
    size: int = 5120,
    recipients: int = 1,
    domain: str = "example.test",
    sender: str = "bench@acme.example.test",
    auth: tuple[str, str] | None = None,
) -> LoadResult:
    res = LoadResult()
    counter = iter(range(messages))
    payloads = [make_message(size, i, f"r{i}@{domain}") for i in range(64)]

    async def worker() -> None:
        for n in counter:
            rcpts = [f"u{n}-{k}@{domain}" for k in range(recipients)]
            try:
                await _one(port, sender, rcpts, payloads[n % len(payloads)], auth, res)
            except (OSError, ConnectionError):
                res.errors += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    res.elapsed = time.perf_counter() - t0
    return res


async def run_paced(
    port: int,
    *,
    rate: float,
    messages: int,
    concurrency: int,
    size: int = 5120,
    recipients: int = 1,
    tag: str = "paced",
    domain: str = "example.test",
    sender: str = "bench@acme.example.test",
) -> LoadResult:
    """Open loop: message k starts at ``k / rate`` seconds whatever the server does, each on a connection of
    its own, at most ``concurrency`` at once (an arrival that finds them all busy waits for one, which a
    server keeping up never causes). Measures the 250 latency a server has *at a given load*, where the
    closed loop of :func:`run_load` (as fast as the server answers) measures it at saturation."""
    res = LoadResult()
    payloads = [make_message(size, i, f"r{i}@{domain}") for i in range(64)]
    slots = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()

    async def one(n: int) -> None:
        rcpts = [f"{tag}-{n}-{k}@{domain}" for k in range(recipients)]
        try:
            await _one(port, sender, rcpts, payloads[n % len(payloads)], None, res)
        except (OSError, ConnectionError):
            res.errors += 1
        finally:
            slots.release()

    t0 = time.perf_counter()
    for n in range(messages):
        delay = t0 + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await slots.acquire()
        task = asyncio.create_task(one(n))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    res.elapsed = time.perf_counter() - t0
    return res
