"""The submission listener: applications hand us mail here.

Relay control comes first and stands apart from policy (Postfix's ``smtpd_relay_restrictions``): a client
that is neither authenticated nor inside an account's ``networks`` can do nothing but AUTH (``530 5.7.0``),
and an account may only use its own sending domains in MAIL FROM (``553 5.7.1``; the header From and
Sender are held to the same :meth:`~relayd.config.AccountConfig.sends_as` at DATA by
:mod:`relayd.policy.rules.fromheader`). Nothing here can make relayd an open relay, whatever the policy rules
later say.

The ``250`` after DATA is sent only when the queue's commit holding the message has returned; a storage
error answers ``451 4.3.0`` and the client keeps the message.

Password guessing is slowed and then stopped by :class:`~relayd.edge.ratelimit.AuthGuard`: each
failure waits longer before its ``535``, ``[submission] auth_max_failures`` failures from one client within
``auth_failure_window`` get ``421 4.7.0`` and a closed connection, and ``auth_account_max_failures``
against one account name lock it for clients that have never logged in to it (the real application keeps
working from its usual address). Failures are logged with client and login name, never the password.

TLS (STARTTLS): TLS 1.2 and 1.3 only, forward-secret AEAD ciphers only (Mozilla's "intermediate" profile,
minus the finite-field DHE suites that need a parameter file). The context lives on the handler and is read
for every new connection, so a certificate renewed on disk is served after SIGHUP (``Daemon.reload``).

Implicit TLS (``listen_tls``, RFC 8314 §3.3, port 465): the same protocol, handler, limits and TLS settings,
TLS from the first byte. Each handshake uses the handler's context as it is then, so both kinds of listener
serve the same certificate, reloaded together; connections still in their handshake are limited per client
and in total like sessions (:class:`_ImplicitTls`). No STARTTLS there (the session is encrypted already);
AUTH is offered from the start.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto as sslproto
import datetime as dt
import email.utils
import functools
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any, cast

from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword

from relayd.config import Config, is_loopback_host, parse_hostport
from relayd.core import metrics
from relayd.core.address import AddressError, normalize
from relayd.core.errors import StorageError
from relayd.core.passwords import Credential, PasswordChecker, PlainPassword, parse_hash
from relayd.core.tokens import new_queue_id
from relayd.edge.ratelimit import TOO_MANY_FAILURES, AuthGuard, AuthVerdict
from relayd.edge.smtp.protocol import (
    BACKLOG,
    ConnectionLimits,
    RelayEnvelope,
    RelaySession,
    StrictSMTP,
    listener_tls_context,
)
from relayd.feedback import reputation
from relayd.policy.model import Action
from relayd.policy.pipeline import AllDropped, MimeError, Pipeline, Refused
from relayd.queue.handoff import Handoff
from relayd.queue.store import InsufficientStorage, NewMessage, QueueStore, free_bytes

log = logging.getLogger(__name__)

AUTH_REQUIRED = "530 5.7.0 Authentication required"
POLICY_UNAVAILABLE = "451 4.3.0 Temporary policy failure, try again later"
MIME_TOO_DEEP = "554 5.6.0 Message refused: MIME structure nested too deeply"
INSUFFICIENT_STORAGE = "452 4.3.1 Insufficient system storage"  # RFC 3463 §3.4; Postfix says the same
#: appended to the ``accepted`` line of a message whose client hung up before it could get our 250
CLIENT_GONE_NOTE = " (client gone before the 250: it will send this message again)"
#: transport extra-info keys aiosmtpd keeps in ``session.ssl`` after STARTTLS (asyncio.sslproto's ``_extra``)
_TLS_EXTRA = ("sslcontext", "peercert", "cipher", "compression", "ssl_object")
#: seconds a client on an implicit-TLS port has to finish its handshake (asyncio's default is 60); a real
#: client needs milliseconds, one that stalls holds one of its handshake slots (:class:`_ImplicitTls`)
TLS_HANDSHAKE_TIMEOUT = 20


def _valid_address(address: str) -> bool:
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or len(address) > 254 or len(local) > 64:
        return False
    if domain.startswith("[") and domain.endswith("]"):
        return True
    labels = domain.rstrip(".").split(".")
    return len(labels) >= 2 and all(0 < len(lbl) <= 63 for lbl in labels)


class SubmissionSMTP(StrictSMTP):
    """StrictSMTP with the AUTH throttle: the handler decides a failed AUTH's reply (``auth_verdict``), and
    this protocol waits the verdict's delay before sending it, without blocking other sessions."""

    def __init__(self, handler: SubmissionHandler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.guard = handler.login_guard
        self.auth_verdict: AuthVerdict | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """On an implicit-TLS listener the handshake is over before this runs; the session records it as
        aiosmtpd does after STARTTLS (the Received line says ESMTPS(A), and a TLS transport's EOF is not
        answered with a half-close it cannot do)."""
        super().connection_made(transport)
        session = self.session
        if session is not None and session.ssl is None and transport.get_extra_info("ssl_object") is not None:
            session.ssl = {key: transport.get_extra_info(key) for key in _TLS_EXTRA}

    async def smtp_AUTH(self, arg: str) -> None:
        if self.guard.client_locked(self.peer_ip):
            log.warning("%s: AUTH refused: too many failed authentications", self.peer_ip)
            await self.push(TOO_MANY_FAILURES)  # a 421: push() hangs up
            return
        self.auth_verdict = None
        await super().smtp_AUTH(arg)
        verdict, self.auth_verdict = self.auth_verdict, None
        if verdict is not None:
            await asyncio.sleep(verdict.delay)
            await self.push(verdict.reply)

    # aiosmtpd's PLAIN and LOGIN call the authenticator synchronously, but a password check is slow (scrypt,
    # run in a thread). So the credentials they decode are parked by _authenticate and the overrides below
    # await the handler's check. Anything that reaches _authenticate otherwise fails closed.
    _parked_login: tuple[str, LoginPassword] | None = None

    def _authenticate(self, mechanism: str, auth_data: Any) -> AuthResult:
        if isinstance(auth_data, LoginPassword):
            self._parked_login = (mechanism, auth_data)
        return AuthResult(success=False, handled=False)

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._check_parked(await super().auth_PLAIN(_, args))

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._check_parked(await super().auth_LOGIN(_, args))

    async def _check_parked(self, result: AuthResult) -> AuthResult:
        parked, self._parked_login = self._parked_login, None
        if parked is None or not isinstance(self.session, RelaySession) or self.envelope is None:
            return result  # aiosmtpd answered already (bad base64, "*"), or nothing was decoded
        handler: SubmissionHandler = self.event_handler
        return await handler.authenticate(self, self.session, self.envelope, *parked)


class SubmissionHandler:
    """aiosmtpd hooks for the submission listener (one instance shared by all connections)."""

    def __init__(
        self, cfg: Config, queue: QueueStore, handoff: Handoff, pipeline: Pipeline | None = None
    ) -> None:
        self.cfg = cfg
        self.queue = queue
        #: who starts delivery of a committed message (relayd.queue.handoff)
        self.handoff = handoff
        self.pipeline = pipeline
        #: AUTH password checks: scrypt in a thread, bounded, successes remembered (relayd.core.passwords)
        self.passwords = PasswordChecker()
        self.passwords.configure(self._read_passwords(cfg))
        self._sessions: dict[str, set[int]] = {}
        sub = cfg.submission
        #: not ``auth_guard``: aiosmtpd takes every handler attribute named ``auth_*`` for a SASL mechanism
        self.login_guard = AuthGuard(
            max_failures=sub.auth_max_failures,
            account_max_failures=sub.auth_account_max_failures,
            window=sub.auth_failure_window,
            delay=sub.auth_failure_delay,
        )
        #: STARTTLS context for new connections; set by start_submission, replaced by Daemon.reload
        self.tls_context: ssl.SSLContext | None = None

    @staticmethod
    def _read_passwords(cfg: Config) -> dict[str, Credential]:
        """Each account's credential: its parsed ``password_hash`` or its ``password_file``'s content (both
        checked by the config loader). Accounts with only ``networks`` have none: AUTH as them fails."""
        out: dict[str, Credential] = {}
        for name, acct in cfg.accounts.items():
            if acct.password_hash:
                out[name] = parse_hash(acct.password_hash)
            elif acct.password_file is not None:
                out[name] = PlainPassword(acct.password_file.read_text(encoding="utf-8").strip().encode())
        return out

    def reload(self, cfg: Config, pipeline: Pipeline | None) -> None:
        """Swap config and policy (SIGHUP); sessions in progress use them from their next command on."""
        credentials = self._read_passwords(cfg)
        self.cfg, self.pipeline = cfg, pipeline
        self.passwords.configure(credentials)  # a changed password forgets the logins remembered with it
        sub = cfg.submission
        self.login_guard.configure(
            max_failures=sub.auth_max_failures,
            account_max_failures=sub.auth_account_max_failures,
            window=sub.auth_failure_window,
            delay=sub.auth_failure_delay,
        )

    # --- identity ------------------------------------------------------------------------------------------

    def _claim_session(self, server: StrictSMTP, account: str) -> bool:
        members = self._sessions.setdefault(account, set())
        if id(server) not in members and len(members) >= self.cfg.submission.max_sessions_per_account:
            return False
        members.add(id(server))
        return True

    def connection_closed(self, server: StrictSMTP) -> None:
        session = server.session
        account = getattr(session, "account", None)
        if account is not None and account in self._sessions:
            self._sessions[account].discard(id(server))

    async def authenticate(
        self,
        server: SubmissionSMTP,
        session: RelaySession,
        envelope: Envelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        """Check a login (awaited by :class:`SubmissionSMTP`: the scrypt check runs in a thread). A failure
        is answered by ``server`` after the guard's delay (``handled=True`` tells aiosmtpd not to answer
        itself); the password never reaches a log line. Every failure costs one full check, whatever the
        account (unknown, ``networks`` only, ``password_file``): no account-name oracle."""
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login = auth_data.login.decode("utf-8", "replace")
        password = auth_data.password.decode("utf-8", "replace")
        ip = server.peer_ip
        if self.login_guard.account_locked(login, ip):
            # no password check at all: a guesser learns nothing while the account is under attack
            server.auth_verdict = verdict = self.login_guard.failed(ip, login, count_account=False)
            log.warning(
                "%s: AUTH %s for %r refused: account locked after repeated failures (client failures=%d)",
                ip,
                mechanism,
                login[:64],
                verdict.failures,
            )
            return AuthResult(success=False, handled=True)
        ok = await self.passwords.check(login, password)
        if not ok:
            server.auth_verdict = verdict = self.login_guard.failed(ip, login)
            log.warning(
                "%s: AUTH %s failed for %r (client failures=%d%s)",
                ip,
                mechanism,
                login[:64],
                verdict.failures,
                ", disconnecting" if verdict.close else "",
            )
            return AuthResult(success=False, handled=True)
        self.login_guard.succeeded(ip, login)
        if not self._claim_session(server, login):
            return AuthResult(
                success=False,
                handled=False,
                message="454 4.7.0 Too many sessions for this account, try again later",
            )
        session.account = login
        log.info("%s: authenticated as %s", server.peer_ip, login)
        return AuthResult(success=True, auth_data=auth_data)

    # --- SMTP hooks ----------------------------------------------------------------------------------------

    async def handle_MAIL(
        self, server: StrictSMTP, session: RelaySession, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if session.account is None:
            account = self.cfg.account_for_network(server.peer_ip)
            if account is None:
                return AUTH_REQUIRED
            if not self._claim_session(server, account):
                return "451 4.7.0 Too many sessions for this account, try again later"
            session.account = account
        acct = self.cfg.accounts.get(session.account)
        if acct is None:  # the account was removed by a reload while this session was open
            return AUTH_REQUIRED
        if self.pipeline is not None:
            refusal = self.pipeline.check_sender(session.account)
            if refusal is not None:
                log.info("%s: MAIL refused for account %s: %s", server.peer_ip, session.account, refusal)
                return refusal
        if not address:
            return "553 5.7.1 <>: null sender not allowed on submission"
        if not _valid_address(address):
            return f"501 5.1.7 <{address}>: bad sender address syntax"
        if not acct.sends_as(address.rpartition("@")[2]):
            return f"553 5.7.1 <{address}>: sender domain not owned by account {session.account}"
        envelope.mail_from = address
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
        if session.account is None or session.account not in self.cfg.accounts:
            return AUTH_REQUIRED
        if len(envelope.rcpt_tos) >= self.cfg.submission.max_recipients:
            return "452 4.5.3 Error: too many recipients"
        try:
            rcpt = normalize(address)
        except AddressError:
            return f"501 5.1.3 <{address}>: bad recipient address syntax"
        if self.pipeline is not None:
            try:
                verdict = await self.pipeline.check_rcpt(session.account, rcpt, dt.datetime.now(dt.UTC))
            except StorageError as exc:
                log.error("%s: RCPT policy check failed: %s", server.peer_ip, exc)
                return POLICY_UNAVAILABLE
            if verdict is not None and verdict.action is Action.REJECT:
                return verdict.reply
            if verdict is not None and verdict.action is Action.DROP:
                # a spam trap: recorded (and judged) at DATA, once the message is known to be accepted
                # and whether it is a confirmation mail (whose trap hits don't count)
                envelope.dropped.add(rcpt)
        envelope.rcpt_tos.append(rcpt)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: StrictSMTP, session: RelaySession, envelope: RelayEnvelope) -> str:
        """Finish the message whose final dot has arrived, even if its client is gone meanwhile.

        aiosmtpd cancels the session's task when the client closes (or half-closes) the connection. Cut
        short there, a message would be half done: caps and ledger written without it, or committed to
        the queue (the commit goes on without its caller) with no ``accepted`` line and no hand-off. So
        the work runs shielded to its end, as in Postfix, whose smtpd does not look at the socket again
        before its reply; then the session ends as aiosmtpd meant. The client never saw our ``250`` and
        will send the message again (RFC 5321 §4.1.1.4 leaves that duplicate to the sender): the
        ``accepted`` line says so."""
        fate = _DataReply()
        work = asyncio.ensure_future(self._handle_data(server, session, envelope, fate))
        while True:
            try:
                reply = await asyncio.shield(work)
            except asyncio.CancelledError:
                if work.done():  # the work itself was cancelled: the loop is shutting down
                    raise
                fate.lost = True
                continue
            except Exception:
                if not fate.lost:
                    raise  # answered 451 by handle_exception
                log.exception("DATA from %s failed after the client hung up", server.peer_ip)
                raise asyncio.CancelledError from None
            if fate.lost:
                raise asyncio.CancelledError  # no reply to send: end the session as aiosmtpd meant to
            return reply

    async def _handle_data(
        self, server: StrictSMTP, session: RelaySession, envelope: RelayEnvelope, fate: _DataReply
    ) -> str:
        started = time.perf_counter()
        reply = await self._data(server, session, envelope, fate)
        outcome, reason = _outcome(reply)
        if outcome != "accepted":
            log.info(
                "DATA from %s account=%s %s: %s",
                server.peer_ip,
                session.account,
                outcome,
                reply,
                extra={
                    "fields": {
                        "event": "submission",
                        "account": session.account,
                        "outcome": outcome,
                        "reason": reason,
                        "reply_code": reply[:3],
                        "client": server.peer_ip,
                    }
                },
            )
        metrics.SUBMISSIONS.labels(outcome, reason).inc()
        metrics.ACCEPT_SECONDS.observe(time.perf_counter() - started)
        return reply

    async def _data(
        self, server: StrictSMTP, session: RelaySession, envelope: RelayEnvelope, fate: _DataReply
    ) -> str:
        assert session.account is not None and envelope.mail_from is not None
        content = envelope.content
        assert isinstance(content, bytes)
        queue_id = new_queue_id()
        received = self._received(server, session, queue_id)
        recipients = [r for r in envelope.rcpt_tos if r not in envelope.dropped]
        if self._short_of_space(len(content) * max(1, len(recipients))):
            # before the policy writes anything (caps, ledger): a full disk answers 452, not 451
            log.error(
                "%s: account=%s not queued: queue filesystem below min_free_space", queue_id, session.account
            )
            return INSUFFICIENT_STORAGE
        if not recipients and self.pipeline is None:
            log.info("%s: account=%s every recipient dropped at RCPT", queue_id, session.account)
            return f"250 2.0.0 Ok: queued as {queue_id}"
        if self.pipeline is None:
            msg = NewMessage(
                queue_id=queue_id,
                account=session.account,
                mail_from=envelope.mail_from,
                recipients=tuple(recipients),
                data=received + content,
            )
        else:
            try:
                done = await self.pipeline.process(
                    queue_id=queue_id,
                    account=session.account,
                    mail_from=envelope.mail_from,
                    recipients=recipients,
                    raw=content,
                    now=dt.datetime.now(dt.UTC),
                    traps=tuple(dict.fromkeys(r for r in envelope.rcpt_tos if r in envelope.dropped)),
                )
            except Refused as exc:
                log.info("%s: account=%s refused by %s: %s", queue_id, session.account, exc.verdict.rule, exc)
                return exc.reply
            except MimeError as exc:
                log.info("%s: account=%s refused: broken MIME: %s", queue_id, session.account, exc)
                return f"554 5.6.0 Message refused: malformed MIME ({_one_line(str(exc))})"
            except RecursionError:
                # the stdlib MIME parser recurses once per multipart level: ~1000 levels exhaust the stack.
                # The message is the problem, not us: a permanent refusal, not the 451 of our own bugs.
                log.info("%s: account=%s refused: MIME nested too deeply", queue_id, session.account)
                return MIME_TOO_DEEP
            except AllDropped as exc:
                return exc.reply
            except StorageError as exc:
                log.error("%s: account=%s policy store failed: %s", queue_id, session.account, exc)
                return POLICY_UNAVAILABLE
            if not done.recipients:
                # only spam traps: answer as for any message (the same checks ran), deliver nothing
                log.info("%s: account=%s every recipient dropped at RCPT", queue_id, session.account)
                await self._judge_traps(queue_id, session.account, done.trap_hits)
                return f"250 2.0.0 Ok: queued as {queue_id}"
            msg = NewMessage(
                queue_id=queue_id,
                account=session.account,
                mail_from=envelope.mail_from,
                recipients=done.recipients,
                data=received + done.content,  # with the Date and Message-ID it lacked
                list_name=done.list_name,
                render=True,  # each recipient's copy is made at delivery (relayd.policy.render)
                msg_class=done.msg_class,
            )
        self.handoff.expect(queue_id, done.prepared if msg.render else None, len(msg.recipients))
        try:
            await self.queue.enqueue(msg, min_free=self.cfg.queue.min_free_space)  # 452, not a full disk
        except BaseException as exc:
            self.handoff.forget(queue_id)
            if not isinstance(exc, StorageError):
                raise
            log.error("%s: account=%s not queued: %s", queue_id, session.account, exc)
            if isinstance(exc, InsufficientStorage):  # 452: the client keeps its message
                return INSUFFICIENT_STORAGE
            return "451 4.3.0 Temporary storage failure, try again later"
        self.handoff.submitted(msg, time.time())
        log.info(
            "%s: accepted account=%s from=<%s> nrcpt=%d size=%d class=%s%s",
            queue_id,
            session.account,
            envelope.mail_from,
            len(msg.recipients),
            len(msg.data),
            msg.msg_class.value,
            CLIENT_GONE_NOTE if fate.lost else "",
            extra={
                "fields": {
                    "event": "submission",
                    "queue_id": queue_id,
                    "account": session.account,
                    "list": msg.list_name,
                    "class": msg.msg_class.value,
                    "outcome": "accepted",
                    "nrcpt": len(msg.recipients),
                    "size": len(msg.data),
                    "client": server.peer_ip,
                    "reply_sent": not fate.lost,
                }
            },
        )
        metrics.ACCOUNT_SENT.labels(session.account, msg.msg_class.value).inc(len(msg.recipients))
        if msg.render:  # after the commit: a suspension holds this message too
            await self._judge_traps(queue_id, session.account, done.trap_hits)
        return f"250 2.0.0 Ok: queued as {queue_id}"

    async def _judge_traps(self, queue_id: str, account: str, hits: int) -> None:
        """After spam-trap hits that count, judge the account (any hit may suspend it, DESIGN.md). The
        hits are on record already, so a failure here is logged: the next event judges again."""
        if not hits or self.pipeline is None:
            return
        try:
            await reputation.evaluate(
                self.pipeline.store, self.queue, self.cfg, account, dt.datetime.now(dt.UTC)
            )
        except StorageError as exc:
            log.error("%s: account=%s reputation check after a trap hit failed: %s", queue_id, account, exc)

    def _short_of_space(self, size: int) -> bool:
        """Postfix's queue_minfree, checked before any work is done for the message."""
        min_free = self.cfg.queue.min_free_space
        if min_free <= 0:
            return False
        try:
            return free_bytes(self.queue.path.parent) < min_free + size
        except OSError:
            return False  # can't tell: let the write itself decide (it answers 451/452 on failure)

    async def handle_exception(self, error: Exception) -> str:
        log.exception("submission session failed")
        return "451 4.3.0 Internal error, try again later"

    def _received(self, server: StrictSMTP, session: RelaySession, queue_id: str) -> bytes:
        """The one trace header we add (RFC 5321 §4.4), folded to stay well under 78 columns."""
        proto = "ESMTP" if session.extended_smtp else "SMTP"
        if session.ssl is not None:
            proto += "S"
        if session.authenticated:
            proto += "A"
        helo = (session.host_name or "unknown").replace("\r", "").replace("\n", "")[:255]
        return (
            f"Received: from {helo} ([{server.peer_ip}])\r\n"
            f"\tby {self.cfg.server.hostname} (relayd) with {proto} id {queue_id};\r\n"
            f"\t{email.utils.formatdate(localtime=False)}\r\n"
        ).encode("ascii", "replace")


class _DataReply:
    """Whether the reply to a DATA can still reach its client: not once aiosmtpd has cancelled the
    session because the client closed the connection (:meth:`SubmissionHandler.handle_DATA`)."""

    __slots__ = ("lost",)

    def __init__(self) -> None:
        self.lost = False


def _outcome(reply: str) -> tuple[str, str]:
    """(accepted|refused|deferred, reason) of a DATA reply, for the submissions counter."""
    if reply.startswith("250"):
        return "accepted", "ok"
    if reply.startswith("554 5.6.0"):
        return "refused", "mime"
    if "dropped by policy" in reply:
        return "refused", "policy"
    if reply.startswith(
        ("550 5.6.0", "550 5.7.1 From:", "550 5.7.1 Sender:", "550 5.7.1 X-Relayd-Class:", "554 5.7.1")
    ):
        # a content rule (relayd.policy.rules.fromheader, relayd.policy.rules.messageclass,
        # relayd.policy.rules.confirmlink)
        return "refused", "content"
    if reply.startswith("4"):
        return "deferred", "policy_store" if "policy" in reply else "storage"
    return "refused", "other"


def _one_line(text: str, limit: int = 200) -> str:
    return " ".join(text.split())[:limit]


def tls_context(cfg: Config) -> ssl.SSLContext | None:
    sub = cfg.submission
    if sub.tls_cert is None or sub.tls_key is None:
        return None
    return listener_tls_context(sub.tls_cert, sub.tls_key)


async def start_submission(
    cfg: Config, handler: SubmissionHandler, limits: ConnectionLimits, *, reuse_port: bool = False
) -> list[asyncio.Server]:
    """Bind every ``[submission] listen`` address; return the servers (closing them stops accepting)."""
    loop = asyncio.get_running_loop()
    sub = cfg.submission
    handler.tls_context = tls_context(cfg)
    servers = []
    for spec in sub.listen:
        host, port = parse_hostport(spec)
        plaintext_ok = sub.plaintext_auth == "loopback" and is_loopback_host(host)
        factory = _protocol_factory(cfg, handler, limits, implicit_tls=False, plaintext_ok=plaintext_ok)
        servers.append(
            await loop.create_server(
                factory, host=host, port=port, reuse_address=True, reuse_port=reuse_port, backlog=BACKLOG
            )
        )
    return servers


async def start_submission_tls(
    cfg: Config, handler: SubmissionHandler, limits: ConnectionLimits, *, reuse_port: bool = False
) -> list[asyncio.Server]:
    """Bind every ``[submission] listen_tls`` address (implicit TLS); return the servers. Called after
    :func:`start_submission`, which loads the certificate (``handler.tls_context``) these listeners serve;
    the config loader refuses ``listen_tls`` without one."""
    sub = cfg.submission
    if not sub.listen_tls:
        return []
    loop = asyncio.get_running_loop()
    session = _protocol_factory(cfg, handler, limits, implicit_tls=True, plaintext_ok=False)
    # connections still in their handshake are limited like sessions, but counted apart from them
    handshakes = ConnectionLimits(limits.total, limits.per_ip)

    def factory() -> _ImplicitTls:
        return _ImplicitTls(session, handler, handshakes)

    servers = []
    for spec in sub.listen_tls:
        host, port = parse_hostport(spec)
        servers.append(
            await loop.create_server(
                factory, host=host, port=port, reuse_address=True, reuse_port=reuse_port, backlog=BACKLOG
            )
        )
    return servers


class _ImplicitTls(asyncio.Protocol):
    """Puts the TLS layer under an implicit-TLS connection as it is accepted; the SMTP session sits on it.

    ``create_server(ssl=...)`` would show a connection to the protocol only once its handshake is over:
    a client that connects and never finishes one would be counted by no limit, and the listening context
    could not follow a certificate reload. Here each connection is counted by ``handshakes`` (per client
    and in total) from accept until its handshake ends, the handshake is bounded by
    :data:`TLS_HANDSHAKE_TIMEOUT`, one over the limit is closed at once (there is no plaintext reply on a
    TLS port), and each handshake uses ``handler.tls_context`` as it is then: the STARTTLS context,
    replaced whole by ``Daemon.reload``.

    The TLS layer is asyncio's ``SSLProtocol``, put in place before the transport reads a byte (as
    aiosmtpd does for STARTTLS; ``loop.start_tls`` is awaited, and uvloop starts reading as soon as
    ``connection_made`` returns, so the ClientHello would reach the wrong protocol). The session's
    ``connection_made`` runs once the handshake is done, as with ``create_server(ssl=...)``."""

    def __init__(
        self,
        session: Callable[[], SubmissionSMTP],
        handler: SubmissionHandler,
        handshakes: ConnectionLimits,
    ) -> None:
        self._session = session
        self._handler = handler
        self._handshakes = handshakes

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, so a cast, not isinstance()
        tcp = cast(asyncio.Transport, transport)
        peer = tcp.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, tuple) else "unknown"
        context = self._handler.tls_context
        refusal = self._handshakes.admit(ip)
        if refusal is not None or context is None:
            log.warning("%s: implicit TLS connection closed: %s", ip, refusal or "no certificate loaded")
            if refusal is None:
                self._handshakes.release(ip)
            tcp.abort()
            return
        loop = asyncio.get_running_loop()
        handshake: asyncio.Future[None] = loop.create_future()
        handshake.add_done_callback(functools.partial(self._handshake_over, ip))
        tls = sslproto.SSLProtocol(
            loop,
            self._session(),
            context,
            handshake,
            server_side=True,
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT,
        )
        tcp.set_protocol(tls)
        tls.connection_made(tcp)

    def _handshake_over(self, ip: str, handshake: asyncio.Future[None]) -> None:
        """Done, failed (bad ClientHello, old protocol version), timed out, or the client left: the
        connection no longer counts as a handshake. A failure closed the connection already."""
        self._handshakes.release(ip)
        if not handshake.cancelled() and (exc := handshake.exception()) is not None:
            log.debug("%s: implicit TLS handshake failed: %s", ip, exc)


def _protocol_factory(
    cfg: Config,
    handler: SubmissionHandler,
    limits: ConnectionLimits,
    *,
    implicit_tls: bool,
    plaintext_ok: bool,
) -> Callable[[], SubmissionSMTP]:
    """One listener's protocol factory. ``implicit_tls``: the transport is TLS already (the protocol only
    sees a connection once its handshake is done), so STARTTLS is not offered and AUTH is."""
    sub = cfg.submission

    def factory() -> SubmissionSMTP:
        return SubmissionSMTP(
            handler,
            limits=limits,
            data_timeout=sub.data_timeout,
            max_errors=sub.max_errors,
            normalize_bare_lf=sub.bare_newline == "normalize",
            on_close=handler.connection_closed,
            hostname=cfg.server.hostname,
            ident="relayd",
            data_size_limit=sub.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            # read per connection: SIGHUP may have replaced it
            tls_context=None if implicit_tls else handler.tls_context,
            require_starttls=False,
            timeout=sub.command_timeout,
            auth_required=False,
            auth_require_tls=not (plaintext_ok or implicit_tls),
            auth_exclude_mechanism=[] if sub.auth_required else ["LOGIN", "PLAIN"],
        )

    return factory
