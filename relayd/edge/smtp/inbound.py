"""The inbound listener: bounces, complaints and mailto unsubscribes come back here, and nothing else.

What it accepts, and why so little:

* RCPT only at ``[inbound] domains`` and only the local parts ``bounce+<token>`` (VERP return paths),
  ``unsubscribe+<token>`` (List-Unsubscribe mailto), ``abuse``, ``fbl``, ``postmaster`` (RFC 5321 §4.5.1
  requires postmaster, also without a domain) and ``dmarc`` (DMARC aggregate reports, the ``rua`` a sending
  domain publishes), case-insensitively. Anything else is
  ``550 5.7.1 <addr>: relaying denied``: this listener faces the internet, and it must never become a relay
  or a mailbox for spam. Tokens are checked for *shape* at RCPT (a dictionary attack on ``bounce+...`` costs
  nothing) and verified against the sent ledger only at DATA, so a forged report is still received and
  counted (``unattributed``) rather than bounced.
* No AUTH is offered or accepted, and the null sender ``<>`` is accepted: DSNs come from it (RFC 3464 §2).
* Nothing received here ever makes relayd write to its sender: no auto-reply, no DSN back, so a forged
  sender can't use us for backscatter. Mail we cannot use is still answered ``250`` and kept as an event;
  what a person must read is kept in the postmaster inbox (:mod:`relayd.desk`), whose only mail out is a
  copy to the operator's own ``[inbound] postmaster_forward``, with a null sender.
* DATA goes through :class:`~relayd.edge.smtp.protocol.StrictSMTP` (strict terminator, bare LF per
  ``[inbound] bare_newline``, timeouts, size limit ``[inbound] max_message_size`` -> ``552``), with the
  submission listener's timeouts and error limit, connection limits of its own (``[inbound] max_connections``,
  ``max_connections_per_ip``: this listener is open to anyone, so they are well below submission's) and
  the process's DATA budget (``[server] max_data_in_flight``) shared with submission.
* Each client address may start ``[inbound] rate_per_ip`` transactions (MAIL commands); beyond that it gets
  ``421 4.7.0`` and is disconnected. Forged reports cost a store lookup each, so a flood of them must not
  get unlimited lookups; a real MTA simply retries a 421 later, so nothing genuine is lost.

On DATA the message is handed to :class:`relayd.feedback.service.Feedback` once per distinct role among its
recipients; the
``250`` is sent once the effects are committed. A store or queue failure answers ``451 4.3.0`` so the remote
MTA retries (every effect is idempotent); our own bug answers ``451`` too, never ``5xx`` (a 5xx would make
the remote MTA bounce the bounce to ``<>``, i.e. nowhere, and lose the report).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from aiosmtpd.smtp import Envelope

from relayd.config import Config
from relayd.core.errors import StorageError
from relayd.core.tokens import VERP_LOCAL, parse_token
from relayd.desk.service import Desk
from relayd.edge.ratelimit import RateLimiter, source_key
from relayd.edge.smtp.limits import ConnectionLimits
from relayd.edge.smtp.protocol import (
    RelayEnvelope,
    RelaySession,
    StrictSMTP,
    listen,
    listener_tls_context,
)
from relayd.feedback.service import Feedback
from relayd.policy.reloaded import Reloaded
from relayd.queue.store import QueueStore
from relayd.reports.arf import ArfReport
from relayd.reports.dsn import DsnReport
from relayd.reports.parseworker import ParseAbandoned, ParsedReport, ParserBusy, ParseWorker, parse_report
from relayd.store.models import Event
from relayd.store.protocols import Store

log = logging.getLogger(__name__)

__all__ = ["InboundHandler", "InboundSMTP", "Role", "start_inbound"]

TEMPFAIL = "451 4.3.0 Temporary failure, try again later"
PARSER_BUSY = "451 4.3.2 Too many reports in progress, try again later"
RATE_LIMITED = "421 4.7.0 Too many messages from your address, try again later"
#: Recipients per transaction: a report has one; a few more are tolerated (a FBL copying abuse@ and fbl@).
MAX_RECIPIENTS = 20

_UNSUB_LOCAL = "unsubscribe"
_PLAIN_ROLES = frozenset({"abuse", "fbl", "postmaster", "dmarc"})


@dataclass(frozen=True, slots=True)
class Role:
    """What an accepted recipient is for: ``kind`` is bounce, unsubscribe, abuse, fbl, postmaster or dmarc."""

    kind: str
    token: str | None = None


def role_of(address: str, domains: frozenset[str]) -> Role | None:
    """The role of an envelope recipient, or None when we do not accept mail for it."""
    local, at, domain = address.strip().strip("<>").rpartition("@")
    if not at:
        # RFC 5321 §4.5.1: "postmaster" without a domain must be accepted
        return Role("postmaster") if domain.lower() == "postmaster" else None
    if domain.lower().rstrip(".") not in domains:
        return None
    lower = local.lower()
    if lower in _PLAIN_ROLES:
        return Role(lower)
    base, plus, token = lower.partition("+")
    if plus and base in (VERP_LOCAL, _UNSUB_LOCAL) and parse_token(token) is not None:
        return Role("bounce" if base == VERP_LOCAL else "unsubscribe", token)
    return None


class Reading:
    """The parse of one message, shared by the roles of its recipients: parsed once, or abandoned once (a
    message to twenty VERP addresses must not hold the parser twenty times ``parse_timeout``)."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._result: ParsedReport | ParseAbandoned | None = None

    async def get(self, parse: Callable[[bytes], Awaitable[ParsedReport]]) -> ParsedReport:
        """The parse, made by ``parse`` the first time; raises ParseAbandoned every time it was."""
        if self._result is None:
            try:
                self._result = await parse(self.raw)
            except ParseAbandoned as exc:
                self._result = exc
        if isinstance(self._result, ParseAbandoned):
            raise ParseAbandoned(self._result.why)
        return self._result


class InboundHandler:
    """aiosmtpd hooks of the inbound listener; one instance serves every connection."""

    def __init__(
        self,
        cfg: Config,
        store: Store,
        queue: QueueStore,
        secret: bytes,
        parser: ParseWorker | None = None,
        desk: Desk | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.queue = queue
        self.secret = secret
        #: what a report does (attribution, suppression, rates): one object, reloaded with this handler
        self.feedback = Feedback(store, queue, secret, cfg)
        #: the report parser child; None parses in a thread of this process, with no time limit (for tests
        #: of the listener alone: the daemon always passes one)
        self.parser = parser
        #: the postmaster's desk: the inbox of what a person must read, and the DMARC reports (its own
        #: parse child, with the same time limit, when this handler has one)
        self.desk = desk or Desk(
            lambda: self.cfg,
            store,
            queue,
            parse_timeout=cfg.inbound.parse_timeout if parser is not None else None,
        )
        self._domains = frozenset(cfg.inbound.domains)
        rate = cfg.inbound.rate_per_ip
        self.rate = RateLimiter(rate.events, rate.per)
        #: the STARTTLS context (None: STARTTLS not offered); each new connection reads it, so a reload
        #: that swaps it serves a renewed certificate from the next connection on
        self.tls_context: ssl.SSLContext | None = None

    def reload(self, new: Reloaded) -> None:
        """A new config (SIGHUP): the next command of every session reads it, the next connection gets the
        re-read certificate. The domains and the rate limiter stay as they were built (a restart changes
        them, as it does the listen addresses)."""
        self.cfg, self.tls_context = new.cfg, new.inbound_tls
        self.feedback.reload(new)

    async def handle_MAIL(
        self, server: StrictSMTP, session: RelaySession, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if not self.rate.allow(source_key(server.peer_ip)):
            log.info("%s: MAIL refused: over [inbound] rate_per_ip", server.peer_ip)
            return RATE_LIMITED  # a 421: StrictSMTP.push hangs up after it
        # "<>" is what aiosmtpd hands us for the null reverse path; keep it truthy so RCPT may follow
        envelope.mail_from = address or "<>"
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self,
        server: StrictSMTP,
        session: RelaySession,
        envelope: RelayEnvelope,
        address: str,
        options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return "452 4.5.3 Error: too many recipients"
        if role_of(address, self._domains) is None:
            log.info("%s: RCPT <%s> refused: relaying denied", server.peer_ip, address)
            return f"550 5.7.1 <{address}>: relaying denied"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: StrictSMTP, session: RelaySession, envelope: RelayEnvelope) -> str:
        raw = envelope.content
        assert isinstance(raw, bytes)
        roles = list(
            dict.fromkeys(r for a in envelope.rcpt_tos if (r := role_of(a, self._domains)) is not None)
        )
        reading = Reading(raw)  # one parse for every role of the message
        try:
            for role in roles:
                await self.process(
                    role,
                    raw,
                    datetime.now(UTC),
                    reading,
                    source_ip=source_key(server.peer_ip),
                    mail_from=str(envelope.mail_from or ""),
                )
        except StorageError as exc:
            log.error("%s: inbound report not processed (will be retried): %s", server.peer_ip, exc)
            return TEMPFAIL
        except ParserBusy as exc:
            log.warning("%s: inbound report not processed (will be retried): %s", server.peer_ip, exc)
            return PARSER_BUSY
        except RecursionError:
            # MIME nested ~1000 deep exhausts the stdlib parser's stack: no report is built like that, and
            # a 451 would only bring the same message back forever
            log.info("%s: inbound message refused: MIME nested too deeply", server.peer_ip)
            return "554 5.6.0 Message refused: MIME structure nested too deeply"
        except Exception:
            # our bug, not the sender's: 451 and a traceback, and the session stays in a sane state
            log.exception("%s: inbound report processing failed", server.peer_ip)
            return TEMPFAIL
        log.info(
            "%s: inbound from=<%s> roles=%s size=%d processed",
            server.peer_ip,
            envelope.mail_from,
            ",".join(r.kind for r in roles),
            len(raw),
        )
        return "250 2.0.0 Ok: report received"

    async def process(
        self,
        role: Role,
        raw: bytes,
        now: datetime,
        reading: Reading | None = None,
        *,
        source_ip: str | None = None,
        mail_from: str = "",
    ) -> None:
        """Route one message by recipient role. A VERP address also receives feedback loops that send to
        the Return-Path (some FBLs do), so a real ARF report there is treated as a complaint; postmaster@
        gets ARF reports and bounces alike.

        The message is parsed once (:func:`relayd.reports.parseworker.parse_report`), in the parser child when
        there is one. A report the child could not parse within ``[inbound] parse_timeout`` (or died on)
        is kept as an ``unclassified`` event that acts on nobody, and the sender gets ``250``: a 4xx
        would only bring the same bytes back to the same slow path for days, and a 5xx would lose a
        genuine report for good as well. Raises ParserBusy when too many reports wait for the child.
        ``reading`` carries the parse from one role of the message to the next; ``source_ip`` (the
        client's address, an IPv6 client's /64) groups the reports that act on nobody, one event per source
        and hour.

        Then the desk (:mod:`relayd.desk`) keeps what a person must read: mail to abuse@/postmaster@ that
        is no report, and reports attributed to nobody or not parsed; ``mail_from`` (the envelope sender)
        tells a machine's mail from a person's. Mail to dmarc@ goes to the desk alone."""
        source = f"ip:{source_ip}" if source_ip else "unknown"
        if role.kind == "unsubscribe":
            assert role.token is not None
            await self.feedback.on_unsubscribe_mail(raw, role.token, now, source_ip=source_ip)
            return
        if role.kind == "dmarc":
            await self.desk.on_dmarc(raw, now, source=source, mail_from=mail_from)
            return
        try:
            parsed = await (reading or Reading(raw)).get(self.parse)
        except ParseAbandoned as exc:
            await self.feedback.on_unclassified(raw, role.kind, exc.why, now, source_ip=source_ip)
            await self.desk.unreadable(role.kind, raw, exc.why, now, source=source, mail_from=mail_from)
            return
        report, bounce = parsed.arf, parsed.dsn
        events = await self._act(role, raw, now, report, bounce, source_ip=source_ip)
        await self.desk.after_report(
            role.kind,
            raw,
            now,
            is_report=report.is_arf or (bounce is not None and bounce.is_dsn),
            events=events,
            source=source,
            mail_from=mail_from,
        )

    async def _act(
        self,
        role: Role,
        raw: bytes,
        now: datetime,
        report: ArfReport,
        bounce: DsnReport | None,
        *,
        source_ip: str | None,
    ) -> list[Event]:
        """What relayd itself does with a parsed report (feedback's effects); returns the events."""
        if role.kind == "bounce":
            if report.is_arf and report.format in ("rfc5965", "hotmail-jmrp"):
                return await self.feedback.on_arf(
                    raw, now, verp_token=role.token, report=report, source_ip=source_ip
                )
            return await self.feedback.on_dsn(raw, role.token, now, report=bounce, source_ip=source_ip)
        if role.kind == "postmaster" and not report.is_arf:
            return await self.feedback.on_dsn(raw, None, now, report=bounce, source_ip=source_ip)
        return await self.feedback.on_arf(raw, now, report=report, bounce=bounce, source_ip=source_ip)

    async def parse(self, raw: bytes) -> ParsedReport:
        """The one reading of ``raw``: in the parser child, or (no child) in a thread of this process."""
        if self.parser is not None:
            return await self.parser.parse(raw)
        return await asyncio.to_thread(parse_report, raw)

    async def handle_exception(self, error: Exception) -> str:
        log.exception("inbound session failed")
        return TEMPFAIL


class InboundSMTP(StrictSMTP):
    """StrictSMTP without AUTH: nobody logs in here, so the command is not even recognised.

    Lines up to 64 KiB are taken: real bounces quote long lines of the original (Amazon SES, GMX), and
    refusing a report from ``<>`` loses it for good. Nothing received here is relayed, so the RFC 5322
    limit that protects downstream servers does not apply.

    PIPELINING is not offered (a bounce carries one message; MTAs that send them do not need it), so the
    protocol runs in lockstep: a client that sends before it has read our reply, or before the greeting
    has ended, is ratware, and gets ``554 5.5.0`` and a closed connection."""

    line_length_limit = 65536 + 2
    max_line_octets = 65536

    async def smtp_AUTH(self, arg: str) -> None:
        await self.push("502 5.5.1 Error: command not implemented")


async def start_inbound(
    cfg: Config, handler: InboundHandler, limits: ConnectionLimits, *, reuse_port: bool = False
) -> list[asyncio.Server]:
    """Bind every ``[inbound] listen`` address; return the servers (closing them stops accepting).

    Timeouts are the submission listener's (``[submission] command_timeout`` / ``data_timeout``): the
    inbound section has no keys of its own for them yet. Raises OSError when an address cannot be bound.
    """
    handler.tls_context = tls_context(cfg)
    return await listen(
        cfg.inbound.listen,
        lambda _host: lambda: inbound_protocol(handler.cfg, handler, limits),
        reuse_port=reuse_port,
    )


def tls_context(cfg: Config) -> ssl.SSLContext | None:
    """The inbound listener's STARTTLS context from ``[inbound] tls_cert``/``tls_key`` (None without
    them); submission's settings. Raises OSError when the pair does not load."""
    inbound = cfg.inbound
    if inbound.tls_cert is None or inbound.tls_key is None:
        return None
    return listener_tls_context(inbound.tls_cert, inbound.tls_key)


def inbound_protocol(cfg: Config, handler: InboundHandler, limits: ConnectionLimits) -> InboundSMTP:
    """One protocol instance per connection (the factory of :func:`start_inbound`, and of tests)."""
    return InboundSMTP(
        handler,
        limits=limits,
        tls_context=handler.tls_context,
        require_starttls=False,  # a sender without TLS still gets to return its bounce
        data_timeout=cfg.submission.data_timeout,
        max_errors=cfg.submission.max_errors,
        normalize_bare_lf=cfg.inbound.bare_newline == "normalize",
        lockstep=True,  # no PIPELINING is offered here: a client that talks ahead is refused
        greet_wait=cfg.inbound.greet_wait,
        hostname=cfg.server.hostname,
        ident="relayd",
        data_size_limit=cfg.inbound.max_message_size,
        enable_SMTPUTF8=True,
        decode_data=False,
        timeout=cfg.submission.command_timeout,
        auth_required=False,
        auth_require_tls=True,  # with no TLS context, EHLO never lists AUTH
        auth_exclude_mechanism=["LOGIN", "PLAIN"],  # nor after STARTTLS: nobody logs in here
    )
