"""DATA on the submission listener: the message through policy into the queue, then the reply.

The ``250`` is sent only when the queue's commit holding the message has returned; a storage error answers
``451 4.3.0`` and the client keeps the message. Each reply is made together with its
:class:`SubmissionOutcome`, which names what became of the message for the log line and the
``relayd_submissions_total`` counter; nothing reads the reply text back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import email.utils
import logging
import time
from enum import Enum

from relayd.config import Config
from relayd.core import metrics
from relayd.core.errors import StorageError
from relayd.core.tokens import new_queue_id
from relayd.edge.smtp.protocol import RelayEnvelope, RelaySession, StrictSMTP
from relayd.feedback import reputation
from relayd.policy.pipeline import AllDropped, MimeError, Pipeline, Refused
from relayd.policy.render import rebased
from relayd.queue.handoff import Handoff
from relayd.queue.store import InsufficientStorage, NewMessage, QueueStore, free_bytes
from relayd.store import SendsContended

log = logging.getLogger(__name__)

POLICY_UNAVAILABLE = "451 4.3.0 Temporary policy failure, try again later"
#: another message to one of these recipients took the last send of their cap after this one's check
#: (relayd.policy.rules.caps): tried again, the message gets the cap's real answer
CAP_CONTENDED = "451 4.7.1 Send cap in use by another message to the same recipient, try again later"
MIME_TOO_DEEP = "554 5.6.0 Message refused: MIME structure nested too deeply"
INSUFFICIENT_STORAGE = "452 4.3.1 Insufficient system storage"  # RFC 3463 §3.4; Postfix says the same
#: appended to the ``accepted`` line of a message whose client hung up before it could get our 250
CLIENT_GONE_NOTE = " (client gone before the 250: it will send this message again)"


class SubmissionOutcome(Enum):
    """What became of a DATA, named where its reply is made; the value is its ``(outcome, reason)`` labels
    of ``relayd_submissions_total``."""

    #: committed to the queue (or every recipient a spam trap: answered as if it were)
    ACCEPTED = ("accepted", "ok")
    #: malformed MIME, or MIME nested too deeply for the parser
    REFUSED_MIME = ("refused", "mime")
    #: a content rule (relayd.policy.rules.fromheader, relayd.policy.rules.messageclass,
    #: relayd.policy.rules.confirmlink)
    REFUSED_CONTENT = ("refused", "content")
    #: every recipient dropped by the message rules
    REFUSED_DROPPED = ("refused", "policy")
    #: the policy's store failed: 451, the client tries again
    DEFERRED_POLICY_STORE = ("deferred", "policy_store")
    #: a send cap's last send taken by another message meanwhile: 451, the client tries again
    DEFERRED_CAP = ("deferred", "cap_contended")
    #: the queue could not take the message (a failed commit, or short of space): 451 or 452
    DEFERRED_STORAGE = ("deferred", "storage")

    @property
    def labels(self) -> tuple[str, str]:
        """``(outcome, reason)``: accepted|refused|deferred, and why."""
        outcome, reason = self.value
        return str(outcome), str(reason)


class DataHooks:
    """The DATA hook of :class:`~relayd.edge.smtp.submission.SubmissionHandler`, which holds (and on
    SIGHUP replaces) the config and the policy read here."""

    cfg: Config
    queue: QueueStore
    #: who starts delivery of a committed message (relayd.queue.handoff)
    handoff: Handoff
    pipeline: Pipeline | None

    async def handle_DATA(self, server: StrictSMTP, session: RelaySession, envelope: RelayEnvelope) -> str:
        """Finish the message whose final dot has arrived, even if its client is gone meanwhile: the
        session's cancellation waits for this to end (StrictSMTP.connection_lost says why); the client
        never saw our ``250`` and will send the message again (RFC 5321 §4.1.1.4 leaves that duplicate
        to the sender): the ``accepted`` line says so."""
        started = time.perf_counter()
        reply, result = await self._data(server, session, envelope)
        outcome, reason = result.labels
        if result is not SubmissionOutcome.ACCEPTED:
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
        self, server: StrictSMTP, session: RelaySession, envelope: RelayEnvelope
    ) -> tuple[str, SubmissionOutcome]:
        """The reply to a DATA whose final dot has arrived, and what it means for the message."""
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
            return INSUFFICIENT_STORAGE, SubmissionOutcome.DEFERRED_STORAGE
        if not recipients and self.pipeline is None:
            log.info("%s: account=%s every recipient dropped at RCPT", queue_id, session.account)
            return f"250 2.0.0 Ok: queued as {queue_id}", SubmissionOutcome.ACCEPTED
        ledger: asyncio.Future[None] | None = None  # the sent ledger's write, the queue's goes after it
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
                return exc.reply, SubmissionOutcome.REFUSED_CONTENT
            except MimeError as exc:
                log.info("%s: account=%s refused: broken MIME: %s", queue_id, session.account, exc)
                reply = f"554 5.6.0 Message refused: malformed MIME ({_one_line(str(exc))})"
                return reply, SubmissionOutcome.REFUSED_MIME
            except RecursionError:
                # the stdlib MIME parser recurses once per multipart level: ~1000 levels exhaust the stack.
                # The message is the problem, not us: a permanent refusal, not the 451 of our own bugs.
                log.info("%s: account=%s refused: MIME nested too deeply", queue_id, session.account)
                return MIME_TOO_DEEP, SubmissionOutcome.REFUSED_MIME
            except AllDropped as exc:
                return exc.reply, SubmissionOutcome.REFUSED_DROPPED
            except StorageError as exc:
                log.error("%s: account=%s policy store failed: %s", queue_id, session.account, exc)
                return POLICY_UNAVAILABLE, SubmissionOutcome.DEFERRED_POLICY_STORE
            if not done.recipients:
                # only spam traps: answer as for any message (the same checks ran), deliver nothing
                log.info("%s: account=%s every recipient dropped at RCPT", queue_id, session.account)
                await self._judge_traps(queue_id, session.account, done.trap_hits)
                return f"250 2.0.0 Ok: queued as {queue_id}", SubmissionOutcome.ACCEPTED
            ledger = done.ledger
            # the message as submitted is not needed any more (done.content has what is queued): a big one
            # is not held twice while it is copied behind our Received field
            content = envelope.content = envelope.original_content = b""
            head, data = b"", done.content  # with the Date and Message-ID it lacked
            if self.handoff.keeps_bytes:  # delivery starts from these bytes: one buffer, shared
                data = received + data
                done = dataclasses.replace(
                    done, prepared=rebased(done.prepared, done.content, data, len(received)), content=b""
                )
            else:  # the queue writes both as they are
                head = received
            msg = NewMessage(
                queue_id=queue_id,
                account=session.account,
                mail_from=envelope.mail_from,
                recipients=done.recipients,
                data=data,
                list_name=done.list_name,
                render=True,  # each recipient's copy is made at delivery (relayd.policy.render)
                msg_class=done.msg_class,
                head=head,
            )
        self.handoff.expect(queue_id, done.prepared if msg.render else None, len(msg.recipients))
        try:
            # 452, not a full disk; one turn of the loop for the ledger's commit and the queue's
            await self.queue.enqueue(msg, min_free=self.cfg.queue.min_free_space, after=ledger)
        except BaseException as exc:
            self.handoff.forget(queue_id)
            if not isinstance(exc, StorageError):
                raise
            if ledger is not None and ledger.done() and exc is _failure(ledger):
                if isinstance(exc, SendsContended):
                    log.info("%s: account=%s deferred: %s", queue_id, session.account, exc)
                    return CAP_CONTENDED, SubmissionOutcome.DEFERRED_CAP
                log.error("%s: account=%s policy store failed: %s", queue_id, session.account, exc)
                return POLICY_UNAVAILABLE, SubmissionOutcome.DEFERRED_POLICY_STORE
            log.error("%s: account=%s not queued: %s", queue_id, session.account, exc)
            if isinstance(exc, InsufficientStorage):  # 452: the client keeps its message
                return INSUFFICIENT_STORAGE, SubmissionOutcome.DEFERRED_STORAGE
            return "451 4.3.0 Temporary storage failure, try again later", SubmissionOutcome.DEFERRED_STORAGE
        self.handoff.submitted(msg, time.time())
        log.info(
            "%s: accepted account=%s from=<%s> nrcpt=%d size=%d class=%s%s",
            queue_id,
            session.account,
            envelope.mail_from,
            len(msg.recipients),
            msg.size,
            msg.msg_class.value,
            CLIENT_GONE_NOTE if server.client_gone else "",
            extra={
                "fields": {
                    "event": "submission",
                    "queue_id": queue_id,
                    "account": session.account,
                    "list": msg.list_name,
                    "class": msg.msg_class.value,
                    "outcome": "accepted",
                    "nrcpt": len(msg.recipients),
                    "size": msg.size,
                    "client": server.peer_ip,
                    "reply_sent": not server.client_gone,
                }
            },
        )
        metrics.ACCOUNT_SENT.labels(session.account, msg.msg_class.value).inc(len(msg.recipients))
        if msg.render:  # after the commit: a suspension holds this message too
            await self._judge_traps(queue_id, session.account, done.trap_hits)
        return f"250 2.0.0 Ok: queued as {queue_id}", SubmissionOutcome.ACCEPTED

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


def _failure(write: asyncio.Future[None]) -> BaseException | None:
    return None if write.cancelled() else write.exception()


def _one_line(text: str, limit: int = 200) -> str:
    return " ".join(text.split())[:limit]
