"""Endurance under faults: many messages through a real ``relayd serve`` while everything around it fails.

What happens during one run (all of it at once, from seeded random generators):

* clients submit ``messages`` numbered messages over SMTP (AUTH, several transactions per connection); a
  message is the client's until it sees ``250``: any other answer or a broken connection and it is sent
  again later (a ``5xx`` is recorded and not retried);
* the receiving side (:mod:`tests.endurance.sink`) answers 421/451/550, cuts connections mid-DATA, stalls
  past relayd's ``[delivery] command_timeout`` (set to 2 s here) and stores messages whose ``250`` relayd
  never sees;
* relayd is killed with ``kill -9`` at random moments and restarted at once;
* the queue's filesystem fills up. How: the queue *and* the store live on a tmpfs of their own (mounted
  for the run; needs root, see :mod:`tests.endurance.disk`) and a balloon file eats its free space, either
  to below ``[queue] min_free_space`` (relayd must refuse new mail with ``452 4.3.1`` and keep delivering)
  or to the last block (every write fails with ENOSPC: 451/452, duplicates allowed, nothing lost). A real
  filesystem rather than fault injection in relayd, because ENOSPC then hits whichever write needs the
  next block -- WAL frame, ``-shm`` index, checkpoint, events table -- exactly as in production.

The ledger, per message the client saw ``250`` for (its marker is the ``X-Endurance-Id`` header):
delivered (the sink stored the marker), bounced / expired / still queued (the state of its queue id in
``relayd queue list --json``), and **lost**: accepted but none of those. ``lost`` must be 0. Duplicates (a
marker stored more than once) are allowed -- delivery is at-least-once -- and reported.
"""

from __future__ import annotations

import contextlib
import json
import queue
import random
import re
import shutil
import smtplib
import sqlite3
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.endurance.disk import SmallDisk, unavailable
from tests.endurance.sink import ChaosSink, Faults
from tests.harness import PASSWORD, Relayd

SENDER = "app@acme.example.test"
QUEUED_AS = re.compile(rb"queued as ([a-z2-7]{16})$")
STALL_SECONDS = 120.0  # no submission answered for this long: the run is stuck, stop it


@dataclass(frozen=True)
class Plan:
    """Knobs of one run; ``quick()`` is what CI runs."""

    messages: int = 20_000
    clients: int = 12
    seed: int = 1
    kill_every: tuple[float, float] = (2.0, 6.0)  # seconds between kill -9s
    disk_every: tuple[float, float] = (3.0, 8.0)  # seconds between disk-full phases
    disk_for: tuple[float, float] = (1.0, 3.0)  # how long the disk stays full
    completely_full: float = 0.3  # share of phases that take the last block (the rest: below min_free)
    disk_size: int = 256 << 20
    min_free: int = 4 << 20
    reject_share: float = 0.01  # recipients the sink always refuses with 550 5.1.1 (bounced)
    defer_share: float = 0.005  # recipients the sink always answers 451 (expired after max_age)
    big_share: float = 0.02  # messages with a 32 KB body
    max_age: float = 90.0  # long enough that mostly the -defer recipients expire
    retry_schedule: tuple[str, ...] = ("1s", "2s", "4s")
    drain_timeout: float = 300.0
    faults: Faults = field(default_factory=Faults)

    @classmethod
    def quick(cls, seed: int = 1) -> Plan:
        """A few thousand messages in well under 90 s: faults come faster, so a run still sees several
        kills and disk-full phases of both kinds."""
        return cls(
            messages=4000,
            clients=8,
            seed=seed,
            kill_every=(1.0, 2.5),
            disk_every=(1.0, 2.5),
            disk_for=(0.3, 1.0),
            completely_full=0.4,
            disk_size=64 << 20,
            max_age=15.0,
            retry_schedule=("1s", "2s"),
            drain_timeout=45.0,
        )


@dataclass
class Ledger:
    messages: int = 0
    accepted: int = 0
    delivered: int = 0
    bounced: int = 0
    expired: int = 0
    still_queued: int = 0
    dropped: int = 0
    lost: int = 0
    duplicates: int = 0
    refused_4xx_disk_full: int = 0
    refused_4xx_other: int = 0
    refused_5xx: int = 0
    connection_errors: int = 0
    kills: int = 0
    disk_full_phases: int = 0
    delivered_unacknowledged: int = 0  # stored at the sink, but the client never saw its 250
    expected_bounced: int = 0  # accepted messages to -reject recipients
    expected_expired: int = 0  # accepted messages to -defer recipients
    events_bounced: int = 0
    events_expired: int = 0
    integrity: dict[str, str] = field(default_factory=dict)
    refusals: dict[str, int] = field(default_factory=dict)
    sink_faults: dict[str, int] = field(default_factory=dict)
    lost_markers: list[int] = field(default_factory=list)
    lost_detail: list[str] = field(default_factory=list)  # marker:queue id:state in the queue
    unmarked: int = 0  # messages at the sink without a marker (should be 0)
    anomalies: list[str] = field(default_factory=list)  # replies that make no sense (should be none)
    seconds: float = 0.0
    seed: int = 0

    def render(self) -> str:
        rows = [
            ("messages submitted", self.messages),
            ("accepted (250)", self.accepted),
            ("  delivered (marker at the sink)", self.delivered),
            ("  bounced (5xx, queue state failed)", self.bounced),
            ("  expired (max_age)", self.expired),
            ("  still queued", self.still_queued),
            ("  dropped", self.dropped),
            ("  LOST", self.lost),
            ("duplicates at the sink", self.duplicates),
            ("stored at the sink, 250 never seen by client", self.delivered_unacknowledged),
            ("refused 4xx while the disk was full", self.refused_4xx_disk_full),
            ("refused 4xx otherwise", self.refused_4xx_other),
            ("refused 5xx", self.refused_5xx),
            ("client connection errors", self.connection_errors),
            ("kill -9", self.kills),
            ("disk-full phases", self.disk_full_phases),
            (
                "expected bounced / expired (-reject / -defer)",
                f"{self.expected_bounced} / {self.expected_expired}",
            ),
            ("events bounced / expired", f"{self.events_bounced} / {self.events_expired}"),
            ("integrity_check", ", ".join(f"{k}: {v}" for k, v in self.integrity.items())),
            ("seconds", f"{self.seconds:.0f}"),
            ("seed", self.seed),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        lines.append("refusals by reply: " + json.dumps(self.refusals, sort_keys=True))
        lines.append("sink faults: " + json.dumps(self.sink_faults, sort_keys=True))
        if self.lost_detail:
            lines.append(f"lost (marker:queue id:state, first 50): {self.lost_detail[:50]}")
        if self.anomalies:
            lines.append(f"anomalies (first 10): {self.anomalies[:10]}")
        if self.unmarked:
            lines.append(f"messages at the sink without a marker: {self.unmarked}")
        return "\n".join(lines)

    def as_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def recipient(n: int, rng: random.Random, plan: Plan) -> str:
    roll = rng.random()
    if roll < plan.reject_share:
        return f"e{n}-reject@example.test"
    if roll < plan.reject_share + plan.defer_share:
        return f"e{n}-defer@example.test"
    return f"e{n}@example.test"


def message(n: int, big: bool) -> bytes:
    body = ("All work and no play makes Jack a dull boy. " * 2 + "\r\n") * (360 if big else 2)
    return (
        f"From: App <{SENDER}>\r\nTo: <e{n}@example.test>\r\nSubject: endurance {n}\r\n"
        f"Message-ID: <endurance.{n}.{time.time_ns()}@acme.example.test>\r\nX-Endurance-Id: {n}\r\n"
        f"Date: Mon, 23 Nov 2026 12:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}"
    ).encode()


class Run:
    def __init__(self, plan: Plan, workdir: Path, *, log: Any = print) -> None:
        self.plan = plan
        self.workdir = workdir
        self.say = log
        self.rng = random.Random(plan.seed)
        self.addresses = {n: recipient(n, self.rng, plan) for n in range(plan.messages)}
        self.big = {n for n in range(plan.messages) if self.rng.random() < plan.big_share}
        self.todo: queue.Queue[int] = queue.Queue()
        self.accepted: dict[int, str] = {}
        self.timeline: list[str] = []  # kills and disk phases, wall clock, for reading next to relayd.log
        self.rejected: dict[int, str] = {}
        self.refusals: Counter[str] = Counter()
        self.lock = threading.RLock()
        self.done = threading.Event()  # every message answered: stop the clients and the chaos
        self.disk_full = threading.Event()
        self.disk_full_until = 0.0
        self.broken: str | None = None  # why the run can't go on
        self.ledger = Ledger(messages=plan.messages, seed=plan.seed)

    # --- the parts -------------------------------------------------------------------------------------

    def _client(self, relayd: Relayd) -> None:
        conn: smtplib.SMTP | None = None
        while not self.done.is_set():
            try:
                n = self.todo.get(timeout=0.1)
            except queue.Empty:
                continue
            reply: tuple[int, bytes] | None = None
            try:
                if conn is None:
                    conn = smtplib.SMTP("127.0.0.1", relayd.port, timeout=30)
                    conn.login("acme", PASSWORD)
                reply = conn.mail(SENDER)
                if reply[0] == 250:
                    reply = conn.rcpt(self.addresses[n])
                if reply[0] == 250:
                    reply = conn.data(message(n, n in self.big))
            except smtplib.SMTPResponseException as exc:  # e.g. 4xx to DATA itself, 421 at login
                error = exc.smtp_error
                reply = (exc.smtp_code, error if isinstance(error, bytes) else error.encode())
                if exc.smtp_code == 421:
                    _close(conn)
                    conn = None
            except (OSError, smtplib.SMTPException):
                reply = None  # whatever the last reply was, it was not the answer to DATA
                with self.lock:
                    self.ledger.connection_errors += 1
                _close(conn)
                conn = None
            if reply is not None and reply[0] == 250:
                queued = QUEUED_AS.search(reply[1])
                with self.lock:
                    if queued is not None:
                        self.accepted[n] = queued.group(1).decode()
                        continue
                    self.ledger.anomalies.append(f"250 to DATA without a queue id for {n}: {reply!r}")
                    reply = None
            if reply is not None:
                self._refused(n, reply)
                if reply[0] >= 500:
                    continue  # a permanent refusal: recorded, not retried
                if conn is not None:
                    with contextlib.suppress(OSError, smtplib.SMTPException):
                        conn.rset()
            time.sleep(0.05)
            self.todo.put(n)  # no 250: the client still owns the message and sends it again
        _close(conn)

    def _refused(self, n: int, reply: tuple[int, bytes]) -> None:
        text = reply[1].decode(errors="replace")
        key = f"{reply[0]} {' '.join(text.split()[:3])}"
        full = self.disk_full.is_set() or time.monotonic() < self.disk_full_until + 1.0
        with self.lock:
            self.refusals[key] += 1
            if reply[0] >= 500:
                self.ledger.refused_5xx += 1
                self.rejected[n] = text
            elif full:
                self.ledger.refused_4xx_disk_full += 1
            else:
                self.ledger.refused_4xx_other += 1

    def _killer(self, relayd: Relayd) -> None:
        rng = random.Random(self.plan.seed + 1)
        while not self.done.wait(rng.uniform(*self.plan.kill_every)):
            relayd.kill()
            self._note("kill -9")
            self.ledger.kills += 1
            time.sleep(rng.uniform(0.05, 0.5))
            for _ in range(3):
                try:
                    relayd.start()
                    break
                except (RuntimeError, TimeoutError, OSError) as exc:
                    self._note(f"restart failed: {exc}")
                    relayd.kill()
                    time.sleep(1.0)
            else:
                self.broken = "relayd did not come back after kill -9 (see timeline.txt and relayd.log)"
                return
            self._note("restarted")

    def _filler(self, disk: SmallDisk) -> None:
        rng = random.Random(self.plan.seed + 2)
        while not self.done.wait(rng.uniform(*self.plan.disk_every)):
            leave = 0 if rng.random() < self.plan.completely_full else self.plan.min_free // 2
            self.disk_full.set()
            self._note(f"disk full, leaving {leave} bytes")
            self.ledger.disk_full_phases += 1
            until = time.monotonic() + rng.uniform(*self.plan.disk_for)
            while time.monotonic() < until and not self.done.is_set():
                disk.fill(leave)  # top up: relayd's own writes and frees move the level
                time.sleep(0.1)
            disk.drain()
            self._note("disk drained")
            self.disk_full_until = time.monotonic()
            self.disk_full.clear()

    def _note(self, what: str) -> None:
        with self.lock:
            self.timeline.append(f"{time.time():.3f} {what}")

    def _answered(self) -> int:
        with self.lock:
            return len(self.accepted) + len(self.rejected)

    # --- the run -----------------------------------------------------------------------------------------

    def execute(self) -> Ledger:
        plan = self.plan
        started = time.monotonic()
        with (
            ChaosSink(plan.faults, plan.seed + 3) as sink,
            SmallDisk(self.workdir / "var", plan.disk_size) as disk,
        ):
            relayd = self._relayd(disk, sink)
            relayd.start()
            try:
                for n in range(plan.messages):
                    self.todo.put(n)
                threads = [threading.Thread(target=self._client, args=(relayd,)) for _ in range(plan.clients)]
                threads.append(threading.Thread(target=self._killer, args=(relayd,)))
                threads.append(threading.Thread(target=self._filler, args=(disk,)))
                for t in threads:
                    t.start()
                last, progress = -1, time.monotonic()
                while self._answered() < plan.messages:
                    time.sleep(1.0)
                    answered = self._answered()
                    if answered // 1000 != last // 1000:
                        self.say(f"[{time.monotonic() - started:5.0f}s] answered {answered}/{plan.messages}")
                    if answered != last:
                        last, progress = answered, time.monotonic()
                    if self.broken is None and time.monotonic() - progress > STALL_SECONDS:
                        self.broken = f"no submission answered for {STALL_SECONDS:.0f} s"
                    if self.broken is not None:
                        self.done.set()
                        (self.workdir / "timeline.txt").write_text("\n".join(self.timeline) + "\n")
                        raise RuntimeError(f"endurance run stopped: {self.broken}; state in {self.workdir}")
                self.done.set()
                for t in threads:
                    t.join(60)
                if relayd.proc is None:
                    relayd.start()
                self.say(f"[{time.monotonic() - started:5.0f}s] all answered; waiting for the queue to drain")
                self._drain(relayd, sink)
                relayd.stop()
                self._tally(relayd, sink)
                for db in (disk.path / "queue" / "queue.db", disk.path / "relayd.db"):
                    self.ledger.integrity[db.name] = _integrity(db)
                    if self.ledger.lost:  # keep the evidence: the tmpfs goes away with the run
                        shutil.copy(db, self.workdir / db.name)
                (self.workdir / "ledger.json").write_text(self.ledger.as_json() + "\n")
                (self.workdir / "timeline.txt").write_text("\n".join(self.timeline) + "\n")
            finally:
                relayd.kill()
        self.ledger.seconds = time.monotonic() - started
        return self.ledger

    def _relayd(self, disk: SmallDisk, sink: ChaosSink) -> Relayd:
        plan = self.plan
        schedule = "[" + ", ".join(f'"{s}"' for s in plan.retry_schedule) + "]"
        relayd = Relayd(
            self.workdir,
            routes={"example.test": sink.port},
            retry_schedule=schedule,
            queue_extra=f'max_age = "{plan.max_age:g}s"\nmin_free_space = {plan.min_free}',
            # sink stalls must end in a timeout, not a wait; reputation is not under test here (2 % 5xx)
            extra="\n[policy.thresholds]\nhard_bounce_suspend = 1.0\n",
        )
        text = relayd.config.read_text()
        text = text.replace('command_timeout = "30s"', 'command_timeout = "2s"')
        text = text.replace(f'"{self.workdir}/queue"', f'"{disk.path}/queue"')
        text = text.replace(f'"{self.workdir}/relayd.db"', f'"{disk.path}/relayd.db"')
        relayd.config.write_text(text)
        return relayd

    def _drain(self, relayd: Relayd, sink: ChaosSink) -> None:
        deadline = time.monotonic() + self.plan.drain_timeout
        while time.monotonic() < deadline:
            queued = _queue_rows(relayd, "queued")
            if not queued:
                return
            time.sleep(2.0)
        self.say("drain timeout: some recipients are still queued (reported, not lost)")

    def _tally(self, relayd: Relayd, sink: ChaosSink) -> None:
        led = self.ledger
        states: dict[str, str] = {}
        # one row per recipient (one recipient per message here): unfinished ones, then finished ones
        for row in _queue_rows(relayd, None) + _queue_rows(relayd, "done"):
            state = row["state"]
            states[row["queue_id"]] = "queued" if state in ("active", "deferred") else state
        markers = sink.markers()
        led.accepted = len(self.accepted)
        for n, qid in sorted(self.accepted.items()):
            address = self.addresses[n]
            led.expected_bounced += address.endswith("-reject@example.test")
            led.expected_expired += address.endswith("-defer@example.test")
            state = states.get(qid)
            if markers[n] > 0:
                led.delivered += 1
            elif state == "failed":
                led.bounced += 1
            elif state == "expired":
                led.expired += 1
            elif state in ("queued", "held"):
                led.still_queued += 1
            elif state == "dropped":
                led.dropped += 1
            else:  # missing from the queue, or "delivered" without reaching the sink
                led.lost += 1
                led.lost_markers.append(n)
                led.lost_detail.append(f"{n}:{qid}:{state}")
        led.duplicates = sum(c - 1 for n, c in markers.items() if c > 1 and n >= 0)
        led.unmarked = markers[-1]
        led.delivered_unacknowledged = sum(1 for n in markers if n >= 0 and n not in self.accepted)
        # events are written after the queue's own transition, so a kill -9 in between can lose one: they
        # are a cross-check, the queue state above is the record
        led.events_bounced, led.events_expired = (
            len(_cli_json(relayd, "events", "--since", "7d", "--kind", kind, "--limit", "10000000"))
            for kind in ("bounced", "expired")
        )
        led.refusals = dict(self.refusals)
        led.sink_faults = dict(sink.fault_counts())


def _close(conn: smtplib.SMTP | None) -> None:
    if conn is not None:
        with contextlib.suppress(OSError, smtplib.SMTPException):
            conn.close()


def _cli_json(relayd: Relayd, *args: str) -> list[dict[str, Any]]:
    out = relayd.cli(*args, "--json")
    if out.returncode != 0:
        raise RuntimeError(f"relayd {' '.join(args)}: {out.stderr}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def _queue_rows(relayd: Relayd, state: str | None) -> list[dict[str, Any]]:
    args = ["queue", "list", "--limit", "10000000"]
    if state is not None:
        args += ["--state", state]
    return _cli_json(relayd, *args)


def _integrity(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def run(plan: Plan, workdir: Path | None = None, *, log: Any = print) -> Ledger:
    """One endurance run in ``workdir`` (a fresh temp dir if None); raises if no tmpfs can be mounted."""
    reason = unavailable()
    if reason is not None:
        raise RuntimeError(f"the endurance run needs a small filesystem for the queue: {reason}")
    workdir = workdir or Path(tempfile.mkdtemp(prefix="relayd-endurance-"))
    log(f"endurance: {plan.messages} messages, seed {plan.seed}, state in {workdir}")
    return Run(plan, workdir, log=log).execute()
