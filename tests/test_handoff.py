"""The hand-off between a shard's submission and delivery processes, and the write lock they share.

Real parts: the socketpair the supervisor makes, a real queue (SQLite), the real scheduler, renderer and
SMTP client delivering to an aiosmtpd sink on loopback. The whole path with two real processes per shard
is in tests/test_operations.py and tests/test_crash_safety.py."""

from __future__ import annotations

import asyncio
import logging
import pickle
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from relayd import config as config_mod
from relayd.core.tokens import new_queue_id
from relayd.mail.dkim import Signer
from relayd.policy.render import Renderer, prepare_message, read_meta
from relayd.queue.handoff import MAX_DATAGRAM, Announcer, Receiver, channel
from relayd.queue.scheduler import Scheduler
from relayd.queue.store import NewMessage, QueueStore, State, StoredData
from tests.harness import Sink, config_text, free_port, message

SECRET = b"k" * 32


async def eventually(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


@dataclass
class Shard:
    cfg: config_mod.Config
    queue: QueueStore
    announcer: Announcer
    renderer: Renderer


@pytest.fixture
async def shard(tmp_path: Path, sink: Sink) -> AsyncIterator[Shard]:
    """A submission end (announcer) and a delivery end (receiver, scheduler) on one queue file."""
    path = tmp_path / "relayd.toml"
    path.write_text(config_text(tmp_path, port=free_port(), routes={"example.test": sink.port}))
    cfg = config_mod.load(path)
    queue = QueueStore(tmp_path / "queue.db")
    await queue.open()
    renderer = Renderer(cfg, SECRET, Signer([]))
    scheduler = Scheduler(cfg, queue, SECRET, renderer=renderer)
    submission_end, delivery_end = channel()
    receiver = Receiver(delivery_end, scheduler, renderer)
    receiver.start()
    announcer = Announcer(submission_end)
    try:
        yield Shard(cfg, queue, announcer, renderer)
    finally:
        announcer.close()
        await receiver.close()
        await scheduler.stop()
        await queue.close()
        delivery_end.close()


async def _commit(shard: Shard, raw: bytes, recipients: tuple[str, ...], imprint: str) -> NewMessage:
    """What the submission process does: rewrite (here with ``imprint``), commit, announce."""
    qid = new_queue_id()
    msg = NewMessage(
        qid, "acme", "app@acme.example.test", recipients, b"Received: test\r\n" + raw, render=True
    )
    acme = shard.cfg.accounts["acme"].model_copy(update={"imprint": imprint})
    cfg = shard.cfg.model_copy(update={"accounts": {**shard.cfg.accounts, "acme": acme}})
    prepared = prepare_message(cfg, Signer([]), "acme", read_meta(raw), raw)
    shard.announcer.expect(qid, prepared, len(recipients))
    await shard.queue.enqueue(msg)
    return msg


async def test_a_handed_message_is_delivered_from_the_template_it_came_with(shard: Shard, sink: Sink) -> None:
    msg = await _commit(shard, message("handed over"), ("a@example.test", "b@example.test"), "HANDED IMPRINT")
    shard.announcer.submitted(msg, time.time())
    assert await eventually(lambda: sink.handler.count() == 2)
    for got in sink.messages:
        # the template that came over the channel, not one made again from disk (that would carry the
        # imprint of the config: "ACME Ltd, 1 Test Street")
        assert b"HANDED IMPRINT" in got.data and b"ACME Ltd" not in got.data
    assert {m.rcpt_tos[0] for m in sink.messages} == {"a@example.test", "b@example.test"}


async def test_only_recipients_still_queued_are_started(shard: Shard, sink: Sink) -> None:
    """A datagram read late (the delivery process restarted and its scan already delivered some) starts
    only what the queue still has queued."""
    msg = await _commit(shard, message("late"), ("a@example.test", "b@example.test", "c@example.test"), "X")
    await shard.queue.finish(msg.queue_id, 1, State.DELIVERED, "250 ok", 1)
    shard.announcer.submitted(msg, time.time())
    assert await eventually(lambda: sink.handler.count() == 2)
    await asyncio.sleep(0.3)
    assert sorted(m.rcpt_tos[0] for m in sink.messages) == ["a@example.test", "c@example.test"]


async def test_a_message_too_big_for_a_datagram_goes_by_queue_id_and_is_read_from_disk(
    shard: Shard, sink: Sink
) -> None:
    body = "".join(f"line {i} of a long newsletter\r\n" for i in range(4000))
    assert len(body) > MAX_DATAGRAM
    msg = await _commit(shard, message("big", body), ("a@example.test",), "HANDED IMPRINT")
    shard.announcer.submitted(msg, time.time())
    assert await eventually(lambda: sink.handler.count() == 1)
    got = sink.messages[0].data
    assert b"line 3999 of a long newsletter" in got
    assert b"ACME Ltd, 1 Test Street" in got  # rewritten again from disk with the config's imprint


async def test_a_full_window_pauses_reading_and_every_message_still_goes_out(
    tmp_path: Path, sink: Sink
) -> None:
    """A slow destination fills the active window: the receiver stops reading the channel (the messages
    announced meanwhile stay in the socket, the announcer or on disk, not in the delivery process) and
    resumes when there is room; nothing is left behind, though the periodic scan is 10 minutes away."""
    accept = sink.handler.handle_DATA

    async def slow(server: object, session: object, envelope: object) -> str:
        await asyncio.sleep(0.1)
        return await accept(server, session, envelope)  # type: ignore[arg-type]

    sink.handler.handle_DATA = slow  # type: ignore[method-assign]
    path = tmp_path / "relayd.toml"
    path.write_text(config_text(tmp_path, port=free_port(), routes={"example.test": sink.port}))
    cfg = config_mod.load(path)
    cfg = cfg.model_copy(
        update={"queue": cfg.queue.model_copy(update={"active_limit": 2, "scan_interval": 600.0})}
    )
    queue = QueueStore(tmp_path / "queue.db")
    await queue.open()
    renderer = Renderer(cfg, SECRET, Signer([]))
    scheduler = Scheduler(cfg, queue, SECRET, renderer=renderer)
    scheduler.start()  # as in a delivery process: its scan starts what the channel did not bring
    submission_end, delivery_end = channel()
    receiver = Receiver(delivery_end, scheduler, renderer)
    receiver.start()
    shard = Shard(cfg, queue, Announcer(submission_end), renderer)
    sent = 12
    try:
        paused = False
        for i in range(sent):
            msg = await _commit(shard, message(f"m{i}"), (f"r{i}@example.test",), "HANDED")
            shard.announcer.submitted(msg, time.time())
            await asyncio.sleep(0.02)
            paused |= receiver.paused
            assert scheduler.in_flight <= 2
        assert paused
        assert await eventually(lambda: sink.handler.count() == sent, timeout=30)
        assert sorted(m.rcpt_tos[0] for m in sink.messages) == sorted(
            f"r{i}@example.test" for i in range(sent)
        )
        assert await eventually(lambda: not receiver.paused)
    finally:
        shard.announcer.close()
        await receiver.close()
        await scheduler.stop()
        await queue.close()
        delivery_end.close()


async def test_a_full_channel_buffers_a_bounded_amount_then_leaves_messages_to_the_scan(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The delivery process is far behind (here: not reading at all): the announcer never blocks the
    submission, keeps at most a few MB, and drops the rest (on disk already; the scan starts them)."""
    caplog.set_level(logging.INFO, logger="relayd.queue.handoff")
    submission_end, delivery_end = channel()
    announcer = Announcer(submission_end)
    body = b"x" * 40_000
    sent = 200  # ~8 MB of datagrams: more than the kernel buffer and the announcer's limit together
    try:
        for i in range(sent):
            msg = NewMessage(f"Q{i:04d}", "acme", "a@acme.test", ("b@x.test",), body, render=False)
            announcer.submitted(msg, time.time())
        assert "left to the queue scan" in caplog.text
        delivery_end.setblocking(False)
        got: list[str] = []
        idle_since = time.monotonic()
        while time.monotonic() - idle_since < 0.5:  # read as a late delivery process would
            try:
                got.append(pickle.loads(delivery_end.recv(MAX_DATAGRAM + 4096)).queue_id)
                idle_since = time.monotonic()
            except BlockingIOError:
                await asyncio.sleep(0.01)  # the announcer's writer callback flushes what it held
        assert 0 < len(got) < sent
        assert got == sorted(got)  # in order, no gaps before the drops began
        assert got == [f"Q{i:04d}" for i in range(len(got))]
    finally:
        announcer.close()
        delivery_end.close()


class _HeldRead(QueueStore):
    """A queue whose read of a message's data waits until the test lets it go (a big message's read)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.reading = asyncio.Event()
        self.release = asyncio.Event()

    async def message_data(self, queue_id: str) -> StoredData | None:
        self.reading.set()
        await self.release.wait()
        return await super().message_data(queue_id)


async def test_a_scan_while_an_announced_message_is_read_does_not_send_it_twice(
    tmp_path: Path, sink: Sink
) -> None:
    """A message that came by queue id alone is read from disk before its recipients are started; a scan
    that runs meanwhile finds them still queued and not in flight. It leaves them to the read (as it does
    a message the submission is about to commit): each recipient gets one copy, not one from each."""
    path = tmp_path / "relayd.toml"
    path.write_text(config_text(tmp_path, port=free_port(), routes={"example.test": sink.port}))
    cfg = config_mod.load(path)
    cfg = cfg.model_copy(update={"queue": cfg.queue.model_copy(update={"scan_interval": 0.05})})
    queue = _HeldRead(tmp_path / "queue.db")
    await queue.open()
    scheduler = Scheduler(cfg, queue, SECRET, renderer=Renderer(cfg, SECRET, Signer([])))
    try:
        raw = message("read while a scan runs")
        msg = NewMessage(new_queue_id(), "acme", "app@acme.example.test", ("a@example.test",), raw)
        await queue.enqueue(msg)
        arrival = asyncio.create_task(scheduler.arrived([(msg.queue_id, None)]))
        await asyncio.wait_for(queue.reading.wait(), 10)
        scheduler.start()  # the scans begin while the read is held
        await asyncio.sleep(0.5)  # ten scans' worth
        assert sink.handler.count() == 0, "a scan started the recipient the read is for"
        queue.release.set()
        await arrival
        assert await eventually(lambda: sink.handler.count() == 1)
        await asyncio.sleep(0.5)  # and no second copy comes from a scan
        assert sink.handler.count() == 1
    finally:
        await scheduler.stop()
        await queue.close()
