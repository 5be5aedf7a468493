"""relayd vs Postfix + OpenDKIM, side by side: same sink, same load generator, same run.

    .venv/bin/python bench/e2e.py --quick          # < 1 minute: 100 k suppressions, small runs
    .venv/bin/python bench/e2e.py                  # a few minutes: 1 M suppressions, scale runs
    .venv/bin/python bench/e2e.py --relayd-only    # without Postfix (also what happens when it can't run)
    .venv/bin/python bench/e2e.py --scale-only --scale-entries 10000000   # relayd: 10 k vs 10 M entries

Contenders (each relays everything to one sink on 127.0.0.1: Postfix's C ``smtp-sink``, see
bench/smtp_sink.py). The sink shares the 2 CPUs with the contenders, so it must cost little and the same
per transaction for both: smtp-sink offers PIPELINING, 8BITMIME and ENHANCEDSTATUSCODES and no CHUNKING,
so both end every message with DATA and ``<CRLF>.<CRLF>``. During the measured runs it keeps nothing, only
its ``-c`` counters (read from a file every few ms): a run is done when the sink completed as many
transactions as the contender must make (:meth:`Contender.transactions_per_message`: relayd one per
recipient, since each copy is personal; Postfix one per message), and its last arrival is the counter
file's mtime at that moment. Recipients per transaction are not counted then: that is assumed here, and
checked afterwards in an unmeasured verification phase (below). ``--chunking-sink`` also repeats the
saturation runs
into bench/keeping_sink.py, a Python sink offering CHUNKING, and prints them as a second table: it favours
relayd, whose client sends BDAT (taken whole by the sink) where Postfix's client sends DATA (which that sink
scans for the final dot in Python):

- relayd, whole pipeline: DKIM rsa-2048, footer + imprint, a list with caps, discard patterns (the config of
  bench/submit.py), ``--workers`` queue shards (two processes each: accepting, and delivering at a lower
  CPU priority), its SQLite store loaded beforehand with ``--suppressions``
  global entries (plus account and list entries) through ``SqliteStore.add``;
- Postfix (private instance in a temp dir under /run, tests/postfix_instance.py) with OpenDKIM as its
  milter (rsa-2048, relaxed/relaxed), default process limits, no DNS, no local delivery.

Both run at once and the measurements alternate (relayd A, Postfix A, relayd B, Postfix B) so each pair is
taken close together in time; the idle contender costs next to nothing meanwhile.

Load: Postfix's ``smtp-source`` (C), ``--concurrency`` sessions, one message per connection, 5120 B;
profile A 1 recipient per message, profile B 10. Measured per contender and profile:

- accepted msg/s: messages accepted / smtp-source's wall time;
- delivered msg/s: messages (load + probe) / (last arrival at the sink - start), once the sink completed
  all the transactions expected; copies/s counts recipient copies delivered (relayd delivers one
  transaction per recipient, since the footer is personal; Postfix one transaction for all 10);
- 250 latency p50/p99: smtp-source does not time replies, so a probe client (asyncio, in a forked process
  of its own) opens one extra connection every ``--probe-interval`` ms during the load and times end of DATA
  -> final reply
  (the "probe" column: how many it timed; ~200 per profile, so p99 is not just the worst one);
- CPU ms/msg: user+sys of the server's process tree (utime+stime+cutime+cstime from /proc, so processes
  that exited and were reaped count too), delta from start to last delivery, per accepted message; for
  Postfix the tree of its master (smtpd, cleanup, qmgr, smtp, ...) plus OpenDKIM;
- CPU ms/copy: the same CPU time per recipient copy delivered (profile B: 10 copies per message);
- sink: CPU of the sink's process, per accepted message: it runs on the same CPUs, and relayd hands it
  one transaction per recipient where Postfix hands it one per message;
- peak RSS: the largest sum of VmHWM over the tree seen by a 0.2 s sampler (shared pages count once per
  process, which overstates a server of many processes: Postfix runs ~50); PSS: the largest sum of PSS seen
  (shared pages divided among their sharers), the fairer memory figure.

Then the 250 latency at a given load, the same for both contenders: an open-loop generator
(bench.loadgen.run_paced, its own process) offers messages at Postfix's delivered msg/s of that profile for
``--paced-seconds``, one per connection, at most ``--concurrency`` connections at once, with the bench list's
List-Id (list suppression and caps run too); every message's end of DATA -> reply is timed. The saturation
runs above say how fast each can go; this says how long a client waits when the load is one both can carry.

accepted/s and delivered/s count the probe's messages too (they took server capacity); the probe runs
exactly while smtp-source does.

Last, unmeasured: the verification phase. smtp-sink is restarted on the same port with a dump file per
transaction (the contenders' pooled connections to the old one break; both notice and reconnect), and each
contender relays ``--verify`` profile-A messages and ``--verify-b`` profile-B messages. Every transaction
is kept (smtp-sink's dump minus its own lines: the message byte for byte as received) and its DKIM
signature checked with Perl Mail::DKIM, keys read from the key files (no DNS); the RCPTs in the dumps
must account for every recipient, in the number of transactions the measured runs assumed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.keeping_sink import KeepingSink  # noqa: E402
from bench.loadgen import make_message, run_paced  # noqa: E402
from bench.smtp_sink import SmtpSink  # noqa: E402
from bench.submit import free_port, pipeline_config, wait_port, write_config  # noqa: E402
from tests import postfix_instance  # noqa: E402
from tests.mail_dkim import verify_files  # noqa: E402

DOMAIN = "acme.example.test"
SENDER = "bench@acme.example.test"
RECIPIENT = "rcpt@example.test"  # smtp-source makes <n>rcpt@example.test when sending several per message

Sink = SmtpSink | KeepingSink


@dataclass(frozen=True)
class Contender:
    name: str
    port: int
    roots: Callable[[], list[int]]
    tag: int  # names the messages the sink keeps for DKIM verification
    per_recipient: bool  # one transaction per recipient (relayd: each copy is personal), or per message

    def transactions_per_message(self, rcpts: int) -> int:
        """Transactions at the sink for one message to ``rcpts`` recipients: what a run waits for."""
        return rcpts if self.per_recipient else 1


# --- process accounting ------------------------------------------------------------------------------------


def tree_pids(pid: int) -> list[int]:
    out = [pid]
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            out.extend(tree_pids(int(child)))
    return out


_TICKS = os.sysconf("SC_CLK_TCK")


def trees_cpu(roots: Iterable[int]) -> float:
    """CPU seconds of the trees under ``roots``, including children they have reaped (cutime/cstime)."""
    total = 0
    for root in roots:
        for p in tree_pids(root):
            try:
                with open(f"/proc/{p}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return total / _TICKS


def trees_hwm_kb(roots: Iterable[int]) -> int:
    total = 0
    for root in roots:
        for p in tree_pids(root):
            try:
                with open(f"/proc/{p}/status") as f:
                    total += next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
            except (OSError, StopIteration):
                continue
    return total


def trees_pss_kb(roots: Iterable[int]) -> int:
    """Proportional set size: shared pages divided among the processes sharing them (smaps_rollup)."""
    total = 0
    for root in roots:
        for p in tree_pids(root):
            try:
                with open(f"/proc/{p}/smaps_rollup") as f:
                    total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
            except (OSError, StopIteration):
                continue
    return total


class RssSampler(threading.Thread):
    """Every 0.2 s: the sum of VmHWM over the trees (keeps the largest), and the sum of PSS (idem)."""

    def __init__(self, roots: Callable[[], list[int]]) -> None:
        super().__init__(daemon=True)
        self.roots = roots
        self.peak_kb = 0
        self.pss_kb = 0
        self.done = threading.Event()

    def run(self) -> None:
        while True:
            roots = self.roots()
            self.peak_kb = max(self.peak_kb, trees_hwm_kb(roots))
            self.pss_kb = max(self.pss_kb, trees_pss_kb(roots))
            if self.done.wait(0.2):
                break

    def stop(self) -> int:
        self.done.set()
        self.join(5)
        self.peak_kb = max(self.peak_kb, trees_hwm_kb(self.roots()))
        return self.peak_kb


# --- latency probe -----------------------------------------------------------------------------------------


class Probe:
    """One extra client during the load: a new connection every ``interval`` s (or as soon as the previous
    one is done, when it took longer), one message to a fresh recipient; times end of DATA -> final reply.

    It runs in a process of its own (forked), as the paced load does: in a thread of this process its
    timings included waits for this process's GIL (the RSS sampler, the main thread polling the sink),
    which are no part of the server's reply time."""

    def __init__(self, port: int, interval: float, tag: str, size: int) -> None:
        self.port, self.interval, self.tag = port, interval, tag
        self.payload = make_message(size, 0, f"probe@{RECIPIENT.split('@')[1]}").replace(b"\r\n.", b"\r\n..")
        self.latencies: list[float] = []
        self.accepted = 0
        self.failed = 0
        ctx = multiprocessing.get_context("fork")
        self.halt = ctx.Event()
        self._results, self._child_end = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=self._child, daemon=True)

    def start(self) -> None:
        self._proc.start()

    def _child(self) -> None:
        asyncio.run(self._main())
        self._child_end.send((self.latencies, self.accepted, self.failed))

    async def _one(self, k: int) -> None:
        async def reply() -> bytes:
            while True:
                line = await reader.readline()
                if not line:
                    raise ConnectionError("closed")
                if line[3:4] != b"-":
                    return line

        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            await reply()
            writer.write(b"EHLO probe.test\r\n")
            await reply()
            writer.write(f"MAIL FROM:<{SENDER}>\r\n".encode())
            if not (await reply()).startswith(b"250"):
                raise ConnectionError("MAIL refused")
            writer.write(f"RCPT TO:<probe-{self.tag}-{k}@example.test>\r\n".encode())
            if not (await reply()).startswith(b"250"):
                raise ConnectionError("RCPT refused")
            writer.write(b"DATA\r\n")
            if not (await reply()).startswith(b"354"):
                raise ConnectionError("DATA refused")
            writer.write(self.payload + b".\r\n")
            await writer.drain()
            t0 = time.perf_counter()
            final = await reply()
            dt = time.perf_counter() - t0
            if not final.startswith(b"250"):
                raise ConnectionError(final.decode(errors="replace").strip())
            self.latencies.append(dt)
            self.accepted += 1
            writer.write(b"QUIT\r\n")
            await writer.drain()
        finally:
            writer.close()

    async def _main(self) -> None:
        k = 0
        nxt = time.perf_counter()
        while not self.halt.is_set():
            k += 1
            try:
                await asyncio.wait_for(self._one(k), 60)
            except (OSError, ConnectionError, TimeoutError):
                self.failed += 1
            nxt += self.interval
            now = time.perf_counter()
            if nxt > now:
                await asyncio.sleep(nxt - now)
            else:
                nxt = now

    def stop(self) -> None:
        self.halt.set()
        if self._results.poll(120):
            self.latencies, self.accepted, self.failed = self._results.recv()
        self._proc.join(10)


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    if len(xs) == 1:
        return xs[0] * 1000
    return statistics.quantiles(xs, n=100, method="inclusive")[int(p) - 1] * 1000


# --- one measured run --------------------------------------------------------------------------------------


@dataclass
class Result:
    contender: str
    profile: str
    messages: int
    rcpts: int
    txns_per_msg: int  # transactions the contender makes at the sink per load message
    accept_s: float = 0.0
    deliver_s: float = 0.0
    transactions: int = 0
    probe: list[float] = field(default_factory=list)
    probe_ok: int = 0
    probe_failed: int = 0
    cpu_s: float = 0.0
    sink_cpu_s: float = 0.0
    rss_kb: int = 0
    pss_kb: int = 0
    errors: str = ""

    @property
    def accepted_rate(self) -> float:
        """Load and probe messages accepted while smtp-source ran, per second of smtp-source's run."""
        return (self.messages + self.probe_ok) / self.accept_s if self.accept_s else 0.0

    @property
    def expected_txns(self) -> int:
        """Load messages times transactions per message, plus one per probe message (1 recipient)."""
        return self.messages * self.txns_per_msg + self.probe_ok

    @property
    def delivered_msgs(self) -> float:
        """Messages (load + probe): all of them once every expected transaction arrived, else an estimate
        from the transactions that did."""
        if self.complete:
            return self.messages + self.probe_ok
        return max(0, self.transactions - self.probe_ok) / self.txns_per_msg

    @property
    def delivered_rcpts(self) -> float:
        """Recipient copies, from the transactions (the verification phase checks recipients per
        transaction from the dumps; the measured runs only count transactions)."""
        return self.probe_ok + max(0, self.transactions - self.probe_ok) * self.rcpts / self.txns_per_msg

    @property
    def complete(self) -> bool:
        return self.transactions >= self.expected_txns

    @property
    def delivered_rate(self) -> float:
        return self.delivered_msgs / self.deliver_s if self.deliver_s else 0.0

    @property
    def rcpt_rate(self) -> float:
        return self.delivered_rcpts / self.deliver_s if self.deliver_s else 0.0

    @property
    def cpu_ms_per_msg(self) -> float:
        return 1000 * self.cpu_s / max(1, self.messages + self.probe_ok)

    @property
    def cpu_ms_per_copy(self) -> float:
        """Server CPU per recipient copy delivered (profile B: 10 copies per message)."""
        return 1000 * self.cpu_s / max(1, self.delivered_rcpts)

    @property
    def sink_ms_per_msg(self) -> float:
        return 1000 * self.sink_cpu_s / max(1, self.messages + self.probe_ok)


def smtp_source(
    port: int, messages: int, rcpts: int, sessions: int, size: int
) -> subprocess.CompletedProcess[str]:
    cmd = ["smtp-source", "-s", str(sessions), "-m", str(messages), "-l", str(size), "-N"]
    if rcpts > 1:
        cmd += ["-r", str(rcpts)]
    cmd += ["-f", SENDER, "-t", RECIPIENT, f"127.0.0.1:{port}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=3600)


def wait_quiet(sink: Sink, settle: float = 0.5, timeout: float = 60) -> None:
    """Until the sink completed no transaction for ``settle`` seconds (leftovers of an earlier run)."""
    deadline = time.monotonic() + timeout
    last = sink.messages
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = sink.messages
        if now != last:
            last, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= settle:
            return


def wait_transactions(sink: Sink, m0: int, txns: int, timeout: float) -> float:
    """Until ``txns`` transactions past ``m0`` completed at the sink, or ``timeout`` s; returns the wall
    time of the last arrival, read right when the counter reached ``txns`` (with smtp-sink: the counter
    file's mtime, between the final "." and this poll). Polls every 5 ms: a seek and a small read, next to
    nothing beside the run it measures."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sink.messages - m0 >= txns:
            return sink.last
        time.sleep(0.005)
    return sink.last


def measure(
    contender: str,
    profile: str,
    port: int,
    roots: Callable[[], list[int]],
    sink: Sink,
    *,
    messages: int,
    rcpts: int,
    sessions: int,
    size: int,
    probe_interval: float,
    txns_per_msg: int,
    deliver_timeout: float = 300,
) -> Result:
    wait_quiet(sink)
    res = Result(contender, profile, messages, rcpts, txns_per_msg)
    m0 = sink.messages
    sampler = RssSampler(roots)
    sampler.start()
    cpu0 = trees_cpu(roots())
    sink0 = trees_cpu([sink.pid])
    probe = Probe(
        port, probe_interval, f"{contender.split('+')[0]}{profile[0]}{time.time_ns() % 10**9}", size
    )
    t0 = time.time()
    probe.start()
    out = smtp_source(port, messages, rcpts, sessions, size)
    res.accept_s = time.time() - t0
    probe.stop()
    if out.returncode != 0 or out.stderr.strip():
        res.errors = (out.stderr.strip() or f"smtp-source exit {out.returncode}")[-300:]
    res.probe, res.probe_ok, res.probe_failed = probe.latencies, probe.accepted, probe.failed
    last = wait_transactions(sink, m0, res.expected_txns, deliver_timeout)
    res.transactions = sink.messages - m0
    res.deliver_s = max(last, t0) - t0
    res.cpu_s = trees_cpu(roots()) - cpu0
    res.sink_cpu_s = trees_cpu([sink.pid]) - sink0
    res.rss_kb = sampler.stop()
    res.pss_kb = sampler.pss_kb
    return res


@dataclass
class Paced:
    contender: str
    profile: str
    rate: float
    messages: int
    rcpts: int
    accepted: int = 0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    cpu_s: float = 0.0
    complete: bool = False


def _paced_child(conn: Any, port: int, kwargs: dict[str, Any]) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    res = asyncio.run(run_paced(port, **kwargs))
    conn.send((res.accepted, res.elapsed, res.latencies, res.errors + res.refused))
    conn.close()


def measure_paced(
    contender: str,
    profile: str,
    port: int,
    roots: Callable[[], list[int]],
    sink: Sink,
    *,
    rate: float,
    seconds: float,
    rcpts: int,
    sessions: int,
    size: int,
    txns_per_msg: int,
) -> Paced:
    """The 250 latency at a given load: messages offered at ``rate`` (open loop, bench.loadgen.run_paced,
    in a process of its own) for ``seconds``, with the List-Id of the bench list (so list suppression and
    caps run too), each recipient unique."""
    wait_quiet(sink)
    n = max(20, int(rate * seconds))
    res = Paced(contender, profile, rate, n, rcpts)
    m0 = sink.messages
    cpu0 = trees_cpu(roots())
    parent, child = multiprocessing.get_context("fork").Pipe()
    tag = f"paced-{contender.split('+')[0]}{profile[0]}{time.time_ns() % 10**9}"
    kwargs = dict(rate=rate, messages=n, concurrency=sessions, size=size, recipients=rcpts, tag=tag)
    proc = multiprocessing.get_context("fork").Process(target=_paced_child, args=(child, port, kwargs))
    proc.start()
    if parent.poll(seconds * 5 + 120):
        res.accepted, res.elapsed, res.latencies, res.errors = parent.recv()
    proc.join(30)
    wait_transactions(sink, m0, res.accepted * txns_per_msg, 120)
    res.complete = sink.messages - m0 >= res.accepted * txns_per_msg and res.accepted == n
    res.cpu_s = trees_cpu(roots()) - cpu0
    return res


def paced_table(rows: list[Paced]) -> str:
    head = (
        f"{'contender':<17} {'profile':<9} {'offered/s':>9} {'msgs':>6} {'accepted/s':>10} {'250 p50':>8} "
        f"{'p99':>8} {'max':>8} {'CPU ms/msg':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        flag = "" if r.complete else f"  INCOMPLETE ({r.accepted}/{r.messages} accepted, {r.errors} errors)"
        lines.append(
            f"{r.contender:<17} {r.profile:<9} {r.rate:>9.0f} {r.messages:>6} "
            f"{r.accepted / r.elapsed if r.elapsed else 0:>10.0f} {pct(r.latencies, 50):>6.1f}ms "
            f"{pct(r.latencies, 99):>6.1f}ms {max(r.latencies, default=0) * 1000:>6.1f}ms "
            f"{1000 * r.cpu_s / max(1, r.accepted):>10.2f}{flag}"
        )
    return "\n".join(lines)


def warm_up(port: int, sink: Sink, sessions: int, size: int) -> None:
    """Start worker processes, load keys, fill caches: a small unmeasured run."""
    m0 = sink.messages
    n = max(2 * sessions, 40)
    smtp_source(port, n, 1, sessions, size)
    wait_transactions(sink, m0, n, 60)  # one recipient: one transaction whoever sends


# --- relayd ------------------------------------------------------------------------------------------------


def build_store(db: Path, entries: int) -> float:
    """``entries`` global suppressions (plus 1 % account and 1 % list entries for the bench account) through
    ``SqliteStore.add`` in batches of 100 k; returns seconds taken."""
    from relayd.store import Reason, Scope, SqliteStore, SuppressionEntry

    async def run() -> None:
        now = datetime.now(UTC)
        store = SqliteStore(db)
        await store.open()
        try:
            step = 100_000
            for lo in range(0, entries, step):
                await store.add(
                    SuppressionEntry(
                        f"sup{i:09d}@suppressed.example",
                        Scope.GLOBAL,
                        None,
                        None,
                        Reason.HARD_BOUNCE,
                        "bench",
                        now,
                    )
                    for i in range(lo, min(entries, lo + step))
                )
            extra = max(100, entries // 100)
            await store.add(
                SuppressionEntry(
                    f"acct{i:07d}@suppressed.example",
                    Scope.ACCOUNT,
                    "acme",
                    None,
                    Reason.COMPLAINT,
                    "bench",
                    now,
                )
                for i in range(extra)
            )
            await store.add(
                SuppressionEntry(
                    f"list{i:07d}@suppressed.example",
                    Scope.LIST,
                    "acme",
                    "news",
                    Reason.UNSUBSCRIBE,
                    "bench",
                    now,
                )
                for i in range(extra)
            )
        finally:
            await store.close()

    t = time.perf_counter()
    asyncio.run(run())
    return time.perf_counter() - t


class Relayd:
    def __init__(self, tmp: Path, sink_port: int, workers: int, suppressions: int) -> None:
        self.tmp = tmp
        self.port = free_port()
        tmp.mkdir(parents=True, exist_ok=True)
        self.cfg = write_config(tmp, self.port, sink_port, pipeline_config(tmp), workers)
        self.key_file = tmp / "dkim" / f"{DOMAIN}.bench.rsa.pem"
        self.db = tmp / "relayd.db"
        self.build_s = build_store(self.db, suppressions)
        self.db_mb = sum(p.stat().st_size for p in tmp.glob("relayd.db*")) / 1e6
        # the store was just written: without this the kernel writes it back during the measured runs,
        # and the queue's fsyncs wait behind that (a 1 M-entry store cost relayd a quarter of its rate)
        os.sync()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.tmp / "relayd.log").open("wb")
        # info, relayd's default: a line per submission and per delivery attempt, as Postfix logs to its
        # maillog_file in this bench
        cmd = [sys.executable, "-m", "relayd", "serve", "--config", str(self.cfg), "--log-level", "info"]
        # A session of its own, as Postfix's master makes itself (setsid) and as a service has its own
        # cgroup: with autogroup scheduling (Linux's default) the CPU is shared between sessions first, so
        # in this bench's session relayd's processes would compete one by one with smtp-source, the sink
        # and the latency probe, while Postfix's compete as one group.
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=ROOT, start_new_session=True)
        try:
            wait_port(self.port, 60)
        except SystemExit:
            self.stop()
            raise RuntimeError(f"relayd did not start: {self.log_tail()}") from None

    def roots(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []

    def log_tail(self) -> str:
        try:
            return (self.tmp / "relayd.log").read_text(errors="replace")[-1500:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None


# --- DKIM verification -------------------------------------------------------------------------------------


def dkim_record(key_file: Path, selector: str, domain: str = DOMAIN) -> tuple[str, str]:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return f"{selector}._domainkey.{domain}", f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


def verify_dkim(files: list[Path], record: tuple[str, str], workdir: Path) -> tuple[int, list[str]]:
    """(messages with a passing signature of DOMAIN and the expected selector, problems)."""
    if not files:
        return 0, ["no messages were kept"]
    try:
        rows = verify_files(files, dict([record]), workdir)
    except RuntimeError as exc:
        return 0, [str(exc)]
    selector = record[0].split(".", 1)[0]
    passed: set[str] = set()
    problems = []
    for name, dom, sel, detail in rows:
        if dom == DOMAIN and sel == selector and detail == "pass":
            passed.add(name)
        elif dom == DOMAIN and sel == selector:
            problems.append(f"{Path(name).name}: {detail}")
    return len(passed), problems


def _wait_dumps(sink: SmtpSink, t0: int, txns: int, timeout: float = 180) -> None:
    """Until ``txns`` transactions past ``t0`` completed (counted from the dumps), then quiet: a contender
    that made more than expected shows as such. Long enough for a contender whose pooled connection to the
    previous sink broke to retry (Postfix after minimal_backoff_time, 10 s in tests/postfix_instance.py)."""
    deadline = time.monotonic() + timeout
    while sink.transactions - t0 < txns and time.monotonic() < deadline:
        time.sleep(0.1)
    wait_quiet(sink)


def check_delivery(
    contenders: list[Contender],
    sink: SmtpSink,
    *,
    n_a: int,
    n_b: int,
    sessions: int,
    size: int,
    records: dict[int, tuple[str, str]],
    workdir: Path,
) -> list[str]:
    """Unmeasured: ``n_a`` profile-A and ``n_b`` profile-B messages through each contender into an
    smtp-sink that dumps every transaction. Checks what the measured runs assumed (every recipient
    delivered, in the number of transactions :meth:`Contender.transactions_per_message` says) and verifies
    the DKIM signatures of every transaction kept (both profiles). One line per contender and check."""
    lines = []
    for c in contenders:
        counts = []
        for profile, n, rc in (("A", n_a, 1), ("B", n_b, 10)):
            if n <= 0:
                continue
            wait_quiet(sink)
            # each transaction kept: relayd signs each copy of a profile-B message on its own, and sends
            # them pipelined one behind the other (their DKIM is checked as well as profile A's)
            sink.start_keeping(n * c.transactions_per_message(rc), c.tag + (0 if rc == 1 else 100))
            t0, r0 = sink.transactions, sink.recipients
            out = smtp_source(c.port, n, rc, sessions, size)
            _wait_dumps(sink, t0, n * c.transactions_per_message(rc))
            txns, rcpts = sink.transactions - t0, sink.recipients - r0
            ok = txns == n * c.transactions_per_message(rc) and rcpts == n * rc
            err = (
                f", smtp-source: {out.stderr.strip()[-200:]}" if out.returncode or out.stderr.strip() else ""
            )
            counts.append(
                f"{profile} {n}x{rc} rcpt: {rcpts}/{n * rc} recipients in {txns} transactions "
                f"({'ok' if ok else 'MISMATCH'}{err})"
            )
        lines.append(f"{c.name}: recipients at the sink (RCPTs in the dumps): {'; '.join(counts)}")
        for profile, n, tag in (("A", n_a, c.tag), ("B", n_b, c.tag + 100)):
            if n > 0 and c.tag in records:
                files = sink.kept(tag)
                ok_n, problems = verify_dkim(files, records[c.tag], workdir)
                more = f" ({'; '.join(problems[:3])})" if problems else ""
                lines.append(f"{c.name}: profile {profile}: {ok_n}/{len(files)} transactions verified{more}")
    return lines


# --- output ------------------------------------------------------------------------------------------------


def table(results: list[Result]) -> str:
    head = (
        f"{'contender':<17} {'profile':<9} {'msgs':>6} {'accepted/s':>10} {'delivered/s':>11} "
        f"{'copies/s':>8} {'txns':>6} {'250 p50':>8} {'p99':>8} {'probe':>6} {'CPU ms/msg':>10} "
        f"{'ms/copy':>7} {'sink':>5} {'peak RSS':>9} {'PSS':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        flag = (
            "" if r.complete else f"  INCOMPLETE: {r.transactions}/{r.expected_txns} transactions at the sink"
        )
        if r.probe_failed:
            flag += f"  probe failures: {r.probe_failed}"
        if r.errors:
            flag += f"  smtp-source: {r.errors}"
        lines.append(
            f"{r.contender:<17} {r.profile:<9} {r.messages:>6} {r.accepted_rate:>10.0f} "
            f"{r.delivered_rate:>11.0f} {r.rcpt_rate:>8.0f} {r.transactions:>6} {pct(r.probe, 50):>6.1f}ms "
            f"{pct(r.probe, 99):>6.1f}ms {r.probe_ok:>6} {r.cpu_ms_per_msg:>10.2f} {r.cpu_ms_per_copy:>7.3f} "
            f"{r.sink_ms_per_msg:>5.2f} {r.rss_kb / 1024:>6.0f} MB {r.pss_kb / 1024:>4.0f} MB{flag}"
        )
    return "\n".join(lines)


def ratios(results: list[Result]) -> list[str]:
    by = {(r.contender, r.profile): r for r in results}
    out = []
    for profile in ("A 1 rcpt", "B 10 rcpt"):
        a, b = by.get(("relayd", profile)), by.get(("postfix+opendkim", profile))
        if a and b and b.delivered_rate and b.accepted_rate and b.cpu_ms_per_msg and b.cpu_ms_per_copy:
            out.append(
                f"relayd/Postfix, profile {profile}: "
                f"delivered msg/s {a.delivered_rate / b.delivered_rate:.2f}x, "
                f"accepted msg/s {a.accepted_rate / b.accepted_rate:.2f}x, "
                f"CPU/msg {a.cpu_ms_per_msg / b.cpu_ms_per_msg:.1f}x, "
                f"CPU/copy {a.cpu_ms_per_copy / b.cpu_ms_per_copy:.1f}x"
            )
    return out


# --- main --------------------------------------------------------------------------------------------------


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small runs, 100 k suppressions; under a minute")
    ap.add_argument("--workers", type=int, default=2, help="relayd worker processes (default 2)")
    ap.add_argument("--suppressions", type=int, help="global suppression entries (default 1 M, quick 100 k)")
    ap.add_argument("--messages", type=int, help="profile A messages (default 5000, quick 1000)")
    ap.add_argument(
        "--messages-b",
        type=int,
        help="profile B messages, 10 rcpt each (default 3000: ~200 probes, as profile A has; quick 200)",
    )
    ap.add_argument("--concurrency", type=int, default=20, help="smtp-source sessions (-s)")
    ap.add_argument("--size", type=int, default=5120, help="message size (smtp-source -l)")
    ap.add_argument("--probe-interval", type=float, default=20, help="latency probe period, ms (default 20)")
    ap.add_argument(
        "--verify",
        type=int,
        help="verification phase: profile-A messages per contender, DKIM-verified (100, quick 20)",
    )
    ap.add_argument(
        "--verify-b",
        type=int,
        default=5,
        help="verification phase: profile-B messages per contender, recipients counted (default 5)",
    )
    ap.add_argument(
        "--paced-seconds",
        type=float,
        help="length of each open-loop run at Postfix's rate (default 10, quick 4; 0: none)",
    )
    ap.add_argument(
        "--paced-rate",
        type=float,
        nargs=2,
        metavar=("A", "B"),
        help="offered msg/s of the open-loop runs (default: Postfix's delivered msg/s in each profile)",
    )
    ap.add_argument("--relayd-only", action="store_true", help="skip Postfix + OpenDKIM")
    ap.add_argument("--scale", action="store_true", help="also the store-size runs (default on full runs)")
    ap.add_argument("--no-scale", action="store_true", help="no store-size runs")
    ap.add_argument("--scale-only", action="store_true", help="only the store-size runs")
    ap.add_argument("--scale-small", type=int, default=10_000, help="small store for --scale (10 k)")
    ap.add_argument(
        "--scale-entries", type=int, help="large store for --scale (default 3 M; the issue's figure is 10 M)"
    )
    ap.add_argument("--scale-messages", type=int, help="profile A messages per scale run (3000, quick 500)")
    ap.add_argument(
        "--chunking-sink",
        action="store_true",
        help="also the saturation runs into a Python sink offering CHUNKING (bench/keeping_sink.py), as a "
        "second table: relayd's client sends BDAT, Postfix's DATA, which that sink parses in Python",
    )
    ap.add_argument("--keep-tmp", action="store_true", help="leave the temp dirs (logs, configs) in place")
    args = ap.parse_args(argv)

    q = args.quick
    suppressions = args.suppressions if args.suppressions is not None else (100_000 if q else 1_000_000)
    msgs_a = args.messages or (1000 if q else 5000)
    # B used to send 1000: the probe then saw ~60 messages, and their "p99" was the worst one or two
    msgs_b = args.messages_b or (200 if q else 3000)
    n_verify = args.verify if args.verify is not None else (20 if q else 100)
    paced_seconds = args.paced_seconds if args.paced_seconds is not None else (4 if q else 10)
    scale = (args.scale or args.scale_only or not q) and not args.no_scale
    scale_big = args.scale_entries or (1_000_000 if q else 3_000_000)
    scale_msgs = args.scale_messages or (500 if q else 3000)
    interval = args.probe_interval / 1000
    with_postfix = not args.relayd_only and not args.scale_only
    if shutil.which("smtp-source") is None:
        print("smtp-source (Debian package postfix) is needed as the load generator", file=sys.stderr)
        return 2
    if with_postfix and (why := postfix_instance.available()) is not None:
        print(f"Postfix + OpenDKIM skipped: {why}")
        with_postfix = False

    signal.signal(signal.SIGTERM, _sigterm)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="relayd-e2e-"))
    sink: Sink = SmtpSink(tmp / "kept")
    running: list[Callable[[], None]] = []
    results: list[Result] = []
    common = dict(sessions=args.concurrency, size=args.size, probe_interval=interval)
    print(
        f"load: smtp-source -s {args.concurrency} -l {args.size} -N, one message per connection; "
        f"probe every {args.probe_interval:g} ms; {os.cpu_count()} CPUs; sink: smtp-sink on "
        f"127.0.0.1:{sink.port} (PIPELINING, 8BITMIME, ENHANCEDSTATUSCODES, no CHUNKING); "
        f"load average before {os.getloadavg()[0]:.1f}"
    )
    try:
        verified: list[str] = []
        # Both contenders run at once (the idle one costs next to nothing) and the profiles alternate
        # between them, so that each pair of figures is measured close together in time: on a shared
        # machine the background load drifts over minutes.
        contenders: list[Contender] = []
        records: dict[int, tuple[str, str]] = {}  # keep tag -> DKIM key record
        if not args.scale_only:
            rd = Relayd(tmp / "relayd", sink.port, args.workers, suppressions)
            print(
                f"relayd: whole pipeline, {args.workers} workers, store {suppressions:,} global + "
                f"{2 * max(100, suppressions // 100):,} account/list suppressions "
                f"(SqliteStore.add: {rd.build_s:.1f} s, {rd.db_mb:.0f} MB)",
                flush=True,
            )
            rd.start()
            running.append(rd.stop)
            warm_up(rd.port, sink, args.concurrency, args.size)
            contenders.append(Contender("relayd", rd.port, rd.roots, 1, per_recipient=True))
            records[1] = dkim_record(rd.key_file, "bench")

        if with_postfix:
            pf = postfix_instance.PostfixInstance(
                free_port(), sink.port, domain=DOMAIN, selector="pfx", keep=args.keep_tmp
            )
            running.append(pf.stop)
            try:
                pf.start()
            except RuntimeError as exc:
                print(f"Postfix + OpenDKIM could not run: {exc}")
            else:
                print(
                    f"postfix+opendkim: Postfix {pf.version()} private instance in {pf.base}, OpenDKIM "
                    f"rsa-2048 relaxed/relaxed (milter), default_process_limit 100",
                    flush=True,
                )
                warm_up(pf.port, sink, args.concurrency, args.size)
                contenders.append(Contender("postfix+opendkim", pf.port, pf.pids, 2, per_recipient=False))
                records[2] = dkim_record(pf.key_file, pf.selector)

        def saturation(label: str = "") -> list[Result]:
            out = []
            for profile, n, rc in (("A 1 rcpt", msgs_a, 1), ("B 10 rcpt", msgs_b, 10)):
                for c in contenders:
                    r = measure(
                        c.name,
                        profile,
                        c.port,
                        c.roots,
                        sink,
                        messages=n,
                        rcpts=rc,
                        txns_per_msg=c.transactions_per_message(rc),
                        **common,
                    )
                    out.append(r)
                    print(f"  {c.name}, {profile}{label}: done in {r.deliver_s:.1f} s", flush=True)
                    if not r.complete and c.name.startswith("postfix"):
                        print(pf.log_tail(10))
            return out

        results = saturation()
        paced: list[Paced] = []
        by = {(r.contender, r.profile): r for r in results}
        for k, (profile, rc) in enumerate((("A 1 rcpt", 1), ("B 10 rcpt", 10))):
            ref = by.get(("postfix+opendkim", profile))
            rate = args.paced_rate[k] if args.paced_rate else (ref.delivered_rate if ref else 0.0)
            if paced_seconds <= 0 or rate <= 0:
                continue
            for c in contenders:
                pr = measure_paced(
                    c.name,
                    profile,
                    c.port,
                    c.roots,
                    sink,
                    rate=rate,
                    seconds=paced_seconds,
                    rcpts=rc,
                    sessions=args.concurrency,
                    size=args.size,
                    txns_per_msg=c.transactions_per_message(rc),
                )
                paced.append(pr)
                print(f"  {c.name}, {profile}, paced at {rate:.0f} msg/s: done", flush=True)
        chunked: list[Result] = []
        # the contenders relay to the sink's port: each sink below takes it over in turn
        port = sink.port
        if args.chunking_sink and contenders:
            sink.stop()
            time.sleep(3)  # cached connections to the old sink are noticed as closed, not reused
            sink = KeepingSink(tmp / "kept-chunking", chunking=True, port=port)
            for c in contenders:
                warm_up(c.port, sink, args.concurrency, args.size)
            chunked = saturation(" (Python CHUNKING sink)")
        if contenders and (n_verify > 0 or args.verify_b > 0):
            sink.stop()
            time.sleep(3)
            dumping = SmtpSink(tmp / "kept", port=port, dump=True)
            sink = dumping
            print("  verification phase: smtp-sink with a dump per transaction (unmeasured)", flush=True)
            verified = check_delivery(
                contenders,
                dumping,
                n_a=n_verify,
                n_b=args.verify_b,
                sessions=args.concurrency,
                size=args.size,
                records=records,
                workdir=tmp,
            )
        for stop in reversed(running):
            stop()
        running.clear()
        if scale and not (isinstance(sink, SmtpSink) and not sink.dump):
            sink.stop()
            sink = SmtpSink(tmp / "kept")  # new relayd instances below: a port of its own will do

        if results:
            print()
            print("Sink: Postfix's smtp-sink (C; PIPELINING, no CHUNKING: both contenders send DATA)")
            print(table(results))
            for line in ratios(results):
                print(line)
            if chunked:
                print()
                print(
                    "Sink: the Python sink offering CHUNKING (bench/keeping_sink.py), same saturation runs;\n"
                    "it favours relayd: relayd's client sends BDAT, which it takes whole, Postfix's client\n"
                    "sends DATA, which it scans for the final dot in Python, on the same CPUs:"
                )
                print(table(chunked))
                for line in ratios(chunked):
                    print(line)
            if paced:
                print()
                print(
                    "250 latency at the same offered load: open loop (bench.loadgen.run_paced, List-Id of "
                    "the bench list), paced at Postfix's delivered msg/s of the profile:"
                )
                print(paced_table(paced))
            if verified:
                print()
                print(
                    f"Verification (unmeasured, smtp-sink with dumps): {n_verify} profile-A and "
                    f"{args.verify_b} profile-B messages per contender; recipients from the RCPTs in the "
                    "dumps; DKIM of every transaction, Perl Mail::DKIM (key from file, no DNS):"
                )
                for line in verified:
                    print("  " + line)

        if scale:
            print()
            print(f"relayd, profile A ({scale_msgs} messages), by store size:")
            print(
                f"  {'entries':>12} {'build s':>8} {'store MB':>8} {'accepted/s':>10} {'delivered/s':>11} "
                f"{'250 p50':>8} {'p99':>8} {'CPU ms/msg':>10} {'peak RSS':>9} {'PSS':>7}"
            )
            for i, entries in enumerate((args.scale_small, scale_big)):
                rd = Relayd(tmp / f"relayd-scale{i}", sink.port, args.workers, entries)
                rd.start()
                running.append(rd.stop)
                warm_up(rd.port, sink, args.concurrency, args.size)
                r = measure(
                    "relayd",
                    "A 1 rcpt",
                    rd.port,
                    rd.roots,
                    sink,
                    messages=scale_msgs,
                    rcpts=1,
                    txns_per_msg=1,
                    **common,
                )
                rd.stop()
                running.remove(rd.stop)
                flag = "" if r.complete else f"  INCOMPLETE {r.transactions}/{r.expected_txns} transactions"
                print(
                    f"  {entries:>12,} {rd.build_s:>8.1f} {rd.db_mb:>8.0f} {r.accepted_rate:>10.0f} "
                    f"{r.delivered_rate:>11.0f} {pct(r.probe, 50):>6.1f}ms {pct(r.probe, 99):>6.1f}ms "
                    f"{r.cpu_ms_per_msg:>10.2f} {r.rss_kb / 1024:>6.0f} MB {r.pss_kb / 1024:>4.0f} MB{flag}",
                    flush=True,
                )
                if not args.keep_tmp:
                    shutil.rmtree(rd.tmp, ignore_errors=True)
        print(f"\ntotal {time.perf_counter() - started:.0f} s; load average now {os.getloadavg()[0]:.1f}")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:  # a contender that did not start
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        for stop in reversed(running):
            stop()
        sink.stop()
        if args.keep_tmp:
            print(f"temp dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
