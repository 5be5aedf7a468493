"""How a message just committed to the queue reaches delivery.

In one process (``workers = 1``) the submission hands the message to the scheduler from memory, bytes and
rewritten template included (:class:`LocalHandoff`).

With several workers each queue shard has two processes: one accepts mail (listeners, policy, the commit,
the ``250``), one delivers it (render, DKIM, SMTP), the second at a lower CPU priority (``[server]
delivery_nice``). Why: on a busy machine a ``250`` used to wait behind the delivery work on the same event
loop (ten RSA signatures and ten SMTP transactions for a message to ten recipients), so its latency grew
with the delivery backlog; in processes of their own the kernel runs the accepting side first, and
delivery uses the CPU that is left (Postfix separates ``smtpd`` from ``qmgr``/``smtp`` the same way).

After the commit the submission process sends the delivery process one datagram (:class:`Announcer`) with
the message and its rewritten template, so delivery neither reads it back nor rewrites it again; the
delivery process asks the queue which of its recipients are still queued and starts those
(:class:`Receiver`, :meth:`relayd.queue.scheduler.Scheduler.arrived`). The datagram is a shortcut, not the
record: the message is on disk before it is sent. A message too big for one datagram goes by queue id
alone (delivery reads and rewrites it from the queue), and one that finds the channel full (delivery far
behind, or restarting) is left to the queue scan (``[queue] scan_interval``).

The channel is a ``socketpair`` the supervisor makes per shard before it forks: only relayd's own
processes hold its ends, which is why the receiving side may unpickle what it reads. The supervisor keeps
both ends open, so a delivery process that restarts finds what was sent meanwhile, whole datagrams only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import pickle
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from relayd.queue.store import NewMessage, StoredData

if TYPE_CHECKING:
    from relayd.policy.render import Prepared, Renderer
    from relayd.queue.scheduler import Scheduler

log = logging.getLogger(__name__)

#: above this a message goes by queue id only (a unix datagram must fit the socket's send buffer)
MAX_DATAGRAM = 64 * 1024
#: what the announcer holds in memory while the channel is full (~350 messages of 5 KB with their
#: templates); past it the queue scan takes over. It counts in the submission process's RSS.
_MAX_PENDING = 4 * 1024 * 1024
#: how often a paused receiver looks whether the active window has room again
_RESUME_CHECK = 0.05


class Handoff(Protocol):
    """What the submission listener calls around the commit of a message."""

    #: whether :meth:`submitted` keeps the message's bytes (one process: delivery starts from them), so the
    #: listener hands them over joined (``NewMessage.head`` empty); else it leaves our ``Received`` field in
    #: ``head`` and the queue writes both without a copy of the message to join them
    keeps_bytes: bool

    def expect(self, queue_id: str, prepared: Prepared | None, uses: int) -> None:
        """Before the commit: ``queue_id`` is being committed, rewritten as ``prepared``."""

    def forget(self, queue_id: str) -> None:
        """The commit failed: nothing to deliver."""

    def submitted(self, msg: NewMessage, created_at: float) -> None:
        """After the commit (the message is on disk): start its deliveries."""


class LocalHandoff:
    """One process: the scheduler and the renderer are ours; the message goes over from memory."""

    keeps_bytes = True

    def __init__(self, scheduler: Scheduler, renderer: Renderer) -> None:
        self.scheduler = scheduler
        self.renderer = renderer

    def expect(self, queue_id: str, prepared: Prepared | None, uses: int) -> None:
        if prepared is not None:
            # before the commit: should an attempt start before the submission is back (a scan), it finds
            # the message rewritten already
            self.renderer.keep(queue_id, prepared, uses)
        self.scheduler.expect(queue_id)

    def forget(self, queue_id: str) -> None:
        # not handed over: if it was committed after all (cancelled while the commit ran), the scan
        # delivers it from disk
        self.scheduler.forget(queue_id)
        self.renderer.forget(queue_id)

    def submitted(self, msg: NewMessage, created_at: float) -> None:
        if msg.head:  # not from the listener, which joins them for us (keeps_bytes)
            msg = dataclasses.replace(msg, data=msg.head + msg.data, head=b"")
        self.scheduler.submitted(msg, created_at)


@dataclass(frozen=True, slots=True)
class Handed:
    """One datagram: a committed message, with its bytes and template when they fit."""

    queue_id: str
    uses: int  # recipients
    stored: StoredData | None = None
    prepared: Prepared | None = None


def channel() -> tuple[socket.socket, socket.socket]:
    """The (submission end, delivery end) of one shard's channel; made by the supervisor before it forks."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)


class Announcer:
    """The submission process's end: one datagram per committed message, never waiting for delivery."""

    #: a big message goes by queue id alone: delivery reads it from the queue
    keeps_bytes = False

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        sock.setblocking(False)
        self._prepared: dict[str, Prepared] = {}
        self._pending: collections.deque[bytes] = collections.deque()
        self._pending_bytes = 0
        self._writer_on = False
        self._dropped = 0

    def expect(self, queue_id: str, prepared: Prepared | None, uses: int) -> None:
        if prepared is not None:
            self._prepared[queue_id] = prepared

    def forget(self, queue_id: str) -> None:
        self._prepared.pop(queue_id, None)

    def submitted(self, msg: NewMessage, created_at: float) -> None:
        n = len(msg.recipients)
        prepared = self._prepared.pop(msg.queue_id, None)
        payload = b""
        if msg.size <= MAX_DATAGRAM:  # a big message is not pickled at all only to be found too big
            whole = Handed(msg.queue_id, n, StoredData(msg.head + msg.data, msg.render), prepared)
            payload = pickle.dumps(whole, protocol=pickle.HIGHEST_PROTOCOL)
        if not payload or len(payload) > MAX_DATAGRAM:
            payload = pickle.dumps(Handed(msg.queue_id, n), protocol=pickle.HIGHEST_PROTOCOL)
        if not self._pending and self._send(payload):
            return
        if self._pending_bytes + len(payload) > _MAX_PENDING:
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 1000 == 0:
                log.info("delivery process far behind: %d message(s) left to the queue scan", self._dropped)
            return
        self._pending.append(payload)
        self._pending_bytes += len(payload)
        if not self._writer_on:
            asyncio.get_running_loop().add_writer(self._sock.fileno(), self._flush)
            self._writer_on = True

    def _send(self, payload: bytes) -> bool:
        """True once sent (or refused for good: the queue scan has it); False while the channel is full."""
        try:
            self._sock.send(payload)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            log.warning("handing a message to delivery failed (%s); the queue scan starts it", exc)
        return True

    def _flush(self) -> None:
        while self._pending:
            if not self._send(self._pending[0]):
                return
            self._pending_bytes -= len(self._pending.popleft())
        asyncio.get_running_loop().remove_writer(self._sock.fileno())
        self._writer_on = False

    def close(self) -> None:
        if self._writer_on:
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().remove_writer(self._sock.fileno())
        self._sock.close()


class Receiver:
    """The delivery process's end: reads every datagram waiting and starts those messages together.

    It reads only while the scheduler's active window has room. Read regardless, a delivery process far
    behind its submission process held every message announced meanwhile, bytes and template, until its
    turn: 130 MB of RSS per delivery process after 20,000 messages of bench/e2e.py's profile A, growing
    with the backlog. Paused, the channel fills, the announcer keeps at most ``_MAX_PENDING`` and leaves
    the rest to the queue scan, which reads each message from disk when the window has room for it.
    """

    def __init__(self, sock: socket.socket, scheduler: Scheduler, renderer: Renderer) -> None:
        self._sock = sock
        self._scheduler = scheduler
        self._renderer = renderer
        self._tasks: set[asyncio.Task[None]] = set()
        self._paused: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._sock.setblocking(False)
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self._readable)

    @property
    def paused(self) -> bool:
        """Not reading: the active window is full."""
        return self._paused is not None

    def _pause(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._sock.fileno())
        self._scheduler.note_backlog()  # what the announcer gives up meanwhile, the scan finds
        self._paused = loop.call_later(_RESUME_CHECK, self._resume)

    def _resume(self) -> None:
        loop = asyncio.get_running_loop()
        if self._scheduler.has_room():
            self._paused = None
            loop.add_reader(self._sock.fileno(), self._readable)
        else:
            self._paused = loop.call_later(_RESUME_CHECK, self._resume)

    def _readable(self) -> None:
        if not self._scheduler.has_room():
            self._pause()
            return
        handed: list[Handed] = []
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while len(handed) < 256:
                item = pickle.loads(self._sock.recv(MAX_DATAGRAM + 4096))  # only our processes write here
                if isinstance(item, Handed):
                    handed.append(item)
        if not handed:
            return
        for item in handed:
            if item.prepared is not None:
                self._renderer.keep(item.queue_id, item.prepared, item.uses)
        task = asyncio.create_task(self._scheduler.arrived([(h.queue_id, h.stored) for h in handed]))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None
        with contextlib.suppress(ValueError, RuntimeError):
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
