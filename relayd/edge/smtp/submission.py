"""The submission listener: applications hand us mail here.

Relay control comes first and stands apart from policy (Postfix's ``smtpd_relay_restrictions``): a client
that is neither authenticated nor inside an account's ``networks`` can do nothing but AUTH (``530 5.7.0``),
and an account may only use its own sending domains in MAIL FROM (``553 5.7.1``; the header From and
Sender are held to the same :meth:`~relayd.config.AccountConfig.sends_as` at DATA by
:mod:`relayd.policy.rules.fromheader`). Nothing here can make relayd an open relay, whatever the policy rules
later say.

The ``250`` after DATA is sent only when the queue's commit holding the message has returned; a storage
error answers ``451 4.3.0`` and the client keeps the message (:mod:`relayd.edge.smtp.accept`).

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
import functools
import logging
import ssl
from collections.abc import Callable
from typing import Any, cast

from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword

from relayd.config import Config, is_loopback_host
from relayd.core.address import AddressError, normalize
from relayd.core.errors import StorageError
from relayd.core.passwords import Credential, PasswordChecker, PlainPassword, parse_hash
from relayd.edge.ratelimit import TOO_MANY_FAILURES, AuthGuard, AuthVerdict
from relayd.edge.smtp.accept import POLICY_UNAVAILABLE, DataHooks
from relayd.edge.smtp.limits import ConnectionLimits
from relayd.edge.smtp.protocol import (
    RelayEnvelope,
    RelaySession,
    StrictSMTP,
    listen,
    listener_tls_context,
)
from relayd.policy.model import Action
from relayd.policy.pipeline import Pipeline
from relayd.policy.reloaded import Reloaded
from relayd.queue.handoff import Handoff
from relayd.queue.store import QueueStore

log = logging.getLogger(__name__)

AUTH_REQUIRED = "530 5.7.0 Authentication required"
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


class SubmissionHandler(DataHooks):
    """aiosmtpd hooks for the submission listener (one instance shared by all connections); DATA is
    :class:`~relayd.edge.smtp.accept.DataHooks`."""

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
        #: STARTTLS context for new connections; set by start_submission, replaced by :meth:`reload`
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

    def reload(self, new: Reloaded) -> None:
        """Swap config and policy (SIGHUP); sessions in progress use them from their next command on, and
        new STARTTLS and implicit-TLS handshakes the re-read certificate (both kinds of listener read
        :attr:`tls_context` for each new connection). The new policy shares the old one's store, secret,
        account gate and renderer."""
        cfg = new.cfg
        credentials = self._read_passwords(cfg)
        old = self.pipeline
        if old is not None:
            self.pipeline = Pipeline(cfg, old.store, old.secret, new.signer, old.gate, old.renderer)
        self.cfg, self.tls_context = cfg, new.submission_tls
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

    async def handle_exception(self, error: Exception) -> str:
        log.exception("submission session failed")
        return "451 4.3.0 Internal error, try again later"


def tls_context(cfg: Config) -> ssl.SSLContext | None:
    sub = cfg.submission
    if sub.tls_cert is None or sub.tls_key is None:
        return None
    return listener_tls_context(sub.tls_cert, sub.tls_key)


async def start_submission(
    cfg: Config, handler: SubmissionHandler, limits: ConnectionLimits, *, reuse_port: bool = False
) -> list[asyncio.Server]:
    """Bind every ``[submission] listen`` address; return the servers (closing them stops accepting)."""
    sub = cfg.submission
    handler.tls_context = tls_context(cfg)

    def factory_for(host: str) -> Callable[[], SubmissionSMTP]:
        plaintext_ok = sub.plaintext_auth == "loopback" and is_loopback_host(host)
        return _protocol_factory(cfg, handler, limits, implicit_tls=False, plaintext_ok=plaintext_ok)

    return await listen(sub.listen, factory_for, reuse_port=reuse_port)


async def start_submission_tls(
    cfg: Config, handler: SubmissionHandler, limits: ConnectionLimits, *, reuse_port: bool = False
) -> list[asyncio.Server]:
    """Bind every ``[submission] listen_tls`` address (implicit TLS); return the servers. Called after
    :func:`start_submission`, which loads the certificate (``handler.tls_context``) these listeners serve;
    the config loader refuses ``listen_tls`` without one."""
    sub = cfg.submission
    if not sub.listen_tls:
        return []
    session = _protocol_factory(cfg, handler, limits, implicit_tls=True, plaintext_ok=False)
    # connections still in their handshake are limited like sessions, but counted apart from them
    handshakes = ConnectionLimits(limits.total, limits.per_ip)

    def factory() -> _ImplicitTls:
        return _ImplicitTls(session, handler, handshakes)

    return await listen(sub.listen_tls, lambda _host: factory, reuse_port=reuse_port)


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
