"""``relayd serve``: the submission listener and the delivery workers in one process.

Start-up order: config (already validated) -> secret -> queue (recovery is implicit: every recipient still
``queued`` on disk is due) -> scheduler -> listeners -> READY=1 to systemd. Shutdown on SIGTERM/SIGINT runs it
backwards: stop accepting, let open SMTP sessions finish for ``_GRACE`` seconds (a session cut in DATA got no
``250``, so the client still owns its message), stop delivery attempts (their recipients are still ``queued``
on disk and are retried after restart), flush the queue writer, close the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from relayd.app import retention
from relayd.app.reload import Reloadable, load_signer, prepare, restart_sections
from relayd.app.systemd import sd_notify
from relayd.config import Config, parse_hostport
from relayd.core import metrics
from relayd.core.errors import ConfigError
from relayd.core.secret import load_or_create
from relayd.edge.smtp.inbound import InboundHandler, start_inbound
from relayd.edge.smtp.limits import ConnectionLimits, DataBudget
from relayd.edge.smtp.submission import SubmissionHandler, start_submission, start_submission_tls
from relayd.feedback.service import Feedback
from relayd.mail.dkim import DkimKeyError, Signer
from relayd.policy.dequeue import DequeueCheck
from relayd.policy.pipeline import Pipeline
from relayd.policy.render import Renderer
from relayd.policy.rules.suspension import AccountGate
from relayd.queue.handoff import Announcer, Handoff, LocalHandoff, Receiver
from relayd.queue.routing import make_resolver
from relayd.queue.scheduler import Scheduler
from relayd.queue.shards import shard_path
from relayd.queue.store import QueueStore
from relayd.queue.transport.tlsrpt import ReportSender
from relayd.reports.parseworker import ParseWorker
from relayd.store import Store, StoreError, open_store

if TYPE_CHECKING:
    # imported where they are used, by the processes that listen: a delivery process never loads aiohttp
    # (~13 MB of memory in each)
    from relayd.edge.webhooks import WebhookDispatcher

log = logging.getLogger(__name__)

#: what one process does: everything (``workers = 1``), or one side of a queue shard (relayd.app.supervisor)
Role = Literal["all", "submission", "delivery"]

_GRACE = 10.0
_STEP_TIMEOUT = 3.0


async def refresh_gauges(queue: QueueStore, store: Store, stop: asyncio.Event, scheduler: Scheduler) -> None:
    """Queue depth every few seconds, suppression entries every minute (a full count is not free)."""
    n = 0
    while not stop.is_set():
        now = time.monotonic()
        suspended: dict[str, int] = {}
        for lane in scheduler.shaper.lanes():
            suspended[lane.destination] = suspended.get(lane.destination, 0) + (lane.suspended_until > now)
        for destination, count in suspended.items():
            metrics.SUSPENDED_SOURCES.labels(destination).set(count)
        try:
            counts = await queue.counts()
            for state in ("queued", "held", "delivered", "failed", "expired", "dropped"):
                metrics.QUEUE_RECIPIENTS.labels(state).set(counts.get(state, 0))
            oldest = await queue.oldest_pending()
            metrics.QUEUE_OLDEST.set(max(0.0, time.time() - oldest) if oldest else 0.0)
            if n % 12 == 0:
                metrics.SUPPRESSION_ENTRIES.set(await store.count())
                metrics.INBOX_OPEN.set(await store.count_open_inbox())  # `relayd inbox done` is elsewhere
        except StoreError as exc:
            log.warning("could not refresh gauges: %s", exc)
        n += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=5.0)


class Daemon:
    """One relayd process: its stores, its listeners, its workers, and the reload that swaps config."""

    def __init__(
        self,
        cfg: Config,
        config_path: Path | None = None,
        *,
        worker: int = 0,
        workers: int = 1,
        role: Role = "all",
        channel: socket.socket | None = None,
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.worker = worker
        self.workers = workers
        self.role = role
        #: this process's end of the shard's hand-off channel (relayd.queue.handoff), for role != "all"
        self.channel = channel
        self.stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        #: what follows the config, in the order a reload reaches it (:meth:`reload`)
        self.reloadables: list[Reloadable] = []
        self.scheduler: Scheduler | None = None
        self.receiver: Receiver | None = None
        self.announcer: Announcer | None = None
        self.webhooks: WebhookDispatcher | None = None
        self.servers: list[asyncio.Server] = []
        self.inbound_servers: list[asyncio.Server] = []

    async def start(self) -> None:
        cfg = self.cfg
        self.secret = load_or_create(cfg.server.secret_file)
        signer = load_signer(cfg)
        # a submission process beside delivery processes leaves WAL checkpoints to them: a checkpoint run
        # by one of its commits held up every 250 of that commit's batch
        self.store = await open_store(
            cfg.store.backend,
            cfg.store.path,
            cfg.store.dsn,
            light=self.role == "delivery",
            checkpoints=self.role != "submission",
        )
        self.gate = AccountGate(self.store)
        await self.gate.start()
        shard = shard_path(cfg.queue.path, self.worker)
        self.queue = QueueStore(
            shard, outcomes_only=self.role == "delivery", checkpoints=self.role != "submission"
        )
        await self.queue.open()
        self.renderer = Renderer(cfg, self.secret, signer)  # each recipient's copy, made at delivery
        self.reloadables.append(self.renderer)
        if self.role != "submission":
            await self._start_delivery()
        if self.role != "delivery":
            await self._start_listeners(signer)
        if self.worker == 0 and self.role != "delivery":  # one pruner per store is enough
            self._tasks.append(asyncio.create_task(retention.run(self.store, lambda: self.cfg, self.stop)))
            # the daily TLS reports (RFC 8460), queued here: this process writes shard 0 of the queue
            resolver = make_resolver(cfg.delivery)
            reports = ReportSender(lambda: self.cfg, self.store, self.queue, signer, resolver)
            self._tasks.append(asyncio.create_task(reports.run(self.stop)))
        self._tasks.append(asyncio.create_task(watchdog(self.stop)))

    async def _start_delivery(self) -> None:
        cfg = self.cfg
        self.feedback = Feedback(self.store, self.queue, self.secret, cfg)
        self.scheduler = Scheduler(
            cfg,
            self.queue,
            self.secret,
            gate=DequeueCheck(self.store, self.gate),
            observer=self.feedback.record_delivery,
            observer_many=self.feedback.record_deliveries,
            renderer=self.renderer,
            tls_store=self.store,  # MTA-STS policies and TLS report counts are shared by every node
        )
        self.scheduler.start()
        self.reloadables += [self.scheduler, self.feedback]
        if self.role == "delivery":  # the shard's submission process announces what it commits
            assert self.channel is not None, "a delivery process needs its shard's channel"
            self.receiver = Receiver(self.channel, self.scheduler, self.renderer)
            self.receiver.start()
        self._tasks.append(
            asyncio.create_task(refresh_gauges(self.queue, self.store, self.stop, self.scheduler))
        )

    async def _start_listeners(self, signer: Signer) -> None:
        from relayd.edge.web import create_app, start_web
        from relayd.edge.web.app import LiveConfig
        from relayd.edge.webhooks import WebhookDispatcher

        cfg = self.cfg
        # one dispatcher per store, not per worker: each would send every event once more
        self.webhooks = WebhookDispatcher(cfg, self.store) if self.worker == 0 else None
        if self.webhooks is not None:
            await self.webhooks.start()
            self.reloadables.append(self.webhooks)
        pipeline = Pipeline(cfg, self.store, self.secret, signer, self.gate, self.renderer)
        handoff: Handoff
        if self.scheduler is not None:
            handoff = LocalHandoff(self.scheduler, self.renderer)
        else:
            assert self.channel is not None, "a submission process needs its shard's channel"
            self.announcer = Announcer(self.channel)
            handoff = self.announcer
        self.handler = SubmissionHandler(cfg, self.queue, handoff, pipeline)
        # with several workers each holds its share of the connection limits and of the DATA budget (the
        # kernel spreads connections); a worker's budget still takes the largest message on its own
        biggest = max(cfg.submission.max_message_size, cfg.inbound.max_message_size)
        data = DataBudget(max(biggest, cfg.server.max_data_in_flight // self.workers))
        self.limits = ConnectionLimits(
            max(1, -(-cfg.submission.max_connections // self.workers)),
            cfg.submission.max_connections_per_ip,
            data,
        )
        # bounces and complaints are parsed in a child process with a time limit (relayd.reports.parseworker),
        # started by the first report: reports are rare next to submissions, and an idle child is ~24 MB
        # per listening process; the first report waits a moment for its imports
        self.report_parser = ParseWorker(cfg.inbound.parse_timeout)
        self.servers = await start_submission(cfg, self.handler, self.limits, reuse_port=self.workers > 1)
        for srv in self.servers:
            for sock in srv.sockets:
                log.info("submission listening on %s", sock.getsockname()[:2])
        # implicit TLS: the same handler and limits (one client's connections count on both ports)
        tls_servers = await start_submission_tls(cfg, self.handler, self.limits, reuse_port=self.workers > 1)
        for srv in tls_servers:
            for sock in srv.sockets:
                log.info("submission (implicit TLS) listening on %s", sock.getsockname()[:2])
        self.servers += tls_servers
        self.inbound = InboundHandler(cfg, self.store, self.queue, self.secret, self.report_parser)
        self.reloadables += [self.handler, self.inbound]
        self.inbound_limits = ConnectionLimits(
            max(1, -(-cfg.inbound.max_connections // self.workers)), cfg.inbound.max_connections_per_ip, data
        )
        self.inbound_servers = await start_inbound(
            cfg, self.inbound, self.inbound_limits, reuse_port=self.workers > 1
        )
        for srv in self.inbound_servers:
            for sock in srv.sockets:
                log.info("inbound listening on %s", sock.getsockname()[:2])
        host, port = parse_hostport(cfg.http.listen)
        self.web = await start_web(
            create_app(cfg, self.store, self.secret, self.queue), host, port, reuse_port=self.workers > 1
        )
        self.reloadables.append(LiveConfig(self.web.app))
        log.info("http listening on %s:%d", host, port)

    def reload(self) -> bool:
        """SIGHUP: re-read the config file; swap accounts, policy, DKIM keys and routes at once.

        All or nothing: a file that does not validate, a DKIM key or a TLS certificate that does not load,
        is logged with every problem and the running config stays (relayd.app.reload). Open SMTP sessions
        are not dropped; their next command sees the new config. Listen addresses, store and queue paths
        need a restart (logged)."""
        if self.config_path is None:
            return False
        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            new = prepare(self.config_path)
        except ConfigError as exc:
            for line in exc.problems:
                log.error("reload refused: %s", line)
            sd_notify("READY=1")
            return False
        except (DkimKeyError, OSError) as exc:
            log.error("reload refused: %s", exc)
            sd_notify("READY=1")
            return False
        for key in restart_sections(self.cfg, new.cfg):
            log.warning("reload: [%s] changed; it takes effect at the next restart", key)
        for part in self.reloadables:
            part.reload(new)
        self.cfg = new.cfg
        log.info(
            "reloaded %s: %d account(s), %d DKIM key(s)",
            self.config_path,
            len(new.cfg.accounts),
            len(new.cfg.dkim),
        )
        sd_notify("READY=1")
        return True

    async def close_partial(self) -> None:
        """After a failed start-up (a port in use, say): close what it had opened, so that the process
        exits with its error. An aiosqlite connection left open keeps the interpreter waiting for its
        thread at exit, for ever: the service would neither run nor fail."""
        for srv in [*self.servers, *self.inbound_servers]:
            srv.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        inbound = getattr(self, "inbound", None)
        steps = (
            (getattr(self, "web", None), "cleanup"),
            (getattr(self, "report_parser", None), "close"),
            (None if inbound is None else inbound.desk, "close"),
            (self.receiver, "close"),
            (self.scheduler, "stop"),
            (getattr(self, "queue", None), "close"),
            (getattr(self, "gate", None), "stop"),
            (self.webhooks, "stop"),
            (getattr(self, "store", None), "close"),
        )
        for obj, method in steps:
            if obj is None:
                continue
            try:
                await asyncio.wait_for(getattr(obj, method)(), timeout=_STEP_TIMEOUT)
            except Exception:  # best effort: the start-up error is what the operator must see
                log.debug("closing %s after a failed start", type(obj).__name__, exc_info=True)
        if self.announcer is not None:
            self.announcer.close()

    async def shutdown(self) -> None:
        sd_notify("STOPPING=1")
        log.info("shutting down: no new connections")
        for srv in [*self.servers, *self.inbound_servers]:
            srv.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _GRACE
        while self.role != "delivery" and (self.limits.open or self.inbound_limits.open):
            if loop.time() >= deadline:
                log.info("%d session(s) still open after %.0fs; closing them", self.limits.open, _GRACE)
                break
            await asyncio.sleep(0.05)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Each step is bounded and named: a stop must end (systemd's TimeoutStopSec would kill us anyway,
        # and nothing here may hold the rest up). The queue is closed before anything that could wait on
        # it; a step cut short leaves recipients 'queued' on disk, delivered after the restart.
        steps: list[tuple[str, Callable[[], Awaitable[object]]]] = []
        if self.role != "delivery":
            steps.append(("http", self.web.cleanup))
            steps.append(("report parser", self.report_parser.close))
            steps.append(("dmarc parser", self.inbound.desk.close))
        if self.receiver is not None:
            steps.append(("handoff", self.receiver.close))
        if self.scheduler is not None:
            steps.append(("delivery", self.scheduler.stop))
        steps += [("queue", self.queue.close), ("account gate", self.gate.stop)]
        if self.webhooks is not None:
            steps.append(("webhooks", self.webhooks.stop))
        steps.append(("store", self.store.close))
        for name, step in steps:
            try:
                await asyncio.wait_for(step(), timeout=_STEP_TIMEOUT)
            except TimeoutError:
                log.error("shutdown: %s did not finish within %.0fs; going on", name, _STEP_TIMEOUT)
            except Exception:
                log.exception("shutdown: %s failed; going on", name)
        if self.announcer is not None:
            self.announcer.close()
        log.info("relayd stopped")


async def watchdog(stop: asyncio.Event) -> None:
    """systemd's WatchdogSec: ping at half the interval while the event loop is alive."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec or not usec.isdigit():
        return
    interval = int(usec) / 2_000_000
    while not stop.is_set():
        sd_notify("WATCHDOG=1")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)


async def serve(
    cfg: Config,
    config_path: Path | None = None,
    *,
    worker: int = 0,
    workers: int = 1,
    role: Role = "all",
    channel: socket.socket | None = None,
    reload_asked_before: Callable[[], bool] | None = None,
) -> None:
    """Run one relayd process until SIGTERM/SIGINT: the only one (``role="all"``), or the submission or
    the delivery process of queue shard ``worker`` of ``workers`` (relayd.app.supervisor).
    ``reload_asked_before`` tells whether a SIGHUP came before this coroutine ran (a forked worker still
    importing): that reload runs once start-up is done, like one that comes during it."""
    daemon = Daemon(cfg, config_path, worker=worker, workers=workers, role=role, channel=channel)
    # Signals are handled from before the first listener binds: a SIGHUP's default action kills the
    # process, and a client (or a test) that saw the port open may send one while start-up still runs.
    # A reload asked for then runs once start-up is done, so an edit made meanwhile is not missed.
    loop = asyncio.get_running_loop()
    reload_asked = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_asked.set)
    if reload_asked_before is not None and reload_asked_before():
        reload_asked.set()
    try:
        await daemon.start()
    except BaseException:
        await daemon.close_partial()
        raise
    # What start-up built (modules, config, compiled patterns, key objects) lives as long as the process:
    # keep the collector from walking it in every full collection. Under load a full collection in an
    # accepting process took ~40 ms before, every session waiting; ~3 ms after (median, measured).
    gc.collect()
    gc.freeze()
    loop.add_signal_handler(signal.SIGHUP, daemon.reload)
    if reload_asked.is_set():
        daemon.reload()
    sd_notify("READY=1")
    if workers == 1 and role == "all":
        log.info("relayd ready")
    else:
        log.info("relayd %s process %d of %d ready", role, worker, workers)
    await daemon.stop.wait()
    await daemon.shutdown()
