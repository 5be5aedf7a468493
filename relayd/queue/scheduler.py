"""Moves queued recipients to delivery attempts and records what happened.

Shape after Postfix's qmgr: fresh mail is handed straight to delivery when there is room in the bounded
*active window*; everything else (backlog, deferred mail, mail recovered after a restart) is found by a
periodic scan of the due index, a bounded number of rows at a time, so a queue of any length never has to
fit in memory and a deferred backlog never slows fresh mail.

Outcomes (one transition each, written through the queue's group commit):
  250            -> delivered
  5xx, null MX   -> failed (permanent; recorded per recipient)
  4xx, timeouts  -> deferred to the next slot of ``retry_schedule``, or expired once older than ``max_age``
  our own bug    -> deferred, logged with the queue id (a crash in a worker never drops mail)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import Protocol

from relayd.config import Config
from relayd.errors import DeliveryError, PermanentFailure, StorageError, TemporaryFailure
from relayd.queue.client import Transport
from relayd.queue.routing import Router
from relayd.queue.store import DueRecipient, NewMessage, QueueStore, State
from relayd.tokens import verp_address

log = logging.getLogger(__name__)

_CACHE_BYTES = 64 * 1024 * 1024


#: called after every attempt with (recipient, outcome, reply, seconds, error); outcome is one of
#: delivered, deferred, bounced, expired, dropped. Its failures are logged, never fatal to delivery.
Observer = Callable[[DueRecipient, str, str, float, DeliveryError | None], Awaitable[None]]


class Gate(Protocol):
    """The policy's last word before an attempt (relayd.policy.dequeue); the queue knows no policy."""

    async def check(self, item: DueRecipient) -> _Verdict: ...


class _Verdict(Protocol):
    @property
    def decision(self) -> Enum: ...

    @property
    def reason(self) -> str: ...


_PURGE_EVERY = 60.0


class Scheduler:
    def __init__(
        self,
        cfg: Config,
        store: QueueStore,
        secret: bytes,
        *,
        router: Router | None = None,
        transport: Transport | None = None,
        clock: Callable[[], float] = time.time,
        gate: Gate | None = None,
        observer: Observer | None = None,
    ) -> None:
        self._cfg = cfg
        self._store = store
        self._secret = secret
        self._router = router or Router(cfg.delivery)
        self._transport = transport or Transport(
            helo=cfg.delivery.helo or cfg.server.hostname,
            tls=cfg.delivery.tls,
            connect_timeout=cfg.delivery.connect_timeout,
            command_timeout=cfg.delivery.command_timeout,
            messages_per_connection=cfg.delivery.messages_per_connection,
        )
        self._clock = clock
        self._gate = gate
        self._observer = observer
        self._verp_domain = cfg.inbound.domains[0]
        self._inflight: set[tuple[str, int]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._sockets = asyncio.Semaphore(cfg.delivery.concurrency)
        self._per_dest: dict[str, asyncio.Semaphore] = {}
        self._cache: OrderedDict[tuple[str, int], bytes] = OrderedDict()  # (queue id, index or -1)
        self._cache_bytes = 0
        self._wake = asyncio.Event()
        self._ended_during_scan: set[tuple[str, int]] | None = None
        self._runner: asyncio.Task[None] | None = None

    # --- entry points -------------------------------------------------------------------------------------

    def reload(self, cfg: Config) -> None:
        """New routes, retry schedule and limits (SIGHUP); attempts in flight finish on the old route."""
        self._cfg = cfg
        self._router = Router(cfg.delivery)
        self._per_dest.clear()

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name="queue-scheduler")

    async def stop(self) -> None:
        """Abandon in-flight attempts safely: their recipients are still 'queued' on disk, retried later."""
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._transport.close()

    def submitted(self, msg: NewMessage, created_at: float) -> None:
        """A message was just committed: start its deliveries now if the active window has room."""
        if msg.per_recipient is None:
            self._remember((msg.queue_id, -1), msg.data)
        else:
            for i, rendered in enumerate(msg.per_recipient):
                self._remember((msg.queue_id, i), rendered)
        for i, rcpt in enumerate(msg.recipients):
            if len(self._inflight) >= self._cfg.queue.active_limit:
                self._wake.set()  # the scanner will pick the rest up as room frees
                return
            if (msg.queue_id, i) in self._inflight:
                continue  # a scan that ran right after the commit got there first
            self._dispatch(
                DueRecipient(msg.queue_id, i, rcpt, 0, msg.account, msg.mail_from, created_at, msg.list_name)
            )

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    # --- the scan loop -----------------------------------------------------------------------------------

    async def _run(self) -> None:
        last_purge = 0.0
        while True:
            try:
                await self._scan()
                now = self._clock()
                if now - last_purge > _PURGE_EVERY:
                    last_purge = now
                    await self._store.purge(now - self._cfg.queue.keep_finished)
            except StorageError as exc:
                log.error("queue scan failed, retrying: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._cfg.queue.scan_interval)
            self._wake.clear()

    async def _scan(self) -> None:
        room = self._cfg.queue.active_limit - len(self._inflight)
        if room <= 0:
            return
        # an attempt that ends while the query runs may come back as a stale 'queued' row: remember every
        # attempt that ends from now on and skip those rows (else the recipient would get a second copy)
        self._ended_during_scan = set()
        # in-flight recipients are still 'queued' on disk and may come back first: ask for enough rows
        rows = await self._store.due(self._clock(), room + len(self._inflight))
        ended, self._ended_during_scan = self._ended_during_scan, None
        for item in rows:
            if room <= 0:
                break
            key = (item.queue_id, item.index)
            if key not in self._inflight and key not in ended:
                self._dispatch(item)
                room -= 1

    def _dispatch(self, item: DueRecipient) -> None:
        key = (item.queue_id, item.index)
        self._inflight.add(key)
        task = asyncio.create_task(self._attempt(item))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- one attempt ---------------------------------------------------------------------------------------

    def _remember(self, key: tuple[str, int], data: bytes) -> None:
        self._cache[key] = data
        self._cache_bytes += len(data)
        while self._cache_bytes > _CACHE_BYTES and self._cache:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= len(old)

    async def _data(self, item: DueRecipient) -> bytes | None:
        """The exact bytes for this recipient: memory if it was just submitted, else the queue."""
        data = self._cache.pop((item.queue_id, item.index), None)
        if data is not None:
            self._cache_bytes -= len(data)  # one recipient, one attempt from memory; retries read the queue
        else:
            data = self._cache.get((item.queue_id, -1))
        if data is None:
            data = await self._store.recipient_data(item.queue_id, item.index)
        return data

    def _dest_limit(self, nexthop: str) -> asyncio.Semaphore:
        sem = self._per_dest.get(nexthop)
        if sem is None:
            sem = self._per_dest[nexthop] = asyncio.Semaphore(self._cfg.delivery.connections_per_destination)
        return sem

    async def _attempt(self, item: DueRecipient) -> None:
        key = (item.queue_id, item.index)
        try:
            await self._attempt_inner(item)
        except StorageError as exc:
            # the outcome could not be written: the recipient stays 'queued' and is tried again later
            log.error("%s: recording the outcome for recipient %d failed: %s", item.queue_id, item.index, exc)
        finally:
            self._inflight.discard(key)
            if self._ended_during_scan is not None:
                self._ended_during_scan.add(key)
            if len(self._inflight) < self._cfg.queue.active_limit // 2:
                self._wake.set()

    async def _attempt_inner(self, item: DueRecipient) -> None:
        data = await self._data(item)
        if data is None:
            log.warning("%s: message data missing; recipient %d left as is", item.queue_id, item.index)
            return
        if self._gate is not None:
            verdict = await self._gate.check(item)
            if verdict.decision.value == "hold":
                n = await self._store.hold_account(item.account)
                log.info(
                    "%s: account=%s suspended: %d queued recipient(s) held", item.queue_id, item.account, n
                )
                return
            if verdict.decision.value == "drop":
                await self._store.drop_recipient(item.queue_id, item.index, verdict.reason)
                await self._observe(item, "dropped", verdict.reason, 0.0)
                _log_attempt(item, "dropped", verdict.reason, 0.0, item.attempts)
                return
        attempts = item.attempts + 1
        domain = item.address.rpartition("@")[2]
        started = time.monotonic()
        try:
            route = await self._router.route(domain)
            async with self._sockets, self._dest_limit(route.nexthop):
                sender = verp_address(
                    self._secret, self._verp_domain, item.queue_id, item.index, item.address
                )
                reply = await self._transport.send(route.hosts, sender, item.address, data)
        except PermanentFailure as exc:
            await self._store.finish(item.queue_id, item.index, State.FAILED, str(exc), attempts)
            _log_attempt(item, "bounced", str(exc), time.monotonic() - started, attempts, exc)
            await self._observe(item, "bounced", str(exc), time.monotonic() - started, exc)
            return
        except TemporaryFailure as exc:
            outcome = await self._temporary(item, attempts, str(exc), exc)
            await self._observe(item, outcome, str(exc), time.monotonic() - started, exc)
            return
        except Exception as exc:  # a bug of ours must not lose the message: defer it and say so loudly
            log.exception("%s: delivery to <%s> crashed; deferring", item.queue_id, item.address)
            await self._temporary(item, attempts, f"internal error: {type(exc).__name__}")
            return
        await self._store.finish(item.queue_id, item.index, State.DELIVERED, reply, attempts)
        elapsed = time.monotonic() - started
        _log_attempt(item, "delivered", reply, elapsed, attempts)
        await self._observe(item, "delivered", reply, elapsed)

    async def _observe(
        self, item: DueRecipient, outcome: str, reply: str, seconds: float, error: DeliveryError | None = None
    ) -> None:
        if self._observer is None:
            return
        try:
            await self._observer(item, outcome, reply, seconds, error)
        except Exception:
            log.exception("%s: recording the %s outcome failed", item.queue_id, outcome)

    async def _temporary(
        self, item: DueRecipient, attempts: int, reply: str, error: DeliveryError | None = None
    ) -> str:
        """Defer, or expire once past ``max_age``; returns which."""
        now = self._clock()
        deadline = item.created_at + self._cfg.queue.max_age
        if now >= deadline:
            await self._store.finish(item.queue_id, item.index, State.EXPIRED, reply, attempts)
            _log_attempt(item, "expired", reply, None, attempts, error)
            return "expired"
        schedule = self._cfg.queue.retry_schedule
        delay = schedule[min(attempts - 1, len(schedule) - 1)]
        next_attempt = min(now + delay, deadline)
        await self._store.defer(item.queue_id, item.index, next_attempt, reply, attempts)
        _log_attempt(item, "deferred", reply, None, attempts, error, retry_in=next_attempt - now)
        return "deferred"


def _log_attempt(
    item: DueRecipient,
    outcome: str,
    reply: str,
    seconds: float | None,
    attempts: int,
    error: DeliveryError | None = None,
    *,
    retry_in: float | None = None,
) -> None:
    """One line per delivery attempt: Postfix-like text, and the same facts as fields for JSON logs."""
    if error is not None:
        code, status = (str(error.code) if error.code else None), error.status
    elif reply[:3].isdigit():
        code, status = reply[:3], (reply.split(" ", 2)[1] if " " in reply else None)
    else:
        code, status = None, None
    fields = {
        "event": "delivery",
        "queue_id": item.queue_id,
        "account": item.account,
        "list": item.list_name,
        "rcpt_domain": item.address.rpartition("@")[2],
        "outcome": outcome,
        "reply_code": code,
        "status": status,
        "attempts": attempts,
        "latency": round(seconds, 4) if seconds is not None else None,
        "retry_in": round(retry_in) if retry_in is not None else None,
    }
    timing = f" delay={seconds:.3f}s" if seconds is not None else ""
    later = f" retry_in={retry_in:.0f}s" if retry_in is not None else ""
    log.info(
        "%s: to=<%s> account=%s status=%s%s%s reply=%s",
        item.queue_id,
        item.address,
        item.account,
        outcome,
        timing,
        later,
        reply,
        extra={"fields": fields},
    )
