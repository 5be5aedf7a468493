"""Several worker processes on one machine: the way past one core (``[server] workers``).

Python runs one thread of Python at a time, so one relayd process tops out at one core. With ``workers = N``
the main process forks two processes per queue shard: a submission process (listeners, policy, the commit
and the ``250``) and a delivery process (render, DKIM, SMTP out) at ``[server] delivery_nice``, which
learns of each committed message over a socketpair made here (relayd.queue.handoff says why the two are
apart). The submission processes share the listening ports with ``SO_REUSEPORT`` (the kernel spreads
connections); all share the policy store (SQLite in WAL mode takes writers from several processes;
PostgreSQL anyway), and each shard's two processes share its queue file.

Queue shards: shard 0 is ``queue.db``, shard k is ``queue-k.db`` (Postfix keeps one queue per qmgr the
same way). A shard whose worker no longer exists (``workers`` was lowered) is merged into ``queue.db``
before any worker starts, so nothing queued is stranded.

The main process does no mail work: it tells systemd READY/RELOADING/STOPPING, passes SIGHUP and SIGTERM on,
and restarts a process that died (after a short pause, so a crash loop does not spin); what its shard
accepted meanwhile waits on disk (a delivery process starts with a queue scan). Children die with it
(``PR_SET_PDEATHSIG``), so a ``kill -9`` of the main process leaves no orphan holding the ports.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING

from relayd.config import Config
from relayd.queue.handoff import channel
from relayd.queue.shards import all_shards, shard_path

if TYPE_CHECKING:
    from relayd.app.daemon import Role

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def merge_orphan_shards(queue_dir: Path, workers: int) -> int:
    """Move the mail of shards numbered >= ``workers`` into ``queue.db``; return messages moved.

    One transaction per shard; ``INSERT OR IGNORE`` makes a repeat after a crash between the commit and the
    unlink harmless (the rows are already there)."""
    from relayd.queue.store import migrate

    moved = 0
    main = shard_path(queue_dir, 0)
    for shard in all_shards(queue_dir):
        if shard == main or int(shard.stem[6:]) < workers:
            continue
        conn = sqlite3.connect(main, isolation_level=None)
        try:
            migrate(conn)  # both sides at the current schema, so the column lists match
            orphan = sqlite3.connect(shard, isolation_level=None)
            try:
                migrate(orphan)
            finally:
                orphan.close()
            conn.execute("ATTACH DATABASE ? AS orphan", (str(shard),))
            conn.execute("BEGIN IMMEDIATE")
            moved += conn.execute("INSERT OR IGNORE INTO messages SELECT * FROM orphan.messages").rowcount
            conn.execute("INSERT OR IGNORE INTO recipients SELECT * FROM orphan.recipients")
            conn.execute("COMMIT")
            conn.execute("DETACH DATABASE orphan")
        finally:
            conn.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{shard}{suffix}").unlink(missing_ok=True)
        log.info("merged orphan queue shard %s into %s", shard.name, main.name)
    return moved


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the worker outlives a kill -9 of the main process
        pass


def _run_worker(
    cfg: Config, config_path: Path | None, index: int, role: Role, channel: socket.socket
) -> None:
    """In the child: become the ``role`` process of shard ``index`` and run until told to stop. Never
    returns."""
    _die_with_parent()
    if role == "delivery" and cfg.server.delivery_nice:
        os.nice(cfg.server.delivery_nice)
    os.environ.pop("NOTIFY_SOCKET", None)  # NotifyAccess=main: only the main process talks to systemd
    os.environ.pop("WATCHDOG_USEC", None)  # the main process answers the watchdog
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    # until the worker's loop installs its reload handler, a SIGHUP (the supervisor passes each one on) is
    # noted and run once start-up is done: ignored, a reload sent while this process imports was lost
    hups: list[int] = []
    signal.signal(signal.SIGHUP, lambda signum, frame: hups.append(signum))
    code = 0
    try:
        from relayd.app.daemon import serve
        from relayd.app.eventloop import run_event_loop

        run_event_loop(
            serve(
                cfg,
                config_path,
                worker=index,
                workers=cfg.server.workers,
                role=role,
                channel=channel,
                reload_asked_before=lambda: bool(hups),
            )
        )
    except BaseException:
        log.exception("%s process %d failed", role, index)
        code = 1
    os._exit(code)


def _forget_metrics(pid: int) -> None:
    """A dead worker's live gauges must not count any more (prometheus_client multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def supervise(cfg: Config, config_path: Path | None) -> int:
    """Run ``cfg.server.workers`` workers until SIGTERM/SIGINT; return the exit code."""
    from relayd.app.systemd import sd_notify

    n = cfg.server.workers
    cfg.queue.path.mkdir(parents=True, exist_ok=True)
    merge_orphan_shards(cfg.queue.path, n)
    children: dict[int, tuple[int, Role]] = {}  # pid -> (shard, role)
    stopping = False
    reload_pending = False

    # one hand-off channel per shard, made before any fork: both ends stay open here, so a process that
    # restarts gets the same channel (and what was sent to it meanwhile)
    channels = [channel() for _ in range(n)]

    def spawn(index: int, role: Role) -> None:
        pid = os.fork()
        if pid == 0:
            mine = channels[index][0 if role == "submission" else 1]
            for pair in channels:  # the child keeps its own end only
                for sock in pair:
                    if sock is not mine:
                        sock.close()
            _run_worker(cfg, config_path, index, role, mine)
        children[pid] = (index, role)
        log.info("%s process %d started (pid %d)", role, index, pid)

    def on_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    def on_hup(signum: int, frame: object) -> None:
        nonlocal reload_pending
        reload_pending = True

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    for i in range(n):
        spawn(i, "delivery")  # first: it is listening for the handoff when the first message comes in
        spawn(i, "submission")
    sd_notify("READY=1")
    watchdog_usec = os.environ.get("WATCHDOG_USEC", "")
    watchdog_every = int(watchdog_usec) / 2e6 if watchdog_usec.isdigit() else None
    last_ping = 0.0
    restarts: dict[tuple[int, Role], float] = {}
    while children:
        if watchdog_every is not None and time.monotonic() - last_ping > watchdog_every:
            sd_notify("WATCHDOG=1")
            last_ping = time.monotonic()
        if stopping:
            sd_notify("STOPPING=1")
            for pid in children:
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 40
            while children and time.monotonic() < deadline:
                pid, _ = os.waitpid(-1, 0)
                children.pop(pid, None)
            for pid in children:
                os.kill(pid, signal.SIGKILL)
            return 0
        if reload_pending:
            reload_pending = False
            sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
            for pid in children:
                os.kill(pid, signal.SIGHUP)
            sd_notify("READY=1")
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            time.sleep(0.1)
            continue
        index, role = children.pop(pid)
        _forget_metrics(pid)
        if stopping:
            continue
        log.error("%s process %d (pid %d) exited with status %d; restarting", role, index, pid, status)
        last = restarts.get((index, role), 0.0)
        if time.monotonic() - last < 5:
            time.sleep(2)
        restarts[(index, role)] = time.monotonic()
        spawn(index, role)
    return 0
