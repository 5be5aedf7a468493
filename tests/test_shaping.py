"""Traffic shaping: provider recognition, reply classification, caps, rate spacing and adaptive slow-down.

End-to-end tests count at a real receiving server what a provider would count: simultaneous connections,
messages per connection, messages per second.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as AioSMTP
from aiosmtpd.smtp import Envelope, Session

from relayd import config
from relayd.config import Config
from relayd.core.errors import ConfigError, DeliveryError, PermanentFailure, TemporaryFailure
from relayd.queue.routing import Route
from relayd.queue.shaping import Lane, Rule, ShapingTable, Signal, Source, classify
from tests.harness import PASSWORD, Relayd, free_port, message, wait_until

ROOT = Path(__file__).resolve().parent.parent

# --- reply classification -----------------------------------------------------------------------------------


def _err(reply: str) -> DeliveryError:
    code, _, rest = reply.partition(" ")
    first = rest.split(" ", 1)[0]
    status = first if first[:1].isdigit() and first.count(".") == 2 else None
    text = rest[len(first) :].strip() if status else rest
    kind = PermanentFailure if code.startswith("5") else TemporaryFailure
    return kind(reply, int(code), status, text=text)


@pytest.mark.parametrize(
    ("reply", "signal"),
    [
        ("421 4.7.0 try again later", Signal.SLOW_DOWN),
        ("421 4.7.28 Our system has detected an unusual rate of unsolicited mail", Signal.SLOW_DOWN),
        (
            "421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume",
            Signal.SLOW_DOWN,
        ),
        ("451 4.7.500 Server busy. Please try again later from [192.0.2.1]", Signal.SLOW_DOWN),
        ("452 4.5.3 Too many recipients", Signal.SLOW_DOWN),
        ("450 4.7.1 Too many connections, slow down", Signal.SLOW_DOWN),
        ("451 4.7.1 greylisted, try again later", Signal.NONE),
        ("450 4.2.0 mailbox busy", Signal.NONE),
        ("550 5.7.1 Service unavailable; client host [192.0.2.1] blocked using Spamhaus", Signal.BLOCKED),
        ("550 5.7.1 Unfortunately, messages from [192.0.2.1] weren't sent. (S3150)", Signal.BLOCKED),
        ("554 5.7.1 192.0.2.1 is listed at zen.example.test", Signal.BLOCKED),
        ("553 5.7.2 [TSS09] All messages from 192.0.2.1 will be permanently deferred", Signal.BLOCKED),
        ("554 Your IP is on our blacklist", Signal.BLOCKED),
        ("550 5.1.1 user not listed in Domino Directory", Signal.NONE),
        ("550 5.7.1 This message is likely unsolicited mail", Signal.NONE),
        ("552 5.2.2 mailbox full", Signal.NONE),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 20 else None,
)
def test_classify(reply: str, signal: Signal) -> None:
    assert classify(_err(reply)) is signal


def test_connection_failure_says_nothing() -> None:
    assert classify(TemporaryFailure("connect to 127.0.0.1:1: refused")) is Signal.NONE


# --- rules --------------------------------------------------------------------------------------------------


def _shipped(**inline: object) -> Config:
    return Config.model_validate(
        {"delivery": {"shaping_file": str(ROOT / "conf" / "shaping.toml")}, "shaping": inline}
    )


def test_shipped_file_recognises_providers_by_mx_and_domain() -> None:
    table = ShapingTable.from_config(_shipped())
    workspace = Route("corp.example", (("192.0.2.1", 25),), ("aspmx.l.google.com", "alt1.aspmx.l.google.com"))
    assert table.destination("corp.example", workspace)[0] == "gmail"  # a Workspace domain: Gmail by its MX
    assert table.destination("gmail.com", Route("gmail.com", ()))[0] == "gmail"
    assert table.destination("aol.com", Route("aol.com", (), ("mx-aol.mail.gm0.yahoodns.net",)))[0] == "yahoo"
    name, rule = table.destination("web.de", Route("web.de", ()))
    assert (name, rule.rate) == ("united-internet", 3000 / 3600)
    name, rule = table.destination("small.example", Route("small.example", (), ("mx.small.example",)))
    assert (name, rule.name, rule.connections, rule.suspend) == ("small.example", "default", 10, 3600.0)
    for rule in table.rules:
        assert rule.mx and rule.domains, rule.name


def test_inline_section_overrides_the_file_key_by_key() -> None:
    table = ShapingTable.from_config(_shipped(gmail={"rate": "600/h"}, extra={"domains": ["x.example"]}))
    gmail = next(r for r in table.rules if r.name == "gmail")
    assert gmail.rate == pytest.approx(600 / 3600)
    assert gmail.connections == 5 and "*.google.com" in gmail.mx  # kept from the file
    extra = next(r for r in table.rules if r.name == "extra")
    assert (extra.connections, extra.messages_per_connection) == (10, 100)  # from the file's default


def test_without_rules_delivery_limits_apply() -> None:
    table = ShapingTable.from_config(
        Config.model_validate({"delivery": {"connections_per_destination": 7, "messages_per_connection": 9}})
    )
    assert (table.default.connections, table.default.messages_per_connection, table.default.rate) == (
        7,
        9,
        None,
    )


def test_check_config_reports_shaping_file_problems(tmp_path: Path) -> None:
    bad = tmp_path / "shaping.toml"
    bad.write_text('[shaping.gmail]\nrate = "fast"\nconections = 3\n')
    cfg = tmp_path / "relayd.toml"
    cfg.write_text(f'[delivery]\nshaping_file = "{bad}"\n')
    with pytest.raises(ConfigError) as exc:
        config.load(cfg)
    text = "\n".join(exc.value.problems)
    assert f"{bad}: shaping.gmail.rate: expected a rate" in text
    assert f"{bad}: shaping.gmail.conections: unknown key" in text
    bad.write_text('[shaping.default]\nmx = ["*.x"]\n')
    with pytest.raises(ConfigError, match=r"shaping\.default applies to every other destination"):
        config.load(cfg)
    (tmp_path / "missing.toml").unlink(missing_ok=True)
    cfg.write_text(f'[delivery]\nshaping_file = "{tmp_path / "missing.toml"}"\n')
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(cfg)


# --- the adaptive limiter -----------------------------------------------------------------------------------


def test_slow_down_halves_once_per_round_and_recovers_additively() -> None:
    lane = Lane("gmail", Source(), Rule("gmail", rate=10.0), limit=10.0)
    assert lane.slow_down(now=100.0, started=99.9)
    assert lane.limit == pytest.approx(5.0)
    assert lane.paused_until == pytest.approx(101.0)
    assert not lane.slow_down(now=100.1, started=99.95)  # began before the cut: already accounted for
    assert lane.limit == pytest.approx(5.0)
    for _ in range(49):
        lane.succeeded()
    assert 9.0 < (lane.limit or 0) < 10.0
    lane.succeeded()
    assert lane.limit == 10.0  # back at the configured rate, not beyond
    lane.succeeded()
    assert lane.limit == 10.0


def test_without_a_configured_rate_the_cut_starts_from_what_was_sent() -> None:
    lane = Lane("x", Source(), Rule("x"))
    for i in range(40):
        lane.start(10.0 + i * 0.01)  # 40 attempts in 0.4 s: 100/s
        lane.busy -= 1
    assert lane.slow_down(now=10.4, started=10.39)
    assert lane.limit == pytest.approx(50.0, rel=0.1)


# --- end to end --------------------------------------------------------------------------------------------


@dataclass
class Counter:
    """Shared state of a :class:`CountingSink`: what a provider would measure."""

    open: int = 0
    max_open: int = 0
    per_connection: list[int] = field(default_factory=list)
    attempts: list[float] = field(default_factory=list)  # every MAIL, answered or refused
    accepted: list[float] = field(default_factory=list)
    throttled: int = 0
    delivered: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _CountingSMTP(AioSMTP):
    def __init__(self, counter: Counter, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.counter = counter
        self.slot: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        with self.counter.lock:
            self.counter.open += 1
            self.counter.max_open = max(self.counter.max_open, self.counter.open)
            self.slot = len(self.counter.per_connection)
            self.counter.per_connection.append(0)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        with self.counter.lock:
            self.counter.open -= 1
        super().connection_lost(exc)


@dataclass
class CountingHandler:
    counter: Counter
    rate: int | None = None  # answer 421 above this many accepted MAILs in the last second
    delay: float = 0.0

    async def handle_MAIL(
        self, server: AioSMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        now = time.monotonic()
        with self.counter.lock:
            self.counter.attempts.append(now)
            recent = sum(1 for t in self.counter.accepted if t > now - 1.0)
            if self.rate is not None and recent >= self.rate:
                self.counter.throttled += 1
                return "421 4.7.0 try again later"
            self.counter.accepted.append(now)
        envelope.mail_from = address
        return "250 OK"

    async def handle_DATA(self, server: AioSMTP, session: Session, envelope: Envelope) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        assert isinstance(server, _CountingSMTP) and server.slot is not None
        with self.counter.lock:
            self.counter.per_connection[server.slot] += 1
            self.counter.delivered.extend(envelope.rcpt_tos)
        return "250 2.0.0 OK"


class CountingSink(Controller):
    def __init__(self, *, rate: int | None = None, delay: float = 0.0) -> None:
        self.counter = Counter()
        self.port = free_port()
        super().__init__(CountingHandler(self.counter, rate, delay), hostname="127.0.0.1", port=self.port)

    def factory(self) -> AioSMTP:
        return _CountingSMTP(self.counter, self.handler, **self.SMTP_kwargs)

    def __enter__(self) -> CountingSink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def delivered(self) -> int:
        with self.counter.lock:
            return len(self.counter.delivered)


@pytest.fixture
def counting() -> Iterator[CountingSink]:
    with CountingSink() as sink:
        yield sink


def submit_many(relayd: Relayd, n: int, prefix: str = "r", user: str = "acme") -> None:
    """One session, ``n`` transactions of one recipient each (fast: one AUTH)."""
    with relayd.smtp() as s:
        s.login(user, PASSWORD)
        for i in range(n):
            s.mail(f"app@{user}.example.test")
            s.rcpt(f"{prefix}{i}@example.test")
            code, resp = s.data(message(f"{prefix} {i}", sender=f"app@{user}.example.test"))
            assert code == 250, resp


SHAPING = """
[shaping.sink]
domains = ["example.test"]
"""


def test_connection_and_per_connection_caps_hold_at_the_receiver(tmp_path: Path) -> None:
    with CountingSink(delay=0.02) as sink:
        accounts_extra = SHAPING + "connections = 2\nmessages_per_connection = 3\n"
        relayd = Relayd(tmp_path, routes={"example.test": sink.port})
        relayd.config.write_text(relayd.config.read_text() + accounts_extra)
        with relayd:
            submit_many(relayd, 30)
            assert wait_until(lambda: sink.delivered() == 30)
        c = sink.counter
        assert c.max_open == 2  # the cap was reached, never passed
        assert max(c.per_connection) == 3
        assert len(c.per_connection) >= 10


def test_throttled_sender_slows_to_what_the_receiver_accepts_and_loses_nothing(tmp_path: Path) -> None:
    n, total = 10, 100
    with CountingSink(rate=n) as sink:
        with Relayd(tmp_path, routes={"example.test": sink.port}) as relayd:
            start = time.monotonic()
            submit_many(relayd, total)
            assert wait_until(lambda: sink.delivered() == total, timeout=40)
            elapsed = time.monotonic() - start
        c = sink.counter
        assert sorted(c.delivered) == sorted(f"r{i}@example.test" for i in range(total))
        assert c.throttled > 0
        # after a few halvings the attempt rate stays near what the receiver takes: count attempts, refused
        # ones included, in each 1-second window of the second half of the run
        settled = [t for t in c.attempts if t > start + elapsed / 2]
        worst = max(sum(1 for u in settled if t <= u < t + 1.0) for t in settled)
        assert worst <= 1.5 * n, (worst, elapsed, c.throttled)
        late_refusals = sum(1 for t in settled if t not in c.accepted)
        assert late_refusals <= len(settled) * 0.2, (late_refusals, len(settled))
    assert "asked to slow down" in relayd.log_text()


def test_rate_spaces_messages_and_waiting_is_not_an_attempt(tmp_path: Path, counting: CountingSink) -> None:
    relayd = Relayd(tmp_path, routes={"example.test": counting.port})
    relayd.config.write_text(relayd.config.read_text() + SHAPING + 'rate = "120/m"\n')
    with relayd:
        submit_many(relayd, 6)
        assert wait_until(lambda: counting.delivered() == 6, timeout=20)
        listing = relayd.cli("queue", "list", "--json", "--state", "done")
    times = counting.counter.accepted
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) > 0.4, gaps  # 2/s: one every 0.5 s, never a burst
    assert len(counting.counter.attempts) == 6  # held back messages were not tried and refused
    assert '"attempts": 1' in listing.stdout and '"attempts": 2' not in listing.stdout
