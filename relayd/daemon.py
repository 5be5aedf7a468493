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
import datetime as dt
import json
import logging
import os
import signal
import socket
import time

from relayd import metrics
from relayd.config import Config
from relayd.dkim import Signer, load_key
from relayd.policy.dequeue import DequeueCheck
from relayd.policy.pipeline import Pipeline
from relayd.policy.suspension import AccountGate
from relayd.queue.scheduler import Scheduler
from relayd.queue.store import DueRecipient, QueueStore
from relayd.secret import load_or_create
from relayd.smtp.protocol import ConnectionLimits
from relayd.smtp.submission import SubmissionHandler, start_submission
from relayd.store import Event, Store, StoreError, open_store

log = logging.getLogger(__name__)

_GRACE = 10.0


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), addr)


class DeliveryRecorder:
    """What happens after each delivery attempt: a metric, and an event (webhooks and rates read those)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def __call__(self, item: DueRecipient, outcome: str, reply: str, seconds: float) -> None:
        domain = item.address.rpartition("@")[2]
        metrics.DELIVERIES.labels(outcome, metrics.domain_label(domain)).inc()
        if outcome in ("delivered", "bounced"):
            metrics.DELIVERY_SECONDS.observe(seconds)
        if outcome == "dropped":
            return  # the dequeue check recorded the event with its reason
        await self._store.record_event(
            Event(
                at=dt.datetime.now(dt.UTC),
                kind=outcome,
                account=item.account,
                list=item.list_name,
                address=item.address,
                reason=None,
                queue_id=item.queue_id,
                evidence=json.dumps({"reply": reply[:500], "index": item.index}),
            )
        )


async def refresh_gauges(queue: QueueStore, store: Store, stop: asyncio.Event) -> None:
    """Queue depth every few seconds, suppression entries every minute (a full count is not free)."""
    n = 0
    while not stop.is_set():
        try:
            counts = await queue.counts()
            for state in ("queued", "held", "delivered", "failed", "expired", "dropped"):
                metrics.QUEUE_RECIPIENTS.labels(state).set(counts.get(state, 0))
            oldest = await queue.oldest_pending()
            metrics.QUEUE_OLDEST.set(max(0.0, time.time() - oldest) if oldest else 0.0)
            if n % 12 == 0:
                metrics.SUPPRESSION_ENTRIES.set(await store.count())
        except StoreError as exc:
            log.warning("could not refresh gauges: %s", exc)
        n += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=5.0)


def load_signer(cfg: Config) -> Signer:
    """Every [[dkim]] key, loaded and checked before we accept any mail (a bad key fails the start)."""
    return Signer([load_key(d.domain, d.selector, d.key_file, d.algorithm) for d in cfg.dkim])


async def serve(cfg: Config) -> None:
    secret = load_or_create(cfg.server.secret_file)
    signer = load_signer(cfg)
    store = await open_store(cfg.store.backend, cfg.store.path, cfg.store.dsn)
    gate = AccountGate(store)
    await gate.start()
    queue = QueueStore(cfg.queue.path / "queue.db")
    await queue.open()
    scheduler = Scheduler(
        cfg, queue, secret, gate=DequeueCheck(store, gate), observer=DeliveryRecorder(store)
    )
    scheduler.start()
    pipeline = Pipeline(cfg, store, secret, signer, gate)
    handler = SubmissionHandler(cfg, queue, scheduler, pipeline)
    limits = ConnectionLimits(cfg.submission.max_connections, cfg.submission.max_connections_per_ip)
    servers = await start_submission(cfg, handler, limits)
    for srv in servers:
        for sock in srv.sockets:
            log.info("submission listening on %s", sock.getsockname()[:2])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    gauges = asyncio.create_task(refresh_gauges(queue, store, stop))
    sd_notify("READY=1")
    log.info("relayd ready")
    await stop.wait()
    await gauges

    sd_notify("STOPPING=1")
    log.info("shutting down: no new connections")
    for srv in servers:
        srv.close()
    deadline = loop.time() + _GRACE
    while limits.open and loop.time() < deadline:
        await asyncio.sleep(0.05)
    await scheduler.stop()
    await queue.close()
    await gate.stop()
    await store.close()
    log.info("relayd stopped")
