"""Event webhooks against a real HTTP receiver on 127.0.0.1 (aiohttp), over a real SQLite store.

The receiver checks every signature with :func:`relayd.edge.webhooks.verify` and records what it accepted, so
"delivered" in these tests means: arrived, signed with the endpoint's secret, and answered 2xx. What the
tests hold the dispatcher to: every event of a subscribed kind arrives at least once and in id order (the
sequence of first arrivals is strictly increasing), across receiver outages, stops and kill -9.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from relayd.config import Config
from relayd.core.errors import ConfigError
from relayd.edge.webhooks import (
    EVENT_ID_HEADER,
    EVENT_NAMES,
    SIGNATURE_HEADER,
    WebhookDispatcher,
    endpoint_key,
    render,
    sign,
    verify,
)
from relayd.store import Event, SqliteStore
from tests.harness import PASSWORD_HASH, Relayd, Sink, free_port, message, wait_until

SECRET = b"whsec-0123456789abcdef"
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


# -- the receiving side ---------------------------------------------------------------------------------


class Receiver:
    """An aiohttp server that verifies signatures and records accepted events.

    ``script`` holds the statuses of the next requests (then 200); ``delay`` slows every answer down.
    ``port`` may be given before start so the receiver can "come up" where the dispatcher already points.
    """

    def __init__(self, secret: bytes = SECRET, port: int | None = None) -> None:
        self.secret = secret
        self.port = port or free_port()
        self.events: list[dict[str, Any]] = []
        self.requests = 0
        self.bad_signatures = 0
        self.script: list[int] = []
        self.headers: dict[int, dict[str, str]] = {}
        self.delay = 0.0
        self.last: tuple[bytes, str] | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook?token=abc"

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        header = request.headers.get(SIGNATURE_HEADER, "")
        self.requests += 1
        if not verify(self.secret, body, header):
            self.bad_signatures += 1
            return web.Response(status=401)
        doc = json.loads(body)
        assert request.headers[EVENT_ID_HEADER] == str(doc["id"])
        assert request.content_type == "application/json"
        self.last = (body, header)
        if self.delay:
            await asyncio.sleep(self.delay)
        status = self.script.pop(0) if self.script else 200
        if 200 <= status < 300:
            self.events.append(doc)
        return web.Response(status=status, headers=self.headers.get(status, {}))

    @property
    def ids(self) -> list[int]:
        return [int(e["id"]) for e in self.events]

    async def wait_for(self, pred: Callable[[], bool], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; received ids {self.ids}, {self.requests} requests")
            await asyncio.sleep(0.02)


def first_arrivals(ids: list[int]) -> list[int]:
    seen: set[int] = set()
    out = []
    for i in ids:
        if i not in seen:
            seen.add(i)
            out.append(i)
    return out


# -- fixtures and helpers --------------------------------------------------------------------------------


def make_config(tmp_path: Path, url: str, events: list[str] | None = None, secret: bytes = SECRET) -> Config:
    secret_file = tmp_path / "acme-hook.secret"
    secret_file.write_bytes(secret + b"\n")
    secret_file.chmod(0o600)
    hook: dict[str, Any] = {"url": url, "secret_file": str(secret_file)}
    if events is not None:
        hook["events"] = events
    return Config.model_validate(
        {
            "accounts": {
                "acme": {
                    "password_hash": PASSWORD_HASH,
                    "domains": ["acme.example.test"],
                    "webhooks": [hook],
                },
                "other": {"password_hash": PASSWORD_HASH, "domains": ["other.example.test"]},
            }
        }
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "relayd.db")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


def ev(kind: str, n: int, account: str | None = "acme", **kw: Any) -> Event:
    return Event(
        T0 + timedelta(seconds=n), kind, account, "news", f"r{n}@example.test", queue_id=f"Q{n}", **kw
    )


# -- signing and payload ---------------------------------------------------------------------------------


def test_sign_and_verify() -> None:
    body = b'{"id":1}'
    header = sign(SECRET, body, 1_767_268_800)
    assert header.startswith("t=1767268800,v1=")
    assert verify(SECRET, body, header, now=1_767_268_800 + 299)
    assert not verify(b"another secret", body, header, now=1_767_268_800)
    assert not verify(SECRET, body + b" ", header, now=1_767_268_800)  # body changed
    assert not verify(SECRET, body, header, now=1_767_268_800 + 301)  # too old: a replay
    assert not verify(SECRET, body, header, now=1_767_268_800 - 301)
    assert verify(SECRET, body, header, now=1_767_268_800 + 3000, tolerance=3600)
    # rotation: any one of several v1 values may match
    rotated = f"{sign(b'old', body, 1_767_268_800)},{header.split(',')[1]}"
    assert verify(SECRET, body, rotated, now=1_767_268_800)
    for bad in ["", "garbage", "t=abc,v1=00", "v1=00", "t=1767268800", "t=1,t=1767268800,v1=00", "t=١٢,v1=0"]:
        assert not verify(SECRET, body, bad, now=1_767_268_800), bad


def test_render_payload_fields_and_evidence() -> None:
    e = Event(
        T0, "hard_bounce", "acme", "news", "bob@example.test", "userunknown", "Q1", '{"status": "5.1.1"}'
    )
    doc = json.loads(render(42, e, "bounced"))
    assert doc == {
        "id": 42,
        "event": "bounced",
        "kind": "hard_bounce",
        "at": "2026-01-01T12:00:00Z",
        "account": "acme",
        "list": "news",
        "recipient": "bob@example.test",
        "reason": "userunknown",
        "queue_id": "Q1",
        "evidence": {"status": "5.1.1"},
    }
    assert json.loads(render(1, Event(T0, "delivered", evidence="not json"), "delivered"))["evidence"] == {
        "raw": "not json"
    }
    assert json.loads(render(1, Event(T0, "delivered", evidence="[1]"), "delivered"))["evidence"] == {
        "value": [1]
    }


def test_kind_table() -> None:
    bounced = {k for k, v in EVENT_NAMES.items() if v == "bounced"}
    assert bounced == {"bounced", "bounce", "hard_bounce", "soft_bounce"}
    assert {k for k, v in EVENT_NAMES.items() if v == "deferred"} == {"deferred", "delayed"}
    assert EVENT_NAMES["complaint"] == "complained" and EVENT_NAMES["suspended"] == "suspended"
    for kind in ("feedback", "unattributed", "autoreply", "complaint_duplicate", "reputation_warning"):
        assert kind not in EVENT_NAMES


# -- (1) delivery over a real store ----------------------------------------------------------------------


async def test_delivers_subscribed_events_once_in_order_signed(
    tmp_path: Path, store: SqliteStore, receiver: Receiver
) -> None:
    await store.record_events([ev("delivered", 0), ev("bounced", 1)])  # before the endpoint existed
    before = await store.max_event_id()
    cfg = make_config(tmp_path, receiver.url, events=["delivered", "bounced", "complained"])
    dispatcher = WebhookDispatcher(cfg, store, poll_interval=0.05)
    await dispatcher.start()
    try:
        assert await store.get_webhook_cursor(endpoint_key("acme", receiver.url)) == before
        await store.record_events(
            [
                ev("delivered", 10),
                ev("deferred", 11),  # not subscribed
                ev("hard_bounce", 12, reason="userunknown"),
                ev("delivered", 13, account="other"),  # another account
                ev("feedback", 14),  # unknown kind: never sent
            ]
        )
        for n in range(15, 40):
            await store.record_event(ev(["delivered", "complaint", "soft_bounce", "dropped"][n % 4], n))
        expected = [
            (i, e)
            for i, e in await store.events_after(before, "acme", 1000)
            if e.kind in ("delivered", "hard_bounce", "complaint", "soft_bounce")
        ]
        await receiver.wait_for(lambda: len(receiver.events) >= len(expected))
        await asyncio.sleep(0.3)  # nothing more comes
    finally:
        await dispatcher.stop()
    assert receiver.bad_signatures == 0
    assert receiver.ids == [i for i, _ in expected]  # once each, in order
    for doc, (i, e) in zip(receiver.events, expected, strict=True):
        assert doc["id"] == i and doc["kind"] == e.kind and doc["recipient"] == e.address
        assert doc["event"] == EVENT_NAMES[e.kind] and doc["account"] == "acme"
    assert await store.get_webhook_cursor(endpoint_key("acme", receiver.url)) == await store.max_event_id()
    # the captured request does not verify under another secret
    assert receiver.last is not None
    body, header = receiver.last
    assert verify(SECRET, body, header) and not verify(b"wrong-secret", body, header)


async def test_wrong_secret_is_refused_and_retried(tmp_path: Path, store: SqliteStore) -> None:
    """The receiver holds another secret: it answers 401 and the event is not counted as delivered."""
    receiver = await Receiver(secret=b"receiver-has-another-secret").start()
    cfg = make_config(tmp_path, receiver.url)
    dispatcher = WebhookDispatcher(cfg, store, poll_interval=0.05, retry_initial=0.05, retry_max=0.1)
    await dispatcher.start()
    try:
        await store.record_event(ev("delivered", 1))
        await receiver.wait_for(lambda: receiver.bad_signatures >= 3)
        assert receiver.events == []
        assert await store.get_webhook_cursor(endpoint_key("acme", receiver.url)) == 0
    finally:
        await dispatcher.stop()
        await receiver.stop()


# -- (2) failures: receiver down, non-2xx, backoff --------------------------------------------------------


async def test_receiver_down_retried_with_backoff_then_delivered(
    tmp_path: Path, store: SqliteStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Default backoff (1 s, 2 s ...): refused at 0 s and 1 s, the receiver is up by the try at 3 s."""
    caplog.set_level(logging.INFO, logger="relayd.edge.webhooks")
    receiver = Receiver()  # not started: connection refused
    cfg = make_config(tmp_path, receiver.url)
    dispatcher = WebhookDispatcher(cfg, store, poll_interval=0.05)
    await dispatcher.start()
    try:
        await store.record_events([ev("delivered", 1), ev("bounced", 2)])
        started = time.monotonic()
        await asyncio.sleep(1.6)
        assert receiver.requests == 0
        await receiver.start()
        await receiver.wait_for(lambda: len(receiver.events) == 2, timeout=10)
        elapsed = time.monotonic() - started
    finally:
        await dispatcher.stop()
        await receiver.stop()
    assert receiver.ids == [1, 2]
    assert 2.5 < elapsed < 6, elapsed
    warnings = [r.getMessage() for r in caplog.records if "not delivered" in r.getMessage()]
    assert len(warnings) == 2, warnings
    assert "attempt 1" in warnings[0] and "retrying in 1s" in warnings[0]
    assert "attempt 2" in warnings[1] and "retrying in 2s" in warnings[1]
    assert "token=abc" not in caplog.text  # the query (often a credential) stays out of the log
    assert any("delivered after 3 attempts" in r.getMessage() for r in caplog.records)


async def test_non_2xx_redirect_and_timeout_are_retried_in_order(
    tmp_path: Path, store: SqliteStore, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="relayd.edge.webhooks")
    receiver.script = [500, 302, 429, 503, 503, 200]
    receiver.headers[429] = {"Retry-After": "1"}
    receiver.headers[302] = {"Location": "http://127.0.0.1:9/elsewhere"}
    cfg = make_config(tmp_path, receiver.url)
    dispatcher = WebhookDispatcher(
        cfg, store, poll_interval=0.05, retry_initial=0.05, retry_max=0.5, timeout=0.3
    )
    await dispatcher.start()
    try:
        await store.record_events([ev("delivered", 1), ev("expired", 2), ev("complaint", 3)])
        await receiver.wait_for(lambda: len(receiver.events) == 3)
        # a receiver slower than the timeout: the POST is abandoned and retried, never skipped
        receiver.delay = 0.6
        await store.record_event(ev("unsubscribed", 4))
        assert await _wait_for_warning(caplog, "no answer within 0.3s")
        receiver.delay = 0.0
        await receiver.wait_for(lambda: 4 in receiver.ids)
    finally:
        await dispatcher.stop()
    assert first_arrivals(receiver.ids) == [1, 2, 3, 4]
    assert receiver.ids[:3] == [1, 2, 3]  # 2 and 3 waited behind 1's failures
    http = _warnings(caplog, "HTTP")
    assert [m.split("): ", 1)[1].split(";")[0] for m in http] == [
        "HTTP 500 Internal Server Error",
        "HTTP 302 Found",
        "HTTP 429 Too Many Requests",
        "HTTP 503 Service Unavailable",
        "HTTP 503 Service Unavailable",
    ]
    delays = [float(m.rsplit("retrying in ", 1)[1].rstrip("s")) for m in http]
    # doubled from 0.05, Retry-After (1 s) honoured up to retry_max, capped at retry_max
    assert delays == [0.05, 0.1, 0.5, 0.4, 0.5]


def _warnings(caplog: pytest.LogCaptureFixture, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if needle in r.getMessage()]


async def _wait_for_warning(caplog: pytest.LogCaptureFixture, needle: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not _warnings(caplog, needle):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


# -- (3) restarts ----------------------------------------------------------------------------------------


async def test_restart_resumes_from_cursor_nothing_lost(tmp_path: Path) -> None:
    """Stop while the receiver is down, record more, start a new store and dispatcher on the same file."""
    receiver = await Receiver().start()
    port = receiver.port
    cfg = make_config(tmp_path, receiver.url, events=["delivered"])
    store = SqliteStore(tmp_path / "relayd.db")
    await store.open()
    dispatcher = WebhookDispatcher(cfg, store, poll_interval=0.05, retry_initial=0.05, retry_max=0.1)
    await dispatcher.start()
    await store.record_events([ev("delivered", n) for n in range(1, 4)])
    await receiver.wait_for(lambda: len(receiver.events) == 3)
    await receiver.stop()
    await store.record_events([ev("delivered", n) for n in range(4, 6)])
    await store.record_event(ev("deferred", 6))  # not subscribed: scanned past, never sent
    await asyncio.sleep(0.3)  # the dispatcher is failing on event 4 now
    await dispatcher.stop()
    await dispatcher.stop()  # twice is fine
    await store.record_events([ev("delivered", n) for n in range(7, 9)])
    await store.close()

    receiver = await Receiver(port=port).start()
    store = SqliteStore(tmp_path / "relayd.db")
    await store.open()
    dispatcher = WebhookDispatcher(cfg, store, poll_interval=0.05, retry_initial=0.05)
    await dispatcher.start()
    try:
        await receiver.wait_for(lambda: len(receiver.events) == 4)
        await asyncio.sleep(0.2)
    finally:
        await dispatcher.stop()
        await store.close()
        await receiver.stop()
    assert receiver.ids == [4, 5, 7, 8]  # resumed at the cursor: nothing lost, nothing repeated


async def test_emptied_log_starts_over(tmp_path: Path, store: SqliteStore, receiver: Receiver) -> None:
    """SQLite reuses ids once every event is pruned; the dispatcher must not wait for the old id again."""
    cfg = make_config(tmp_path, receiver.url)
    dispatcher = WebhookDispatcher(cfg, store, poll_interval=0.05)
    await dispatcher.start()
    try:
        await store.record_events([ev("delivered", n) for n in range(1, 6)])
        await receiver.wait_for(lambda: len(receiver.events) == 5)
        await store.prune_events(T0 + timedelta(days=1))
        await asyncio.sleep(0.2)  # the dispatcher sees the log empty
        await store.record_event(ev("bounced", 99))
        await receiver.wait_for(lambda: len(receiver.events) == 6)
    finally:
        await dispatcher.stop()
    assert receiver.ids == [1, 2, 3, 4, 5, 1] and receiver.events[-1]["event"] == "bounced"


_DISPATCHER_PROCESS = textwrap.dedent(
    """
    import asyncio, signal, sys
    from pathlib import Path
    from relayd.config import load
    from relayd.store import SqliteStore
    from relayd.edge.webhooks import WebhookDispatcher

    async def main() -> None:
        cfg = load(sys.argv[1])
        store = SqliteStore(Path(sys.argv[2]))
        await store.open()
        dispatcher = WebhookDispatcher(cfg, store, poll_interval=0.05, retry_initial=0.05, retry_max=0.2)
        await dispatcher.start()
        print("started", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await dispatcher.stop()
        await store.close()

    asyncio.run(main())
    """
)


async def test_kill_9_and_restart_in_new_process_loses_nothing(tmp_path: Path, store: SqliteStore) -> None:
    """A dispatcher process killed mid-stream: the next process sends the rest; duplicates only at the cut."""
    receiver = await Receiver().start()
    receiver.delay = 0.03
    secret_file = tmp_path / "acme-hook.secret"
    secret_file.write_bytes(SECRET + b"\n")
    secret_file.chmod(0o600)
    config = tmp_path / "relayd.toml"
    config.write_text(
        f'[accounts.acme]\npassword_hash = "{PASSWORD_HASH}"\ndomains = ["acme.example.test"]\n'
        f'webhooks = [{{ url = "{receiver.url}", secret_file = "{secret_file}" }}]\n'
    )

    procs: list[subprocess.Popen[str]] = []

    def spawn() -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", _DISPATCHER_PROCESS, str(config), str(store.path)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()  # after start(): the cursor exists
        assert line.strip() == "started", line
        return proc

    try:
        proc = await asyncio.to_thread(spawn)
        await store.record_events([ev("delivered", n) for n in range(40)])
        await receiver.wait_for(lambda: len(receiver.events) >= 10)
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 10)
        got_before = len(receiver.events)
        await store.record_events([ev("soft_bounce", n) for n in range(40, 50)])
        proc = await asyncio.to_thread(spawn)
        await receiver.wait_for(lambda: len(set(receiver.ids)) == 50, timeout=30)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                await asyncio.to_thread(p.wait, 10)
            if p.stdout is not None:
                p.stdout.close()
        await receiver.stop()
    expected = [i for i, _ in await store.events_after(0, "acme", 1000)]
    assert first_arrivals(receiver.ids) == expected
    assert len(receiver.ids) - 50 <= 1, receiver.ids  # at most the one in flight at the kill
    assert got_before < 50 and receiver.bad_signatures == 0


# -- configuration problems ------------------------------------------------------------------------------


async def test_empty_secret_and_duplicate_endpoint_fail_start(tmp_path: Path, store: SqliteStore) -> None:
    cfg = make_config(tmp_path, "http://127.0.0.1:9/hook", secret=b"  ")
    with pytest.raises(ConfigError, match=r"accounts\.acme\.webhooks\[0\]\.secret_file: .* is empty"):
        await WebhookDispatcher(cfg, store).start()
    cfg = make_config(tmp_path, "http://127.0.0.1:9/hook")
    hooks = cfg.accounts["acme"].webhooks
    cfg.accounts["acme"].webhooks.append(hooks[0])
    with pytest.raises(ConfigError, match=r"webhooks\[1\]\.url: .* configured twice"):
        await WebhookDispatcher(cfg, store).start()
    assert await store.get_webhook_cursor(endpoint_key("acme", "http://127.0.0.1:9/hook")) is None


async def test_no_webhooks_configured_is_a_no_op(store: SqliteStore, tmp_path: Path) -> None:
    """Without endpoints start() starts no sender task and writes no cursor; events stay as they were."""
    await store.record_event(ev("delivered", 1))
    before = await store.max_event_id()
    dispatcher = WebhookDispatcher(Config.model_validate({}), store)
    await dispatcher.start()
    try:
        assert [t for t in asyncio.all_tasks() if t.get_name().startswith("webhook")] == []
        with contextlib.closing(sqlite3.connect(tmp_path / "relayd.db")) as db:
            assert db.execute("SELECT count(*) FROM webhook_cursor").fetchone() == (0,)
    finally:
        await dispatcher.stop()
    assert await store.max_event_id() == before == 1


# -- (4) end to end: relayd serve ------------------------------------------------------------------------


async def test_e2e_relayd_serve_posts_delivered_event(tmp_path: Path, sink: Sink) -> None:
    receiver = await Receiver().start()
    secret_file = tmp_path / "acme-hook.secret"
    secret_file.write_bytes(SECRET + b"\n")
    secret_file.chmod(0o600)
    accounts = f"""
[accounts.acme]
password_hash = "{PASSWORD_HASH}"
domains = ["acme.example.test"]
webhooks = [{{ url = "{receiver.url}", secret_file = "{secret_file}", events = ["delivered", "bounced"] }}]
"""
    relayd = Relayd(tmp_path, routes={"example.test": sink.port}, accounts=accounts)
    try:
        await asyncio.to_thread(relayd.start)
        code, _ = await asyncio.to_thread(relayd.submit, message(), to=["bob@example.test"])
        assert code == 250
        await receiver.wait_for(lambda: len(receiver.events) >= 1, timeout=30)
        assert await asyncio.to_thread(relayd.stop) == 0
    finally:
        relayd.kill()
        await receiver.stop()
    doc = receiver.events[0]
    assert doc["event"] == "delivered" and doc["account"] == "acme" and doc["recipient"] == "bob@example.test"
    assert receiver.bad_signatures == 0 and len(sink.messages) == 1


async def test_e2e_events_survive_a_daemon_restart_while_the_receiver_is_down(
    tmp_path: Path, sink: Sink
) -> None:
    """The receiver is down while relayd delivers, relayd is stopped and started again, then the receiver
    comes up: it gets every event (at least once), with a valid signature."""
    receiver = Receiver()  # its port is chosen, but nothing listens there yet
    secret_file = tmp_path / "acme-hook.secret"
    secret_file.write_bytes(SECRET + b"\n")
    secret_file.chmod(0o600)
    accounts = f"""
[accounts.acme]
password_hash = "{PASSWORD_HASH}"
domains = ["acme.example.test"]
webhooks = [{{ url = "{receiver.url}", secret_file = "{secret_file}", events = ["delivered"] }}]
"""
    relayd = Relayd(tmp_path, routes={"example.test": sink.port}, accounts=accounts)
    try:
        await asyncio.to_thread(relayd.start)
        for rcpt in ("one@example.test", "two@example.test"):
            code, _ = await asyncio.to_thread(relayd.submit, message(), to=[rcpt])
            assert code == 250
        await asyncio.to_thread(lambda: wait_until(lambda: len(sink.messages) == 2))
        assert await asyncio.to_thread(relayd.stop) == 0  # events recorded, none delivered yet
        await asyncio.to_thread(relayd.start)
        code, _ = await asyncio.to_thread(relayd.submit, message(), to=["three@example.test"])
        assert code == 250
        await receiver.start()
        await receiver.wait_for(lambda: len({e["recipient"] for e in receiver.events}) >= 3, timeout=60)
    finally:
        relayd.kill()
        await receiver.stop()
    assert {e["recipient"] for e in receiver.events} == {
        "one@example.test",
        "two@example.test",
        "three@example.test",
    }
    assert {e["event"] for e in receiver.events} == {"delivered"}
    assert receiver.bad_signatures == 0
