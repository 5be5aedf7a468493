"""Dedicated IPs: an account's pool decides the source address and EHLO name of its connections.

Loopback aliases 127.0.0.2 and 127.0.0.3 need no setup on Linux (all of 127/8 is local), so the sink sees
real source addresses.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as AioSMTP
from aiosmtpd.smtp import Envelope, Session
from pydantic import ValidationError

from relayd.config import Config
from tests.harness import PASSWORD, PASSWORD_HASH, Relayd, cli_json, free_port, message, wait_until

ACCOUNTS = f"""
[accounts.acme]
password_hash = "{PASSWORD_HASH}"
domains = ["acme.example.test"]
pool = "dedicated"

[accounts.other]
password_hash = "{PASSWORD_HASH}"
domains = ["other.example.test"]

[pools.dedicated]
addresses = ["127.0.0.2", "127.0.0.3"]
helo = "pool.relayd.test"
helos = {{ "127.0.0.3" = "three.relayd.test" }}
"""

BLOCK = "550 5.7.1 Service unavailable; client host [127.0.0.2] blocked using Spamhaus"


@dataclass
class Seen:
    peer: str
    helo: str
    rcpt: str
    reply: str


@dataclass
class PeerHandler:
    """Records source address and EHLO name of every RCPT; refuses RCPTs from ``blocked`` peers."""

    blocked: set[str] = field(default_factory=set)
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_RCPT(
        self, server: AioSMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        peer = str(session.peer[0]) if isinstance(session.peer, tuple) else str(session.peer)
        reply = BLOCK if peer in self.blocked else "250 2.1.5 OK"
        with self.lock:
            self.seen.append(Seen(peer, str(session.host_name), address, reply))
        if reply.startswith("250"):
            envelope.rcpt_tos.append(address)
        return reply

    def delivered(self) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if s.reply.startswith("250")]

    def all(self) -> list[Seen]:
        with self.lock:
            return list(self.seen)


@pytest.fixture
def peers() -> Iterator[tuple[PeerHandler, int]]:
    handler = PeerHandler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


def _submit_many(relayd: Relayd, user: str, n: int, prefix: str) -> None:
    """One session, ``n`` transactions of one recipient each."""
    with relayd.smtp() as s:
        s.login(user, PASSWORD)
        for i in range(n):
            s.mail(f"app@{user}.example.test")
            s.rcpt(f"{prefix}{i}@example.test")
            code, resp = s.data(message(f"{prefix} {i}", sender=f"app@{user}.example.test"))
            assert code == 250, resp


def test_pool_account_sends_from_its_addresses_round_robin_others_from_the_default(
    tmp_path: Path, peers: tuple[PeerHandler, int]
) -> None:
    handler, port = peers
    with Relayd(tmp_path, routes={"example.test": port}, accounts=ACCOUNTS) as relayd:
        _submit_many(relayd, "acme", 8, "pooled")
        _submit_many(relayd, "other", 4, "plain")
        assert wait_until(lambda: len(handler.delivered()) == 12)
    pooled = [s for s in handler.delivered() if s.rcpt.startswith("pooled")]
    plain = [s for s in handler.delivered() if s.rcpt.startswith("plain")]
    assert {s.peer for s in pooled} == {"127.0.0.2", "127.0.0.3"}  # only the pool, and both of it
    assert sum(s.peer == "127.0.0.2" for s in pooled) == 4  # round-robin
    assert {s.peer for s in plain} == {"127.0.0.1"}
    helos = {s.peer: s.helo for s in handler.delivered()}
    assert helos == {
        "127.0.0.2": "pool.relayd.test",
        "127.0.0.3": "three.relayd.test",
        "127.0.0.1": "relayd.test",
    }


def test_block_reply_suspends_that_address_for_the_destination_and_mail_goes_out_through_the_other(
    tmp_path: Path, peers: tuple[PeerHandler, int]
) -> None:
    handler, port = peers
    handler.blocked.add("127.0.0.2")
    with Relayd(tmp_path, routes={"example.test": port}, accounts=ACCOUNTS) as relayd:
        _submit_many(relayd, "acme", 1, "first")
        # the first attempt leaves from 127.0.0.2 (first of the pool), is refused, and is retried -- not
        # bounced: a block list reply is about our address, not the recipient
        assert wait_until(lambda: len(handler.delivered()) == 1)
        assert [(s.peer, s.reply[:3]) for s in handler.all()] == [("127.0.0.2", "550"), ("127.0.0.3", "250")]
        _submit_many(relayd, "acme", 6, "later")
        assert wait_until(lambda: len(handler.delivered()) == 7)
        events = cli_json(relayd, "events", "--since", "1h", "--kind", "ip_suspended")
    assert all(s.peer == "127.0.0.3" for s in handler.all()[2:])  # the suspended address stays quiet
    assert len(events) == 1
    assert "127.0.0.2 suspended for 127.0.0.1:" in events[0]["evidence"]["reply"]
    assert "Spamhaus" in events[0]["evidence"]["reply"]
    assert events[0]["account"] == "acme"


@pytest.mark.parametrize(
    ("pool", "problem"),
    [
        ({"addresses": ["mta.example.test"]}, "not an IP address"),
        ({"addresses": ["192.0.2.1", "192.0.2.1"]}, "listed twice"),
        ({"addresses": ["192.0.2.1"], "helos": {"192.0.2.2": "x.example.test"}}, "not one of this pool"),
        ({"addresses": []}, "at least 1"),
    ],
    ids=["hostname", "duplicate", "helo-for-unknown-address", "empty"],
)
def test_pool_config_problems(pool: dict[str, object], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        Config.model_validate({"pools": {"p": pool}})


def test_pool_sources_carry_per_address_helo() -> None:
    cfg = Config.model_validate(
        {
            "pools": {
                "p": {"addresses": ["192.0.2.1", "2001:db8::1"], "helo": "a", "helos": {"2001:db8::1": "b"}}
            }
        }
    )
    assert cfg.pools["p"].sources() == [("192.0.2.1", "a"), ("2001:db8::1", "b")]
