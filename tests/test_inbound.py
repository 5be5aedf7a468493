"""The inbound listener over real sockets on 127.0.0.1: relay control, the null sender, size limit, no AUTH,
and the whole loop submit -> bounce/complaint -> the next RCPT refused.

Until the daemon starts the inbound listener, the server here is our protocol factory on
``loop.create_server`` (exactly what :func:`relayd.edge.smtp.inbound.start_inbound` binds), driven by smtplib
in
a thread; the submission side is the real submission listener with the real policy pipeline.
"""

from __future__ import annotations

import asyncio
import smtplib
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from relayd.config import Config
from relayd.core.errors import StorageError
from relayd.core.models import DueRecipient
from relayd.core.tokens import make_token, new_queue_id, verp_address
from relayd.edge.smtp.inbound import InboundHandler, inbound_protocol, role_of, start_inbound
from relayd.edge.smtp.limits import ConnectionLimits
from relayd.edge.smtp.submission import SubmissionHandler, start_submission
from relayd.mail.dkim import Signer
from relayd.policy.pipeline import Pipeline
from relayd.policy.rules.suspension import AccountGate
from relayd.queue.store import NewMessage, QueueStore
from relayd.store import Reason, Scope, SqliteStore
from tests.test_feedback import CORPUS, INBOUND, SECRET, arf_report, corpus, dsn_report, make_config


class NoDelivery:
    """Stands in for the scheduler: these tests look at what is queued, not at delivery."""

    keeps_bytes = False

    def expect(self, queue_id: str, prepared: object, uses: int) -> None:
        pass

    def forget(self, queue_id: str) -> None:
        pass

    def submitted(self, msg: NewMessage, created_at: float) -> None:
        pass


@dataclass
class Live:
    cfg: Config
    store: SqliteStore
    queue: QueueStore
    handler: InboundHandler
    inbound_port: int
    submission_port: int
    pipeline: Pipeline

    async def inbound(self, fn: Callable[[smtplib.SMTP], Any]) -> Any:
        def run() -> Any:
            with smtplib.SMTP("127.0.0.1", self.inbound_port, timeout=30) as s:
                s.ehlo("mx.remote.example")
                return fn(s)

        return await asyncio.to_thread(run)

    async def send_report(self, rcpt: str, raw: bytes, sender: str = "") -> tuple[int, bytes]:
        """MAIL FROM:<sender> (null by default), one RCPT, DATA; the DATA reply (or the RCPT refusal).
        Line ends become CRLF as on the wire (the corpus is stored with LF)."""
        raw = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")

        def fn(s: smtplib.SMTP) -> tuple[int, bytes]:
            code, msg = s.mail(sender)
            assert code == 250, msg
            code, msg = s.rcpt(rcpt)
            if code != 250:
                return code, msg
            return s.data(raw)

        result: tuple[int, bytes] = await self.inbound(fn)
        return result

    async def submit(self, rcpt: str) -> tuple[int, bytes, str | None]:
        """Submit one message as account acme (network-mapped); the RCPT reply and the queue id."""

        def run() -> tuple[int, bytes, str | None]:
            with smtplib.SMTP("127.0.0.1", self.submission_port, timeout=30) as s:
                s.ehlo("app.acme.example.test")
                s.mail("news@acme.example.test")
                code, msg = s.rcpt(rcpt)
                if code != 250:
                    s.rset()
                    return code, msg, None
                body = (
                    b"From: News <news@acme.example.test>\r\nTo: " + rcpt.encode() + b"\r\n"
                    b"Subject: news\r\nList-Id: <news.acme.example.test>\r\n\r\nHello\r\n"
                )
                code, msg = s.data(body)
                assert code == 250, msg
                return code, msg, msg.decode().rsplit(" ", 1)[1]

        return await asyncio.to_thread(run)

    async def delivered_headers(self, queue_id: str) -> bytes:
        """The header section of recipient 0's copy, made as delivery makes it from the queue."""
        stored = await self.queue.recipient_data(queue_id, 0)
        msg = await self.queue.show(queue_id)
        assert stored is not None and stored.render and msg is not None
        rcpt = msg.recipients[0]
        item = DueRecipient(
            queue_id, 0, rcpt.address, 0, msg.account, msg.mail_from, msg.created_at, msg.list_name
        )
        data = b"".join(await self.pipeline.renderer.render(item, stored.data))
        return data.split(b"\r\n\r\n", 1)[0] + b"\r\n"


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Live]:
    cfg = make_config()
    cfg = cfg.model_copy(
        update={
            "submission": cfg.submission.model_copy(update={"listen": ["127.0.0.1:0"]}),
            # a short greet_wait: every session still meets the two-line greeting, without a second each
            "inbound": cfg.inbound.model_copy(update={"max_message_size": 6_000_000, "greet_wait": 0.1}),
        }
    )
    store = SqliteStore(tmp_path / "relayd.db")
    queue = QueueStore(tmp_path / "queue.db")
    await store.open()
    await queue.open()
    gate = AccountGate(store, refresh_interval=0.05)
    await gate.start()
    handler = InboundHandler(cfg, store, queue, SECRET)
    loop = asyncio.get_running_loop()
    limits = ConnectionLimits(50, 20)
    inbound = await loop.create_server(lambda: inbound_protocol(cfg, handler, limits), "127.0.0.1", 0)
    pipeline = Pipeline(cfg, store, SECRET, Signer([]), gate)
    sub_handler = SubmissionHandler(cfg, queue, NoDelivery(), pipeline)
    submission = await start_submission(cfg, sub_handler, ConnectionLimits(50, 20))
    try:
        yield Live(
            cfg,
            store,
            queue,
            handler,
            inbound.sockets[0].getsockname()[1],
            submission[0].sockets[0].getsockname()[1],
            pipeline,
        )
    finally:
        for srv in [inbound, *submission]:
            srv.close()
            await srv.wait_closed()
        await gate.stop()
        await queue.close()
        await store.close()


# --- the whole loop -----------------------------------------------------------------------------------------


async def test_bounce_to_verp_address_then_next_rcpt_is_refused(live: Live) -> None:
    rcpt = "kijitora@example.co.jp"
    _, _, qid = await live.submit(rcpt)
    assert qid is not None
    return_path = verp_address(SECRET, INBOUND, qid, 0, rcpt)  # what delivery uses as MAIL FROM
    raw = corpus("dsn/lhost-postfix-04.eml", rcpt, rcpt)
    code, msg = await live.send_report(return_path, raw)
    assert code == 250, msg
    entries = await live.store.list_entries(address=rcpt)
    assert [(e.scope, e.reason) for e in entries] == [(Scope.GLOBAL, Reason.HARD_BOUNCE)]
    code, msg, _ = await live.submit(rcpt)
    assert (code, msg.decode()) == (550, f"5.7.1 <{rcpt}>: suppressed (hard_bounce)")
    code, _, _ = await live.submit("someone.else@example.co.jp")
    assert code == 250


async def test_arf_with_our_x_relayd_id_suppresses_for_the_account(live: Live) -> None:
    rcpt = "complainer@example.com"
    _, _, qid = await live.submit(rcpt)
    assert qid is not None
    headers = await live.delivered_headers(qid)
    trace = next(
        line.split(b":", 1)[1].strip().decode()
        for line in headers.split(b"\r\n")
        if line.lower().startswith(b"x-relayd-id:")
    )
    code, msg = await live.send_report(
        f"fbl@{INBOUND}", arf_report(rcpt, relayd_id=trace), "fbl@provider.example"
    )
    assert code == 250, msg
    entries = await live.store.list_entries(address=rcpt)
    assert [(e.scope, e.account, e.reason) for e in entries] == [(Scope.ACCOUNT, "acme", Reason.COMPLAINT)]
    code, msg, _ = await live.submit(rcpt)
    assert (code, msg.decode()) == (550, f"5.7.1 <{rcpt}>: suppressed (complaint)")


async def test_arf_without_token_to_abuse_does_nothing(live: Live) -> None:
    rcpt = "someone@example.com"
    await live.submit(rcpt)
    code, _ = await live.send_report(
        f"abuse@{INBOUND}", arf_report(rcpt, relayd_id=None), "fbl@provider.example"
    )
    assert code == 250
    assert await live.store.count() == 0
    events = await live.store.events(datetime.now(UTC) - timedelta(hours=1), kind="unattributed")
    assert len(events) == 1 and events[0].account is None


async def test_mailto_unsubscribe(live: Live) -> None:
    rcpt = "reader@example.com"
    _, _, qid = await live.submit(rcpt)
    assert qid is not None
    headers = await live.delivered_headers(qid)
    assert b"mailto:unsubscribe+" in headers
    token = make_token(SECRET, "unsub", qid, 0, rcpt)
    code, _ = await live.send_report(f"unsubscribe+{token}@{INBOUND}", b"Subject: unsubscribe\r\n\r\n", rcpt)
    assert code == 250
    entries = await live.store.list_entries(address=rcpt)
    assert [(e.scope, e.list, e.reason) for e in entries] == [(Scope.LIST, "news", Reason.UNSUBSCRIBE)]


async def test_forged_bounce_is_accepted_and_acts_on_nobody(live: Live) -> None:
    victim = "victim@example.net"
    await live.submit(victim)
    forged = make_token(SECRET[::-1], "verp", new_queue_id(), 0, victim)
    code, _ = await live.send_report(f"bounce+{forged}@{INBOUND}", dsn_report(victim))
    assert code == 250
    code, _ = await live.send_report(f"postmaster@{INBOUND}", dsn_report(victim))
    assert code == 250
    assert await live.store.count() == 0
    events = await live.store.events(datetime.now(UTC) - timedelta(hours=1), kind="unattributed")
    assert [e.count for e in events] == [2]  # one source within the hour: one event, counted twice


# --- relay control and protocol -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rcpt",
    [
        "someone@example.com",  # another domain: the open-relay test
        f"info@{INBOUND}",  # a local part we do not serve
        f"bounce@{INBOUND}",  # no token
        f"bounce+notatoken@{INBOUND}",  # not the shape of a token
        f"unsubscribe+{'a' * 16}-0-{'b' * 15}@{INBOUND}",  # one character short
        f"abuse@sub.{INBOUND}",  # a subdomain is another domain
        f"postmaster@{INBOUND}@evil.example",
        "abuse@acme.example.test",  # a sending domain is not an inbound domain
    ],
)
async def test_relaying_is_denied(live: Live, rcpt: str) -> None:
    def fn(s: smtplib.SMTP) -> tuple[int, bytes]:
        s.mail("")
        return s.rcpt(rcpt)

    code, msg = await live.inbound(fn)
    assert code in (550, 553), msg
    if code == 550:
        assert msg.decode().startswith("5.7.1 ") and msg.decode().endswith(": relaying denied")


@pytest.mark.parametrize(
    "rcpt",
    [
        f"bounce+{'a' * 16}-0-{'b' * 16}@{INBOUND}",
        f"BOUNCE+{'A' * 16}-12-{'B' * 16}@Bounces.Example.Test",
        f"unsubscribe+{'a' * 16}-3-{'b' * 16}@{INBOUND}",
        f"Abuse@{INBOUND}",
        f"fbl@{INBOUND}",
        f"POSTMASTER@{INBOUND}",
        "postmaster",
    ],
)
async def test_served_addresses_are_accepted_from_the_null_sender(live: Live, rcpt: str) -> None:
    def fn(s: smtplib.SMTP) -> tuple[int, bytes]:
        code, msg = s.mail("")
        assert code == 250, msg
        return s.rcpt(rcpt)

    code, msg = await live.inbound(fn)
    assert code == 250, msg


def test_role_of() -> None:
    domains = frozenset({INBOUND})
    token = f"{'a' * 16}-7-{'b' * 16}"
    role = role_of(f"<Bounce+{token.upper()}@{INBOUND}.>", domains)
    assert role is not None and role.kind == "bounce" and role.token == token
    assert role_of(f"fbl@{INBOUND}", domains) is not None
    assert role_of(f"fbl+x@{INBOUND}", domains) is None


async def test_no_auth_offered_or_accepted(live: Live) -> None:
    def fn(s: smtplib.SMTP) -> tuple[bool, tuple[int, bytes]]:
        return s.has_extn("auth"), s.docmd("AUTH", "PLAIN AGFjbWUAczNjcmV0")

    offered, (code, _) = await live.inbound(fn)
    assert not offered and code == 502


async def test_oversized_report_is_refused_with_552(live: Live) -> None:
    raw = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 6100
    code, msg = await live.send_report(f"abuse@{INBOUND}", raw)
    assert code == 552, msg
    # and the session is still usable
    code, _ = await live.send_report(f"abuse@{INBOUND}", b"Subject: small\r\n\r\nhi\r\n")
    assert code == 250


async def test_5mb_attachment_is_processed_and_acts_on_nobody(live: Live) -> None:
    await live.submit("big@example.com")
    line = b"QUFBQUFB" * 9 + b"\r\n"
    raw = dsn_report("big@example.com").replace(
        b"--BB--",
        b"--BB\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + line * (5_000_000 // len(line))
        + b"--BB--",
    )
    for rcpt in (f"bounce+{'a' * 16}-0-{'b' * 16}@{INBOUND}", f"abuse@{INBOUND}"):
        code, msg = await live.send_report(rcpt, raw)
        assert code == 250, msg
    assert await live.store.count() == 0


async def test_our_own_bug_answers_451_and_the_session_goes_on(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def buggy(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(live.handler, "process", buggy)

    def fn(s: smtplib.SMTP) -> list[int]:
        codes = []
        for _ in range(2):
            s.mail("")
            s.rcpt(f"abuse@{INBOUND}")
            code, msg = s.data(b"Subject: x\r\n\r\nx\r\n")
            assert b"boom" not in msg
            codes.append(code)
        return codes

    assert await live.inbound(fn) == [451, 451]


async def test_store_failure_answers_451(live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(*args: object, **kwargs: object) -> None:
        raise StorageError("disk full")

    monkeypatch.setattr(live.store, "record_events", broken)
    code, msg = await live.send_report(f"abuse@{INBOUND}", arf_report("x@example.com", relayd_id=None))
    assert code == 451 and msg.startswith(b"4.3.0"), msg


async def test_nothing_received_makes_us_send_mail(live: Live) -> None:
    """No backscatter: whatever arrives, the outgoing queue stays empty (no auto-reply, no DSN)."""
    for rcpt, raw in [
        (f"postmaster@{INBOUND}", b"Subject: hello postmaster\r\n\r\nPlease reply.\r\n"),
        (f"abuse@{INBOUND}", (CORPUS / "other/is-not-bounce-01.eml").read_bytes()),
        (f"bounce+{'a' * 16}-0-{'b' * 16}@{INBOUND}", dsn_report("x@example.com")),
    ]:
        code, _ = await live.send_report(rcpt, raw, "requester@example.org")
        assert code == 250
    assert await live.queue.list_messages() == []


@pytest.mark.parametrize(
    "raw",
    [
        dsn_report("a@example.com")[:300],
        (bytes(b for b in range(256) if b not in b"\r\n\0") + b"\r\n") * 40,  # bare CR/LF, NUL: 554 elsewhere
        b"Content-Type: multipart/report; boundary=x\r\n\r\n"
        b"--x\r\nContent-Type: message/delivery-status\r\n\r\n"
        + b"Final-Recipient: rfc822; \r\nStatus: 9.9.9\r\n"
        * 200,
        b"Subject: x\r\n\r\n" + b"A" * 990 + b"\r\n",
    ],
    ids=["truncated-mime", "binary-junk", "broken-status-fields", "plain-long-line"],
)
async def test_malformed_reports_get_250_and_the_listener_lives_on(live: Live, raw: bytes) -> None:
    await live.submit("target@example.com")
    for rcpt in (f"bounce+{'a' * 16}-0-{'b' * 16}@{INBOUND}", f"abuse@{INBOUND}", f"postmaster@{INBOUND}"):
        code, msg = await live.send_report(rcpt, raw)
        assert code == 250, msg
    assert await live.store.count() == 0


async def test_bare_lf_in_a_report_is_refused_not_processed(live: Live) -> None:
    """The smuggling defence applies here too: with ``[inbound] bare_newline = "reject"`` StrictSMTP refuses
    DATA with bare LFs after the real end (normalize, the default: tests/test_bare_newline.py)."""
    cfg = live.cfg.model_copy(
        update={"inbound": live.cfg.inbound.model_copy(update={"bare_newline": "reject"})}
    )
    server = await asyncio.get_running_loop().create_server(
        lambda: inbound_protocol(cfg, live.handler, ConnectionLimits(5, 5)), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]

    def raw_session() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            f = sock.makefile("rwb")
            while f.readline()[3:4] == b"-":  # the greeting ends with its "220 " line
                pass
            for line in (
                b"EHLO x\r\n",
                b"MAIL FROM:<>\r\n",
                f"RCPT TO:<abuse@{INBOUND}>\r\n".encode(),
                b"DATA\r\n",
            ):
                f.write(line)
                f.flush()
                while True:
                    reply = f.readline()
                    if reply[3:4] != b"-":
                        break
            f.write(b"Subject: x\r\n\r\nhello\n.\nMAIL FROM:<>\r\n.\r\n")
            f.flush()
            return f.readline()

    try:
        reply = await asyncio.to_thread(raw_session)
    finally:
        server.close()
        await server.wait_closed()
    assert reply.startswith(b"554 5.5.2"), reply


async def test_start_inbound_binds_every_listen_address(tmp_path: Path, live: Live) -> None:
    cfg = live.cfg.model_copy(
        update={"inbound": live.cfg.inbound.model_copy(update={"listen": ["127.0.0.1:0", "127.0.0.1:0"]})}
    )
    servers = await start_inbound(cfg, live.handler, ConnectionLimits(5, 5))
    try:
        assert len(servers) == 2
        port = servers[0].sockets[0].getsockname()[1]

        def greet() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                f = sock.makefile("rb")
                while (line := f.readline())[3:4] == b"-":  # "220-" first, then "220 " after greet_wait
                    pass
                return line

        assert (await asyncio.to_thread(greet)).startswith(b"220 relayd.test")
    finally:
        for srv in servers:
            srv.close()
            await srv.wait_closed()
