"""The copies of one message to one domain go out one after another under one lane and one connection
(relayd.queue.scheduler ``_attempt_copies``), and each is still an attempt of its own: own transaction, own
VERP return path, own outcome; a refusal or a slow-down reply for one copy neither loses nor repeats another.
A real relayd delivers to an aiosmtpd sink on 127.0.0.1 that records which connection each transaction
came on."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP as AioSMTP
from aiosmtpd.smtp import Envelope, Session

from relayd.core.tokens import verify_token, verp_token
from tests.harness import Relayd, Sink, SinkHandler, message, wait_until


@dataclass
class ConnectionLog(SinkHandler):
    """A sink handler that also notes, per delivered transaction, the client's (address, port)."""

    peers: list[tuple[str, tuple[str, int]]] = field(default_factory=list)
    peer_lock: threading.Lock = field(default_factory=threading.Lock)
    pipelining: bool = False

    async def handle_EHLO(
        self, server: AioSMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        """aiosmtpd reads the commands a client sends ahead in order, but does not say it may: this says
        it when ``pipelining``, so that relayd sends the next copy's commands behind a copy's content."""
        session.host_name = hostname
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_DATA(self, server: AioSMTP, session: Session, envelope: Envelope) -> str:
        with self.peer_lock:
            self.peers.extend((rcpt, tuple(session.peer)) for rcpt in envelope.rcpt_tos)  # type: ignore[misc]
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture(params=[False, True], ids=["one-by-one", "pipelined"])
def pipelining(request: pytest.FixtureRequest) -> bool:
    """Each test with a server that does not offer PIPELINING and with one that does (the next copy's
    MAIL, RCPT and DATA then go behind a copy's content, relayd.queue.transport.client ``Next``)."""
    return bool(request.param)


def _sink(pipelining: bool) -> Sink:
    sink = Sink()
    sink.handler = ConnectionLog(pipelining=pipelining)
    sink.controller.handler = sink.handler
    return sink


def _secret(tmp: Path) -> bytes:
    return bytes.fromhex((tmp / "secret.key").read_text().strip())


RCPTS = [f"user{i}@example.test" for i in range(6)]


def test_copies_of_one_message_go_out_on_one_connection_each_its_own_transaction(
    tmp_path: Path, pipelining: bool
) -> None:
    with _sink(pipelining) as sink, Relayd(tmp_path, routes={"example.test": sink.port}) as relayd:
        code, _ = relayd.submit(message(), to=RCPTS)
        assert code == 250
        assert wait_until(lambda: sink.handler.count() == len(RCPTS))
    handler = sink.handler
    assert isinstance(handler, ConnectionLog)
    assert sorted(rcpt for rcpt, _ in handler.peers) == RCPTS, "one transaction per recipient, none twice"
    assert len({peer for _, peer in handler.peers}) == 1, "the copies shared one connection"
    assert all(len(m.rcpt_tos) == 1 for m in sink.messages)
    for m in sink.messages:  # each its own VERP return path, valid for its own recipient only
        token = verp_token(m.mail_from)
        assert token is not None
        assert verify_token(_secret(tmp_path), "verp", token, m.rcpt_tos[0]) is not None
    assert len({m.mail_from for m in sink.messages}) == len(RCPTS)
    assert len({m.data for m in sink.messages}) == len(RCPTS), "each copy is personal"


def test_a_refused_copy_fails_alone_and_the_others_are_delivered_once(
    tmp_path: Path, pipelining: bool
) -> None:
    with _sink(pipelining) as sink, Relayd(tmp_path, routes={"example.test": sink.port}) as relayd:
        sink.handler.script[RCPTS[2]] = ["550 5.1.1 no such user"]
        code, _ = relayd.submit(message(), to=RCPTS)
        assert code == 250
        assert wait_until(lambda: sink.handler.count() == len(RCPTS) - 1)
        # a few scans later: the refused one was not tried again, nothing was sent twice
        assert not wait_until(lambda: sink.handler.attempts.get(RCPTS[2], 0) > 1, timeout=1.5)
        log = relayd.log_text()
    assert sorted(r for m in sink.messages for r in m.rcpt_tos) == sorted(set(RCPTS) - {RCPTS[2]})
    assert sink.handler.attempts[RCPTS[2]] == 1
    assert f"to=<{RCPTS[2]}> account=acme status=bounced" in log
    assert log.count("status=delivered") == len(RCPTS) - 1


def test_a_slow_down_reply_sends_the_rest_one_by_one_and_loses_none(tmp_path: Path, pipelining: bool) -> None:
    with _sink(pipelining) as sink, Relayd(tmp_path, routes={"example.test": sink.port}) as relayd:
        # the second copy is told to slow down once, then accepted on its retry
        sink.handler.script[RCPTS[1]] = ["451 4.7.0 Too many messages, try again later", "250 ok"]
        code, _ = relayd.submit(message(), to=RCPTS)
        assert code == 250
        assert wait_until(lambda: sink.handler.count() == len(RCPTS), timeout=60)
        log = relayd.log_text()
    assert sorted(r for m in sink.messages for r in m.rcpt_tos) == RCPTS, "each delivered exactly once"
    assert sink.handler.attempts[RCPTS[1]] == 2
    assert all(sink.handler.attempts[r] == 1 for r in RCPTS if r != RCPTS[1])
    assert "asked to slow down" in log
