"""Moves queued recipients to delivery attempts and records what happened.

Shape after Postfix's qmgr: fresh mail is handed straight to delivery when there is room in the bounded
*active window*; everything else (backlog, deferred mail, mail recovered after a restart) is found by a
periodic scan of the due index, a bounded number of rows at a time, so a queue of any length never has to
fit in memory and a deferred backlog never slows fresh mail.

Fairness between accounts: the due scan reads each account's rows on its own and interleaves them, every
account may hold a reserve of the active window even when another account's backlog fills it, and attempts
waiting for the same destination are served round-robin by account (relayd.queue.shaping). Dedicated IPs:
an account's ``pool`` gives the source addresses (and EHLO names) its mail leaves from, round-robin.

Outcomes: relayd.queue.outcomes (the table of transitions is there).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from typing import Any

from relayd.config import Config
from relayd.core import metrics
from relayd.core.errors import ConfigError, DeliveryError, PermanentFailure, StorageError, TemporaryFailure
from relayd.core.models import DeliveryOutcome, DueRecipient
from relayd.core.tokens import verp_address
from relayd.core.usecache import UseCache
from relayd.mail.chunks import Chunks
from relayd.policy.dequeue import Decision
from relayd.policy.reloaded import Reloaded
from relayd.queue.outcomes import ManyObserver, Observer, Outcomes
from relayd.queue.planning import Held, Planner
from relayd.queue.routing import Router
from relayd.queue.seams import CopyMaker, Gate
from relayd.queue.shaping import (
    DEFAULT_SOURCES,
    Grant,
    Postponed,
    Shaper,
    ShapingTable,
    Signal,
    account_sources,
    classify,
)
from relayd.queue.store import NewMessage, QueueStore, StoredData
from relayd.queue.transport.client import Next, Transport
from relayd.queue.transport.tlsrpt import TransportStore

log = logging.getLogger(__name__)

_CACHE_BYTES = 64 * 1024 * 1024
#: the most copies of one message one task sends one after another (Postfix's default recipient limit per
#: delivery); a larger message's copies to one domain go out through several tasks at once
_COPIES_PER_TASK = 50
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
        observer_many: ManyObserver | None = None,
        renderer: CopyMaker | None = None,
        tls_store: TransportStore | None = None,
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
            tls_ca_file=cfg.delivery.tls_ca_file,
        )
        #: TLS requirements per destination (DANE, MTA-STS, ``[tls_policy]``) and the send under them;
        #: ``tls_store``: where MTA-STS policies are cached and TLS sessions counted, None: neither
        self._planner = Planner(cfg, self._transport, tls_store)
        self._clock = clock
        self._gate = gate
        self._outcomes = Outcomes(store, clock, observer, observer_many)
        self._renderer = renderer
        self._verp_domain = cfg.inbound.domains[0]
        self._inflight: set[tuple[str, int]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._sockets = asyncio.Semaphore(cfg.delivery.concurrency)
        self._shaping = ShapingTable.from_config(cfg)
        self._shaper = Shaper()
        self._sources = account_sources(cfg)
        self._by_account: dict[str, int] = {}  # recipients in the active window, per account
        #: just-submitted messages for their recipients' first attempts: queue id -> (data, uses left)
        self._cache: UseCache[StoredData] = UseCache(_CACHE_BYTES)
        self._wake = asyncio.Event()
        #: one set per queue read in progress (a scan, :meth:`arrived`): the attempts that end meanwhile
        self._ended_during_read: list[set[tuple[str, int]]] = []
        #: messages being committed by a submission, which hands them over itself (:meth:`expect`)
        self._expected: set[str] = set()
        #: may due rows be waiting that no attempt holds? (a full window, a restart, a full last scan);
        #: if not, an ending attempt does not start a scan: new mail comes through :meth:`submitted`,
        #: retries come due with the periodic scan
        self._backlog = True
        self._runner: asyncio.Task[None] | None = None

    # --- entry points -------------------------------------------------------------------------------------

    def reload(self, new: Reloaded) -> None:
        """New routes, retry schedule, pools and shaping (SIGHUP); attempts in flight finish on the old
        route. Lanes keep their adaptive state (a provider that asked us to slow down still wants that)."""
        cfg = self._cfg = new.cfg
        self._router = Router(cfg.delivery)
        self._planner.reload(cfg)
        self._sources = account_sources(cfg)
        try:
            self._shaping = ShapingTable.from_config(cfg)
        except ConfigError as exc:  # the file changed again after the reload validated it
            log.error("reload: shaping rules kept: %s", exc)

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name="queue-scheduler")
        if self._planner.sessions is not None:
            self._planner.sessions.start()

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
        self._shaper.close()
        await self._transport.close()
        if self._planner.sessions is not None:
            await self._planner.sessions.stop()  # the counts of the last minute reach the store

    def expect(self, queue_id: str) -> None:
        """A submission is about to commit ``queue_id`` and will call :meth:`submitted` (or :meth:`forget`):
        a scan meanwhile leaves its rows alone. Without this, under load the scanner found most fresh
        rows first and read each recipient's message back from disk instead of taking it from memory."""
        self._expected.add(queue_id)

    def forget(self, queue_id: str) -> None:
        """The expected message was not committed after all."""
        self._expected.discard(queue_id)

    def submitted(self, msg: NewMessage, created_at: float) -> None:
        """A message was just committed: start its deliveries now if the active window has room."""
        self._expected.discard(msg.queue_id)
        self._cache.put(msg.queue_id, StoredData(msg.data, msg.render), len(msg.recipients), len(msg.data))
        admitted: list[DueRecipient] = []
        for i, rcpt in enumerate(msg.recipients):
            if not self._admits(msg.account):
                self._backlog = True  # the scanner picks the rest up once the window is half free
                break
            if (msg.queue_id, i) in self._inflight:
                continue  # a scan that ran right after the commit got there first
            self._enter(
                admitted,
                DueRecipient(
                    msg.queue_id,
                    i,
                    rcpt,
                    0,
                    msg.account,
                    msg.mail_from,
                    created_at,
                    msg.list_name,
                    msg.msg_class,
                ),
            )
        self._start(admitted)

    async def arrived(self, messages: Iterable[tuple[str, StoredData | None]]) -> None:
        """Messages another process has just committed (relayd.queue.handoff), each with its data when
        the hand-off carried it: start their queued recipients now if the active window has room."""
        for queue_id, stored in messages:
            self._expected.add(queue_id)  # a scan while we read (a big message: long) leaves its rows to us
            try:  # one that got there first: skip what it holds, and what it ended while we read
                with self._ends_meanwhile() as ended:
                    rows = await self._store.committed(queue_id)
                    untaken = [i for i in rows if (i.queue_id, i.index) not in self._inflight]
                    if untaken and stored is None:
                        stored = await self._store.message_data(queue_id)
                items = [i for i in untaken if (i.queue_id, i.index) not in ended]
            except StorageError as exc:
                log.error("%s: reading the message just committed failed (%s); the scan will", queue_id, exc)
                self._backlog = True
                self._wake.set()
                return
            finally:
                self._expected.discard(queue_id)
            if not items or stored is None:
                continue
            self._cache.put(queue_id, stored, len(items), len(stored.data))
            admitted: list[DueRecipient] = []
            for item in items:
                if not self._admits(item.account):
                    self._backlog = True  # the scanner picks the rest up once the window is half free
                    break
                self._enter(admitted, item)
            self._start(admitted)

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    @property
    def shaper(self) -> Shaper:
        """The lanes and their state (suspended source addresses, current rates) for gauges."""
        return self._shaper

    def has_room(self) -> bool:
        """Whether the active window takes another recipient now (relayd.queue.handoff reads only then)."""
        return len(self._inflight) < self._cfg.queue.active_limit

    def note_backlog(self) -> None:
        """Committed messages may be waiting that nobody announced: scan for them once there is room."""
        self._backlog = True

    def _reserve(self) -> int:
        return max(1, self._cfg.queue.active_limit // 10)

    def _admits(self, account: str) -> bool:
        """Room in the active window -- and an account below its reserve always gets in, so another
        account's backlog filling the window cannot keep its mail waiting (the window may then exceed
        ``active_limit`` by at most one reserve per account)."""
        if len(self._inflight) < self._cfg.queue.active_limit:
            return True
        return self._by_account.get(account, 0) < self._reserve()

    # --- the scan loop -----------------------------------------------------------------------------------

    async def _run(self) -> None:
        last_purge = 0.0
        while True:
            try:
                await self._outcomes.write_unrecorded()
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
        reserve = self._reserve()

        def fetch(account: str) -> int:
            held = self._by_account.get(account, 0)
            want = max(room, reserve - held)
            # in-flight recipients are still 'queued' on disk and may come back first: ask for enough rows
            return want + held if want > 0 else 0

        # an attempt that ends while the query runs may come back as a stale 'queued' row: remember every
        # attempt that ends from now on and skip those rows (else the recipient would get a second copy)
        with self._ends_meanwhile() as ended:
            rows = await self._store.due(self._clock(), max(room, 0), per_account=fetch, taken=self._taken)
        # fewer rows than asked for: nothing else is due now
        self._backlog = room <= 0 or len(rows) >= room
        unrecorded = self._outcomes.unrecorded
        admitted: list[DueRecipient] = []
        for item in rows:  # interleaved by account: a full window still lets each account's reserve in
            key = (item.queue_id, item.index)
            if (
                not self._taken(item.queue_id, item.index)  # again: the read may have given up the loop
                and key not in ended
                and key not in unrecorded
                and self._admits(item.account)
            ):
                self._enter(admitted, item)
        self._start(admitted)

    def _taken(self, queue_id: str, index: int) -> bool:
        """In the window, or about to be given to it by its submission: a scan leaves it alone."""
        return (queue_id, index) in self._inflight or queue_id in self._expected

    @contextlib.contextmanager
    def _ends_meanwhile(self) -> Iterator[set[tuple[str, int]]]:
        """The attempts that end while the caller reads the queue: a read that started before an attempt
        wrote its outcome may return that recipient as still 'queued'."""
        ended: set[tuple[str, int]] = set()
        self._ended_during_read.append(ended)
        try:
            yield ended
        finally:
            self._ended_during_read.remove(ended)

    def _dispatch(self, item: DueRecipient) -> None:
        admitted: list[DueRecipient] = []
        self._enter(admitted, item)
        self._start(admitted)

    def _enter(self, admitted: list[DueRecipient], item: DueRecipient) -> None:
        """Count ``item`` in the active window now (so the next admission sees it); started by
        :meth:`_start`."""
        self._inflight.add((item.queue_id, item.index))
        self._by_account[item.account] = self._by_account.get(item.account, 0) + 1
        admitted.append(item)

    def _start(self, admitted: list[DueRecipient]) -> None:
        """One task per recipient, except the recipients of one message at one domain: one task sends
        their copies one after another (:meth:`_attempt_copies`)."""
        by_destination: dict[tuple[str, str], list[DueRecipient]] = {}
        for item in admitted:
            by_destination.setdefault((item.queue_id, _domain(item.address)), []).append(item)
        for same in by_destination.values():
            for at in range(0, len(same), _COPIES_PER_TASK):
                group = same[at : at + _COPIES_PER_TASK]
                self._spawn(self._attempt(group[0]) if len(group) == 1 else self._attempt_copies(group))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- one attempt ---------------------------------------------------------------------------------------

    async def _data(self, item: DueRecipient, known: StoredData | None = None) -> StoredData | None:
        """This recipient's data: from memory for the first attempts after submission (each recipient
        uses it once), else ``known`` (the message to render, read for another of its recipients), else
        from the queue (where an older relayd may have stored a recipient's own finished copy)."""
        data = self._cache.take(item.queue_id) or (known if known is not None and known.render else None)
        return data or await self._store.recipient_data(item.queue_id, item.index)

    async def _attempt(self, item: DueRecipient, checked: StoredData | None = None) -> None:
        """One attempt of ``item``; ``checked``: its data, whose dequeue check already passed."""
        try:
            stored = checked or await self._ready(item, await self._data(item))
            if isinstance(stored, StoredData):
                await self._deliver(item, lambda: self._send(item, stored))
        except StorageError as exc:
            # the outcome could not be written: the recipient stays 'queued' and is tried again later
            log.error("%s: recording the outcome for recipient %d failed: %s", item.queue_id, item.index, exc)
        finally:
            self._leave(item)

    def _leave(self, item: DueRecipient) -> None:
        key = (item.queue_id, item.index)
        self._inflight.discard(key)
        n = self._by_account.get(item.account, 0) - 1
        if n > 0:
            self._by_account[item.account] = n
        else:
            self._by_account.pop(item.account, None)
        for ended in self._ended_during_read:
            ended.add(key)
        if self._backlog and len(self._inflight) < self._cfg.queue.active_limit // 2:
            self._wake.set()

    async def _ready(self, item: DueRecipient, stored: StoredData | None) -> StoredData | Decision | None:
        """``item``'s data, once the dequeue check let it through; else what happened instead:
        ``Decision.HOLD`` (its account is suspended: its queued recipients were held),
        ``Decision.DROP`` (dropped, recorded), None (no data)."""
        if stored is None:
            log.warning("%s: message data missing; recipient %d left as is", item.queue_id, item.index)
            return None
        if self._gate is not None:
            verdict = await self._gate.check(item)
            if verdict.decision is Decision.HOLD:
                n = await self._store.hold_account(item.account)
                log.info(
                    "%s: account=%s suspended: %d queued recipient(s) held", item.queue_id, item.account, n
                )
                return Decision.HOLD
            if verdict.decision is Decision.DROP:
                await self._outcomes.dropped(item, verdict.reason)
                return Decision.DROP
        return stored

    async def _deliver(
        self,
        item: DueRecipient,
        send: Callable[[], Awaitable[str | None]],
        delivered: list[tuple[DueRecipient, str, int, float]] | None = None,
    ) -> None:
        """One attempt of ``item`` through ``send`` (None: postponed by shaping), and its outcome; a 250
        goes to ``delivered`` when given (recorded with others by the caller)."""
        attempts = item.attempts + 1
        started = time.monotonic()
        try:
            reply = await send()
            if reply is None:
                return  # postponed by shaping: no attempt was made
        except PermanentFailure as exc:
            await self._outcomes.bounced(item, exc, attempts, started)
            return
        except TemporaryFailure as exc:
            outcome = await self._outcomes.temporary(item, attempts, str(exc), self._cfg.queue, exc)
            await self._outcomes.observe(item, outcome, str(exc), time.monotonic() - started, exc)
            return
        except Exception as exc:  # a bug of ours must not lose the message: defer it and say so loudly
            log.exception("%s: delivery to <%s> crashed; deferring", item.queue_id, item.address)
            await self._outcomes.temporary(
                item, attempts, f"internal error: {type(exc).__name__}", self._cfg.queue
            )
            return
        if delivered is None:
            await self._outcomes.delivered(item, reply, attempts, started)
        else:
            delivered.append((item, reply, attempts, time.monotonic() - started))

    async def _copy(self, item: DueRecipient, stored: StoredData) -> Chunks:
        """``item``'s own copy made from the message (relayd.policy.render), or the stored bytes as such."""
        if stored.render and self._renderer is not None:
            return await self._renderer.render(item, stored.data)
        return stored.data

    async def _send(self, item: DueRecipient, stored: StoredData) -> str | None:
        """Route, wait for a lane of the destination (fair by account, within its shaping), make the copy
        (from ``stored``), send.

        The copy is made only once a lane and a socket are ours: recipients waiting for one hold no copy
        (a signed copy each for up to ``active_limit`` waiting recipients was tens of MB per process).

        Returns the final reply, or None when shaping postponed the recipient (its due time moved on disk,
        nothing sent, no attempt counted). Raises Temporary/PermanentFailure; a block reply is raised as a
        TemporaryFailure once its source address is suspended, because it says nothing about the recipient.
        """
        held = await self._grant(item, [item])
        if held is None:
            return None
        try:
            async with self._sockets:
                return await self._send_held(held, item, stored)
        finally:
            if not held.released:
                self._shaper.release(held.got, held.signal)

    async def _grant(self, item: DueRecipient, postpone: list[DueRecipient]) -> Held | None:
        """Plan and a lane for ``item``'s destination; None when shaping postponed it, and with it the
        recipients ``postpone`` (their due times moved on disk, no attempt counted)."""
        domain = _domain(item.address)
        route = await self._router.route(domain)
        # the plan before a lane is taken: an unmet policy defers at once
        plan = await self._planner.plan(domain, route)
        destination, rule = self._shaping.destination(domain, route)
        sources = self._sources.get(item.account, DEFAULT_SOURCES)
        got = await self._shaper.acquire(destination, rule, item.account, sources)
        if isinstance(got, Postponed):
            metrics.SHAPING_POSTPONED.labels(destination, got.reason).inc()
            why = f"{got.delay:.1f}s by shaping of {destination} ({got.reason})"
            await self._outcomes.postponed(postpone, self._clock() + got.delay, why)
            return None
        return Held(plan, got, destination)

    async def _send_held(
        self,
        held: Held,
        item: DueRecipient,
        stored: StoredData,
        then: Next | None = None,
        primed: Next | None = None,
    ) -> str:
        """Make ``item``'s copy and send it under a lane already held (and a socket slot); ``primed``: the
        copy was made and its commands pipelined behind the last one's (Transport.send), ``then``: the
        next copy, whose commands go behind this one's."""
        try:
            data = await self._copy(item, stored) if primed is None else primed.data
            sender = self._sender(item) if primed is None else primed.mail_from
            reply = await self._planner.send(
                held.plan, sender, item.address, data, held.got.channel, then, primed
            )
        except (TemporaryFailure, PermanentFailure) as exc:
            signal = classify(exc)
            held.broken = held.broken or exc.code is None  # no reply: the connection or the server failed
            if signal is not Signal.BLOCKED:
                if signal is not Signal.NONE or held.signal is not Signal.SLOW_DOWN:
                    held.signal = signal
                raise
            held.released = True
            await self._blocked(item, held.got, held.destination, exc)
            source = held.got.lane.source.address or "default"
            raise TemporaryFailure(
                f"{exc} (source {source} suspended for {held.destination})",
                exc.code,
                exc.status,
                command=exc.command,
                text=exc.text,
            ) from exc
        if held.signal is Signal.NONE:
            held.signal = Signal.OK
        return reply

    def _sender(self, item: DueRecipient) -> str:
        """The copy's VERP return path; the null one for relayd's own notices (nothing bounces back)."""
        if not item.mail_from:
            return ""
        return verp_address(self._secret, self._verp_domain, item.queue_id, item.index, item.address)

    async def _next(self, item: DueRecipient, stored: StoredData) -> Next | None:
        """``item``'s copy made ahead (its commands go behind the copy being sent); None if that failed:
        its own attempt makes it again, and records that failure as its own."""
        try:
            return Next(self._sender(item), item.address, await self._copy(item, stored))
        except Exception:
            return None

    async def _attempt_copies(self, items: list[DueRecipient]) -> None:
        """The recipients of one message at one domain: their copies one after another under one lane and
        one connection, as Postfix's smtp sends the recipients of one queue file, not a task each that
        would route, plan, wait for a lane and take a connection on its own; the next copy is made ahead,
        its commands pipelined behind this one's content (Transport.send ``then``). Each copy is still its
        own attempt (made, signed, sent in its own transaction); failures are recorded as they happen, the
        250s together at the end (one queue write, one events write: a crash before it resends them). The
        lane is held while it has no rate (a rate is per message) and until a block, slow-down or
        connection failure (a server that stalls must not hold the rest in line); then the remaining
        copies go in tasks of their own, each waiting for a lane."""
        mine = items  # the recipients this task ends; those handed to tasks of their own end there
        try:
            data: list[StoredData | None] = []
            for item in items:  # the message read once, if it is not in memory
                data.append(await self._data(item, next((d for d in data if d is not None), None)))
            # checked together: the dequeue check answers the recipients asking at once in one query
            checked = await asyncio.gather(*(self._ready(i, d) for i, d in zip(items, data, strict=True)))
            if Decision.HOLD in checked:
                return  # the account's queued recipients, these among them, are held
            ready = [(i, d) for i, d in zip(items, checked, strict=True) if isinstance(d, StoredData)]
            if not ready:
                return
            held = await self._grant(ready[0][0], [item for item, _ in ready])
            if held is None:
                return
            delivered: list[tuple[DueRecipient, str, int, float]] = []
            then: Next | None = None  # the next copy, made ahead (RFC 2920: its commands behind this one)
            try:
                async with self._sockets:
                    for k, (item, stored) in enumerate(ready):
                        if k and (
                            held.released
                            or held.broken
                            or held.signal is Signal.SLOW_DOWN
                            or held.got.lane.limit is not None
                        ):
                            rest = ready[k:]
                            mine = [i for i in items if i not in {r for r, _ in rest}]
                            for other, other_stored in rest:
                                self._spawn(self._attempt(other, other_stored))
                            break
                        if k:
                            held.got.lane.reuse(time.monotonic())
                        primed, then = then, None
                        if k + 1 < len(ready) and held.got.lane.limit is None:
                            then = await self._next(*ready[k + 1])
                        send = functools.partial(self._send_held, held, item, stored, then, primed)
                        try:
                            await self._deliver(item, send, delivered)
                        finally:
                            if primed is not None:
                                self._transport.abandon(primed)  # not taken: a failure before the send
            finally:
                if then is not None:
                    self._transport.abandon(then)  # primed for a copy left to a task of its own
                if not held.released:
                    self._shaper.release(held.got, held.signal)
                await self._outcomes.delivered_many(delivered)
        except StorageError as exc:
            # an outcome could not be written: the recipients without one stay 'queued', tried again later
            log.error("%s: recording an outcome failed: %s", items[0].queue_id, exc)
        finally:
            for item in mine:
                self._leave(item)

    async def _blocked(self, item: DueRecipient, got: Grant, destination: str, exc: DeliveryError) -> None:
        """Suspend the source address for the destination; the first block reply records the event."""
        if self._shaper.release(got, Signal.BLOCKED):
            source = got.lane.source.address or "default source"
            metrics.IP_SUSPENSIONS.labels(destination, source).inc()
            await self._outcomes.observe(
                item,
                DeliveryOutcome.IP_SUSPENDED,
                f"{source} suspended for {destination} for {got.lane.rule.suspend:.0f}s: {exc}",
                0.0,
                exc,
            )


def _domain(address: str) -> str:
    return address.rpartition("@")[2]
