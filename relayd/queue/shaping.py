"""Per-destination traffic shaping and fair queueing between accounts, after KumoMTA.

A *destination* is a mailbox provider recognised by its MX host names (every ``*.google.com`` MX is Gmail,
whatever the recipient domain) or by recipient domain; anything no rule names is its own destination per
next hop, under the ``default`` rule. Limits are data (``[shaping.NAME]``, ``conf/shaping.toml``), counted
per *lane* = destination x source address, because providers count per sending IP:

* ``connections``: connections open at once (the transport counts idle pooled ones too);
* ``messages_per_connection``: then QUIT and a new connection;
* ``rate``: messages per time per source address, spaced evenly (no bursts: a burst is what trips a
  provider's rate limiter).

Adaptive, like TCP's congestion control (AIMD): a reply that means "slow down" (:func:`classify`) halves the
lane's rate -- measured from what was actually sent when no rate is configured -- and pauses the lane for a
back-off that doubles while nothing gets through; each success adds back a small step, so after about
``_RECOVERY`` messages the lane is at its old rate again. Replies to attempts that started before the last cut
do not cut again (one cut per round trip). A block reply (5.7.x naming a block list) suspends the source
address for that destination for ``suspend`` (1 h unless configured): mail then goes out through the pool's
other addresses, or waits.

Fairness: attempts that wait for a lane wait in one FIFO per account, and lanes are granted round-robin
between accounts (KumoMTA's scheduled queue per tenant@domain): an account with 5,000 messages waiting gets
every other slot once a second account has mail for the same destination, not all slots until it is done.
A waiter whose lane will not be free for more than ``HOLD`` seconds (rate spacing, back-off, suspension) is
handed back as :class:`Postponed`: the scheduler moves its due time on disk without counting an attempt, so
waiting for a throttle never fills the active window nor uses up the retry schedule.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum

from relayd.config import Config, ShapingConfig, load_shaping_file
from relayd.core import metrics
from relayd.core.errors import DeliveryError
from relayd.queue.routing import Route
from relayd.queue.transport.client import Channel

log = logging.getLogger(__name__)

#: a waiter whose lane is busy for longer than this goes back to disk (postponed) instead of holding memory
HOLD = 2.0
_SUSPEND = 3600.0  # block reply -> source address rests this long for the destination, unless configured
_BACKOFF_MIN = 1.0  # pause after a "slow down" reply; doubles while nothing gets through ...
_BACKOFF_MAX = 300.0  # ... up to this
_FLOOR = 1 / 60  # a lane never goes below one message a minute: it must be able to find out it may speed up
_RECOVERY = 50  # successes to climb from a halved rate back to the rate that was cut
_OBSERVE = 1.0  # seconds of attempts the "observed rate" is measured over
_FORGET = 3600.0  # a lane unused this long is forgotten (adaptive state and all)


# --- rules --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    """One destination's limits, complete (``default`` filled in). ``rate`` is messages/second/source."""

    name: str
    mx: tuple[str, ...] = ()
    domains: frozenset[str] = frozenset()
    connections: int = 20
    messages_per_connection: int = 100
    rate: float | None = None
    suspend: float = _SUSPEND


def _merge(base: ShapingConfig, over: ShapingConfig) -> ShapingConfig:
    """``over``'s keys as written (not its defaults) on top of ``base``: inline sections tune file entries."""
    return base.model_copy(update={k: getattr(over, k) for k in over.model_fields_set})


class ShapingTable:
    """The rules in effect: the shaping file's entries, then inline ``[shaping.NAME]`` key by key.

    Without any rule every destination gets ``[delivery]``'s ``connections_per_destination`` and
    ``messages_per_connection`` and no rate: relayd without shaping config behaves as before.
    """

    def __init__(self, rules: Iterable[Rule], default: Rule) -> None:
        self.rules = tuple(rules)
        self.default = default
        self._by_domain = {d: r for r in reversed(self.rules) for d in r.domains}

    @classmethod
    def from_config(cls, cfg: Config) -> ShapingTable:
        """Raises :class:`relayd.core.errors.ConfigError` when the shaping file is unreadable or invalid."""
        entries: dict[str, ShapingConfig] = {}
        if cfg.delivery.shaping_file is not None:
            entries.update(load_shaping_file(cfg.delivery.shaping_file))
        for name, entry in cfg.shaping.items():
            entries[name] = _merge(entries[name], entry) if name in entries else entry
        default_cfg = entries.pop("default", ShapingConfig())
        default = Rule(
            name="default",
            connections=default_cfg.connections or cfg.delivery.connections_per_destination,
            messages_per_connection=default_cfg.messages_per_connection
            or cfg.delivery.messages_per_connection,
            rate=_per_second(default_cfg),
            suspend=default_cfg.suspend if default_cfg.suspend is not None else _SUSPEND,
        )
        rules = []
        for name, entry in entries.items():
            full = _merge(default_cfg, entry)
            rules.append(
                Rule(
                    name=name,
                    mx=tuple(entry.mx),
                    domains=frozenset(entry.domains),
                    connections=full.connections or default.connections,
                    messages_per_connection=full.messages_per_connection or default.messages_per_connection,
                    rate=_per_second(full),
                    suspend=full.suspend if full.suspend is not None else default.suspend,
                )
            )
        return cls(rules, default)

    def destination(self, domain: str, route: Route) -> tuple[str, Rule]:
        """(destination key, its rule): a named rule by recipient domain first, then by any MX host name
        (in file order); otherwise the route's next hop under ``default``."""
        rule = self._by_domain.get(domain.lower())
        if rule is not None:
            return rule.name, rule
        for rule in self.rules:
            if any(fnmatch.fnmatchcase(name, glob) for glob in rule.mx for name in route.names):
                return rule.name, rule
        return f"{route.nexthop}", self.default


def _per_second(entry: ShapingConfig) -> float | None:
    if entry.rate is None:
        return None
    count, per = entry.rate
    return count / per if count else None  # "unlimited" is a count of 0


# --- what a reply means -------------------------------------------------------------------------------------


class Signal(Enum):
    """What a delivery attempt says about the lane (not about the recipient)."""

    OK = "ok"
    NONE = "none"  # a failure that says nothing about our sending rate or reputation
    SLOW_DOWN = "slow_down"
    BLOCKED = "blocked"


# "try again later" alone is also what greylisting says (451 4.7.1 greylisted, try again later): a first
# contact, not a rate problem, so greylisting texts are excluded before these are looked for
_SLOW = re.compile(
    r"try again later|too many|rate limit|ratelimit|throttl|slow down|exceeded|unusual rate|"
    r"temporarily deferred|temporarily rate|volume|TSS0[14]|4\.7\.28",
    re.IGNORECASE,
)
_GREY = re.compile(r"gr[ae]y ?list", re.IGNORECASE)
# block lists and IP reputation blocks; "listed" alone only with a 5.7.x status ("not listed in the
# directory" is a 5.1.1 unknown user on Domino)
_BLOCK = re.compile(
    r"block ?list|black ?list|blocked|spamhaus|spamcop|barracuda|sorbs|dnsbl|\brbl\b|listed|"
    r"poor reputation|bad reputation|reputation of|TSS09|S3150",
    re.IGNORECASE,
)
_BLOCK_STRONG = re.compile(r"block ?list|black ?list|spamhaus|spamcop|dnsbl|\brbl\b", re.IGNORECASE)


def classify(error: DeliveryError) -> Signal:
    """Read a failed attempt's reply for shaping. 421 always means "go away for now" (RFC 5321 §3.8); 4.7.x
    texts like "too many" / "try again later" and 452 "too many recipients" are rate limits; 5.7.x
    naming a block list (Spamhaus, "blocked", "listed", Outlook's S3150, Yahoo's TSS09) blocks the source."""
    code = error.code
    if code is None:
        return Signal.NONE
    text = f"{error.status or ''} {error.text or error}"
    if 500 <= code < 600:
        five_seven = (error.status or "").startswith("5.7.")
        if (five_seven and _BLOCK.search(text)) or (error.status is None and _BLOCK_STRONG.search(text)):
            return Signal.BLOCKED
        return Signal.NONE
    if code == 421:
        return Signal.SLOW_DOWN
    if 400 <= code < 500 and not _GREY.search(text):
        status = error.status or ""
        rate_ish = status.startswith("4.7.") or code == 452 or status == "4.5.3" or not status
        if rate_ish and _SLOW.search(text):
            return Signal.SLOW_DOWN
    return Signal.NONE


# --- lanes and grants ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Source:
    """A local address to send from (None: the kernel picks) and its EHLO name (None: the default)."""

    address: str | None = None
    helo: str | None = None


DEFAULT_SOURCES = (Source(),)


@dataclass(slots=True)
class Lane:
    """One destination through one source address: connection slots, spacing, back-off, suspension."""

    destination: str
    source: Source
    rule: Rule
    limit: float | None = None  # messages per second now; None: no spacing
    busy: int = 0
    next_free: float = 0.0
    paused_until: float = 0.0
    suspended_until: float = 0.0
    backoff: float = _BACKOFF_MIN
    last_cut: float = float("-inf")
    cut_from: float = 0.0
    last_used: float = 0.0
    sent: deque[float] = field(default_factory=deque)

    @property
    def key(self) -> str:
        return f"{self.destination}|{self.source.address or '*'}"

    def ready_at(self) -> float:
        """Earliest monotonic time a new attempt may start, connection slots aside."""
        at = max(self.paused_until, self.suspended_until)
        return max(at, self.next_free) if self.limit is not None else at

    def can_start(self, now: float) -> bool:
        return self.busy < self.rule.connections and self.ready_at() <= now

    def start(self, now: float) -> None:
        self.busy += 1
        self.last_used = now
        self.sent.append(now)
        while self.sent and self.sent[0] < now - _OBSERVE:
            self.sent.popleft()
        if self.limit is not None:
            self.next_free = max(self.next_free, now) + 1 / self.limit

    def reuse(self, now: float) -> None:
        """One more message sent under an attempt already started (the copies of one message one after
        another on its connection): it counts toward the observed rate a slow-down reply halves, and
        takes no connection slot."""
        self.last_used = now
        self.sent.append(now)
        while self.sent and self.sent[0] < now - _OBSERVE:
            self.sent.popleft()

    def slow_down(self, now: float, started: float) -> bool:
        """Halve the rate and pause; returns whether this reply cut (one cut per round trip)."""
        if started < self.last_cut:
            return False
        # what was sent since the last pause, over at most the last second, measured from its first attempt
        recent = [t for t in self.sent if t >= max(now - _OBSERVE, self.paused_until)]
        observed = len(recent) / max(now - recent[0], 0.05) if recent else 0.0
        known = [x for x in (self.limit, observed) if x]
        base = min(known) if known else 1.0
        self.cut_from = base
        self.limit = max(_FLOOR, base / 2)
        self.last_cut = now
        self.paused_until = now + self.backoff
        self.next_free = max(self.next_free, self.paused_until)
        self.backoff = min(self.backoff * 2, _BACKOFF_MAX)
        return True

    def succeeded(self) -> None:
        """Additive increase: a step of the cut size per success, back to the configured rate."""
        self.backoff = _BACKOFF_MIN
        if self.limit is None or self.cut_from <= 0:
            return
        self.limit += self.cut_from / (2 * _RECOVERY)
        ceiling = self.rule.rate
        if ceiling is not None and self.limit >= ceiling * (1 - 1e-9):
            self.limit, self.cut_from = ceiling, 0.0

    def suspend(self, now: float) -> bool:
        """Rest the source address for the destination; returns whether it was not suspended already."""
        fresh = self.suspended_until <= now
        self.suspended_until = max(self.suspended_until, now + self.rule.suspend)
        return fresh

    def idle(self, now: float) -> bool:
        """Nothing worth remembering: no attempt running, no back-off, at its configured rate."""
        return (
            self.busy == 0
            and self.ready_at() <= now
            and (self.limit == self.rule.rate or now - self.last_used > _FORGET)
        )


@dataclass(frozen=True, slots=True)
class Grant:
    """Permission for one attempt on ``lane``; give it back with :meth:`Shaper.release`."""

    lane: Lane
    started: float

    @property
    def channel(self) -> Channel:
        src = self.lane.source
        rule = self.lane.rule
        return Channel(self.lane.key, src.address, src.helo, rule.messages_per_connection, rule.connections)


@dataclass(frozen=True, slots=True)
class Postponed:
    """Not now: try again in ``delay`` seconds (nothing was sent, nothing counts as an attempt)."""

    delay: float
    reason: str  # "rate", "paused", "suspended"


@dataclass(slots=True)
class _Waiter:
    future: asyncio.Future[Grant | Postponed]
    sources: tuple[Source, ...]


@dataclass(slots=True)
class _Site:
    rule: Rule
    lanes: dict[str | None, Lane] = field(default_factory=dict)
    # account -> its waiters in arrival order; the dict's order is the round-robin rotation
    waiters: OrderedDict[str, deque[_Waiter]] = field(default_factory=OrderedDict)
    rotation: dict[tuple[str | None, ...], int] = field(default_factory=dict)  # pool -> next address index
    timer: asyncio.TimerHandle | None = None
    timer_at: float = float("inf")


class Shaper:
    """Grants delivery attempts lanes: within the rules, fair between accounts, adaptive to replies."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._sites: dict[str, _Site] = {}
        self._last_sweep = 0.0

    # --- for the scheduler ------------------------------------------------------------------------------

    async def acquire(
        self, destination: str, rule: Rule, account: str, sources: tuple[Source, ...]
    ) -> Grant | Postponed:
        """Wait for a lane of ``destination`` through one of ``sources``, in turn with other accounts."""
        site = self._site(destination, rule)
        waiter = _Waiter(asyncio.get_running_loop().create_future(), sources)
        site.waiters.setdefault(account, deque()).append(waiter)
        self._pump(destination)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            queue = site.waiters.get(account)
            if queue is not None and waiter in queue:
                queue.remove(waiter)
                if not queue:
                    del site.waiters[account]
            elif waiter.future.done() and not waiter.future.cancelled():
                got = waiter.future.result()
                if isinstance(got, Grant):
                    self.release(got, Signal.NONE)
            raise

    def release(self, grant: Grant, signal: Signal) -> bool:
        """The attempt ended; adapt the lane to what the reply meant. Returns True when this reply newly
        suspended the source address (the caller records the event)."""
        lane, now = grant.lane, self._clock()
        lane.busy -= 1
        newly_suspended = False
        if signal is Signal.OK:
            lane.succeeded()
        elif signal is Signal.SLOW_DOWN:
            if lane.slow_down(now, grant.started):
                metrics.SHAPING_SLOWDOWNS.labels(lane.destination).inc()
                log.info(
                    "shaping: %s from %s asked to slow down: %.3f msg/s, pause %.0fs",
                    lane.destination,
                    lane.source.address or "default source",
                    lane.limit or 0.0,
                    lane.paused_until - now,
                )
        elif signal is Signal.BLOCKED:
            newly_suspended = lane.suspend(now)
            if newly_suspended:
                log.warning(
                    "shaping: %s blocks %s: source suspended for that destination for %.0fs",
                    lane.destination,
                    lane.source.address or "the default source",
                    lane.rule.suspend,
                )
        self._pump(lane.destination)
        return newly_suspended

    def lanes(self) -> list[Lane]:
        """Every lane with state (for gauges: suspended sources, current rates)."""
        return [lane for site in self._sites.values() for lane in site.lanes.values()]

    def close(self) -> None:
        for site in self._sites.values():
            if site.timer is not None:
                site.timer.cancel()
            for queue in site.waiters.values():
                for w in queue:
                    if not w.future.done():
                        w.future.cancel()
        self._sites.clear()

    # --- inside ------------------------------------------------------------------------------------------

    def _site(self, destination: str, rule: Rule) -> _Site:
        now = self._clock()
        if now - self._last_sweep > 60.0:
            self._last_sweep = now
            for key, old in list(self._sites.items()):
                for addr, lane in list(old.lanes.items()):
                    if lane.idle(now):
                        del old.lanes[addr]
                if not old.lanes and not old.waiters and key != destination:
                    if old.timer is not None:
                        old.timer.cancel()
                    del self._sites[key]
        site = self._sites.get(destination)
        if site is None:
            site = self._sites[destination] = _Site(rule)
        elif site.rule != rule:  # reloaded config: new limits apply to the next attempts
            site.rule = rule
            for lane in site.lanes.values():
                lane.rule = rule
                if lane.cut_from == 0.0:
                    lane.limit = rule.rate
        return site

    def _lane(self, site: _Site, destination: str, source: Source) -> Lane:
        lane = site.lanes.get(source.address)
        if lane is None or lane.source != source:
            lane = Lane(destination, source, site.rule, limit=site.rule.rate)
            site.lanes[source.address] = lane
        return lane

    def _pick(self, site: _Site, destination: str, sources: tuple[Source, ...], now: float) -> Lane | None:
        """The next usable lane of the pool, round-robin from after the one used last."""
        pool = tuple(s.address for s in sources)
        first = site.rotation.get(pool, 0)
        for i in range(len(sources)):
            k = (first + i) % len(sources)
            lane = self._lane(site, destination, sources[k])
            if lane.can_start(now):
                site.rotation[pool] = (k + 1) % len(sources)
                return lane
        return None

    def _pump(self, destination: str) -> None:
        """Hand out every lane that is free now, one account at a time in rotation; postpone waiters that
        would wait longer than ``HOLD``; set a timer for the rest."""
        site = self._sites.get(destination)
        if site is None:
            return
        if site.timer is not None:
            site.timer.cancel()
            site.timer, site.timer_at = None, float("inf")
        now = self._clock()
        progress = True
        while progress:
            progress = False
            for account in list(site.waiters):
                queue = site.waiters[account]
                while queue and queue[0].future.done():  # cancelled (shutdown) before its task ran again
                    queue.popleft()
                if not queue:
                    del site.waiters[account]
                    continue
                lane = self._pick(site, destination, queue[0].sources, now)
                if lane is None:
                    continue
                waiter = queue.popleft()
                if queue:
                    site.waiters.move_to_end(account)  # served: to the back of the rotation
                else:
                    del site.waiters[account]
                lane.start(now)
                waiter.future.set_result(Grant(lane, now))
                progress = True
                break
        wake = float("inf")
        accounts = max(1, len(site.waiters))
        for account in list(site.waiters):
            queue = site.waiters[account]
            lanes = [self._lane(site, destination, s) for s in queue[0].sources]
            at = min(lane.ready_at() for lane in lanes)
            if at <= now:
                continue  # only connection slots are missing: the next release pumps again
            spacing = _spacing(lanes, now)
            kept: deque[_Waiter] = deque()
            reason = _why(lanes, now)
            for i, waiter in enumerate(queue):
                eta = at - now + i * accounts * spacing
                if waiter.future.done():
                    continue
                if eta > HOLD:
                    waiter.future.set_result(Postponed(eta, reason))
                else:
                    kept.append(waiter)
            if kept:
                site.waiters[account] = kept
                wake = min(wake, at)
            else:
                del site.waiters[account]
        if wake < float("inf"):
            loop = asyncio.get_running_loop()
            site.timer_at = wake
            site.timer = loop.call_later(max(0.0, wake - now), self._pump, destination)


def _spacing(lanes: list[Lane], now: float) -> float:
    """Seconds between two starts over the usable ``lanes`` together (0: nothing spaces them)."""
    usable = [lane for lane in lanes if lane.suspended_until <= now] or lanes
    if any(lane.limit is None for lane in usable):
        return 0.0
    return 1 / sum(lane.limit or 0.0 for lane in usable)


def _why(lanes: list[Lane], now: float) -> str:
    if all(lane.suspended_until > now for lane in lanes):
        return "suspended"
    if any(lane.paused_until > now for lane in lanes):
        return "paused"
    return "rate"


def account_sources(cfg: Config) -> dict[str, tuple[Source, ...]]:
    """Each pooled account's source addresses with their EHLO names; other accounts use the default."""
    out: dict[str, tuple[Source, ...]] = {}
    for name, acct in cfg.accounts.items():
        if acct.pool is not None and acct.pool in cfg.pools:
            out[name] = tuple(Source(ip, helo) for ip, helo in cfg.pools[acct.pool].sources())
    return out
