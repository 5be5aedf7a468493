"""The policy pipeline: the ordered rules every submitted message passes, then the rewrite, then signing.

Order is data (Mailman's chains, Postfix's restriction lists): the tuples below are the order, the first
verdict for a recipient wins, and each verdict names its rule and reason. Stages:

    MAIL FROM  suspension                                       -> 550 5.7.1 account suspended
    RCPT       discard patterns, spam traps, suppression        -> 550 5.7.1 per recipient (traps: dropped)
    DATA       content: header From/Sender are the account's    -> 550 5.7.1 (none/unreadable: 550 5.6.0)
               content: X-Relayd-Class well-formed and granted  -> 550 5.6.0 / 550 5.7.1
               content: a confirmation mail's confirm link      -> 554 5.7.1
               list suppression, consent, send caps             -> recipient dropped, event recorded
               (transactional mail: suppression only, minus unsubscribes, relayd.policy.rules.messageclass)
               (all recipients dropped -> 550 5.7.1)
               spam traps met at RCPT are recorded once the message is accepted; a confirmation
               mail's hits don't count against the account (anyone can type a trap into a form)
    fields     Date and Message-ID added when absent, and queued so (relayd.policy.rules.missingfields);
               X-Relayd-Class removed (the class is queued beside the message)
    rewrite    strip forged headers; List-Unsubscribe + One-Click, Feedback-ID, X-Relayd-ID;
               unsubscribe link + imprint in every text part    -> broken MIME: 554 5.6.0
    render     per recipient at delivery (relayd.policy.render): the holes filled, then DKIM on the
               exact bytes delivered (last)

Every drop is an event (DESIGN.md drop reasons). Store failures raise :class:`StoreError`: the listener
answers 451 and the client keeps its message; a policy we could not evaluate never means "accept".
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from relayd.config import Config, ListConfig
from relayd.core import metrics
from relayd.core.msgclass import MessageClass
from relayd.mail.dkim import Signer
from relayd.mail.headers import check_parameter_counts
from relayd.mail.rewrite import MimeError
from relayd.policy.model import (
    Action,
    ContentRequest,
    ContentRule,
    MessageRequest,
    MessageRule,
    RcptRequest,
    RcptRule,
    Verdict,
)
from relayd.policy.render import (
    BIG_MESSAGE,
    Prepared,
    Renderer,
    prepare_message,
    read_meta,
)
from relayd.policy.rules.caps import CapsRule, cap_windows
from relayd.policy.rules.confirmlink import ConfirmLinkRule
from relayd.policy.rules.consent import ConsentRule
from relayd.policy.rules.discard import OPTIN_TRAP_REASON, TRAP_REASON, DiscardRule, SpamtrapRule
from relayd.policy.rules.fromheader import FromHeaderRule
from relayd.policy.rules.messageclass import MessageClassRule, class_values, message_class, strip_class_field
from relayd.policy.rules.missingfields import add_missing_fields
from relayd.policy.rules.suppression import ListSuppressionRule, SuppressionRule, TransactionalSuppressionRule
from relayd.policy.rules.suspension import SUSPENDED_REPLY, AccountGate
from relayd.store.models import Event, SentRecord
from relayd.store.protocols import Store

__all__ = ["AllDropped", "MimeError", "Pipeline", "Processed", "Refused"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Processed:
    """What the queue gets: the recipients kept, and the rewritten message each copy is made from at
    delivery (:class:`relayd.policy.render.Renderer`)."""

    queue_id: str
    recipients: tuple[str, ...]
    prepared: Prepared
    dropped: dict[str, Verdict]
    list_name: str | None
    #: spam-trap hits recorded for this message that count against the account (the listener then
    #: judges its reputation); a confirmation mail's hits are recorded but don't count
    trap_hits: int = 0
    #: the content to queue: as submitted, with the Date and Message-ID it lacked added on top
    #: (:mod:`relayd.policy.rules.missingfields`), so that a copy prepared again from the queue has the same
    #: ones
    content: bytes = field(kw_only=True)
    #: bulk or transactional (relayd.policy.rules.messageclass): queued with the message
    msg_class: MessageClass = field(default=MessageClass.BULK, kw_only=True)
    #: the sent ledger's write of ``recipients``, begun and perhaps not yet committed: the message is
    #: queued ``after`` it (relayd.queue.store.QueueStore.enqueue), which saves the accepting session a
    #: turn of the loop; whoever queues nothing awaits it. None when there are no recipients.
    ledger: asyncio.Future[None] | None = field(default=None, kw_only=True)


class AllDropped(Exception):
    """Every recipient of the message was dropped by policy; the reply is this 5xx."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


class Refused(Exception):
    """A content rule refused the whole message; the reply is its verdict's."""

    def __init__(self, verdict: Verdict) -> None:
        super().__init__(verdict.reply)
        self.verdict = verdict
        self.reply = verdict.reply


class Pipeline:
    def __init__(
        self,
        cfg: Config,
        store: Store,
        secret: bytes,
        signer: Signer,
        gate: AccountGate,
        renderer: Renderer | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.secret = secret
        self.signer = signer
        self.gate = gate
        #: makes each recipient's copy at delivery; the daemon shares one across reloads
        self.renderer = renderer or Renderer(cfg, secret, signer)
        self.rcpt_rules: tuple[RcptRule, ...] = (
            DiscardRule(
                cfg.policy.discard_patterns, {n: a.discard_patterns for n, a in cfg.accounts.items()}
            ),
            SpamtrapRule(cfg.policy.spamtraps),
            SuppressionRule(store, [n for n, a in cfg.accounts.items() if a.transactional]),
        )
        #: last wherever it runs: the sends it lets through are counted with the ledger rows of the message's
        #: remaining recipients (``record_sent(..., caps=)``), so no rule may drop one after it
        self.caps = CapsRule(store)
        # --- consent: after list suppression (an unsubscribe wins over consent), before caps ---
        self.message_rules: tuple[MessageRule, ...] = (
            ListSuppressionRule(store),
            ConsentRule(store, cfg),
            self.caps,
        )
        #: confirmation mails (X-Relayd-Optin): the same order, the consent rule lets one per 24 h through
        self.optin_rules: tuple[MessageRule, ...] = (
            ListSuppressionRule(store),
            ConsentRule(store, cfg, optin=True),
            self.caps,
        )
        # --- end consent ---
        self.unlisted_rules: tuple[MessageRule, ...] = (self.caps,)  # no list: RCPT checked the rest
        #: no list, account with transactional mail: RCPT left its account unsubscribes to DATA
        self.unlisted_checked_rules: tuple[MessageRule, ...] = (ListSuppressionRule(store), self.caps)
        #: transactional mail: suppression minus unsubscribes; no consent, no caps
        self.transactional_rules: tuple[MessageRule, ...] = (TransactionalSuppressionRule(store),)
        #: the whole message, before anything is counted or rewritten: the first refusal is the reply
        self.content_rules: tuple[ContentRule, ...] = (
            FromHeaderRule(cfg),
            MessageClassRule(cfg),
            ConfirmLinkRule(),
        )

    # --- MAIL FROM and RCPT ----------------------------------------------------------------------------

    def check_sender(self, account: str) -> str | None:
        """The refusal reply for MAIL FROM, or None."""
        return SUSPENDED_REPLY if self.gate.is_suspended(account) else None

    async def check_rcpt(self, account: str, address: str, now: datetime) -> Verdict | None:
        """First verdict of the RCPT rules; rejections are recorded as events now. A drop (a spam trap) is
        recorded by :meth:`process` once the message is accepted: only then is it known whether the
        message is a confirmation mail, and whether anything was sent to the trap at all."""
        req = RcptRequest(account, address, now)
        for rule in self.rcpt_rules:
            verdict = await rule.check(req)
            if verdict is not None:
                if verdict.action is not Action.DROP:
                    await self._record(now, account, None, {address: verdict}, queue_id=None)
                return verdict
        return None

    # --- DATA --------------------------------------------------------------------------------------------

    async def process(
        self,
        *,
        queue_id: str,
        account: str,
        mail_from: str,
        recipients: Sequence[str],
        raw: bytes,
        now: datetime,
        traps: Sequence[str] = (),
    ) -> Processed:
        """Run the content and message rules and rewrite the message once; each copy is made at delivery.

        ``Processed.content`` is what to queue: ``raw`` with the Date and Message-ID it lacked.
        ``Processed.ledger`` is the sent ledger's write of the kept recipients, begun, not awaited: the
        caller queues the message after it, or awaits it.
        ``traps`` are the recipients dropped at RCPT as spam traps: the message passes the same checks
        as any other (its reply tells nothing about which addresses are traps), and they are recorded
        once it is accepted. With no ``recipients`` left, nothing is counted and the result has none.

        Raises Refused (a content rule's reply), MimeError (554 5.6.0), AllDropped (550),
        StoreError (451)."""
        check_parameter_counts(raw)  # before any stdlib parse reads a parameter (MimeError: 554 5.6.0)
        meta = read_meta(raw)  # OptinHeaderError (a MimeError: 554 5.6.0) for a malformed X-Relayd-Optin
        content = ContentRequest(account, meta.headers, raw, meta.optin)
        if len(raw) > BIG_MESSAGE:
            refusal = await asyncio.to_thread(self._check_content, content)
        else:
            refusal = self._check_content(content)
        if refusal is not None:
            raise Refused(refusal)
        msg_class = message_class(meta.headers)
        if class_values(meta.headers):
            raw = strip_class_field(raw)  # an instruction to relayd: neither queued, signed nor sent
        raw = add_missing_fields(
            raw, meta.headers, queue_id=queue_id, hostname=self.cfg.server.hostname, now=now
        )
        lname = meta.list_name
        list_cfg = self.cfg.accounts[account].lists.get(lname or "", ListConfig())
        req = MessageRequest(
            queue_id=queue_id,
            account=account,
            mail_from=mail_from,
            recipients=tuple(recipients),
            list_name=lname,
            campaign=meta.campaign,
            now=now,
            caps=cap_windows(list_cfg.caps),
        )
        # rewrite before any rule counts a send: a message we refuse must not use up anyone's cap
        if len(raw) > BIG_MESSAGE:
            prepared = await asyncio.to_thread(
                prepare_message, self.cfg, self.signer, account, meta, raw, msg_class
            )
        else:
            prepared = prepare_message(self.cfg, self.signer, account, meta, raw, msg_class)
        if not recipients:  # spam traps only: the same answer as any message, nothing to send
            hits = await self._record_traps(now, account, lname, traps, meta.optin, queue_id)
            return Processed(
                queue_id, (), prepared, {}, lname, trap_hits=hits, content=raw, msg_class=msg_class
            )
        dropped: dict[str, Verdict] = {}
        remaining = tuple(dict.fromkeys(recipients))  # a recipient given twice gets one copy
        rules = self._message_rules(account, lname, meta.optin, msg_class)
        for rule in rules:
            verdicts = await rule.check(req, remaining)
            dropped.update(verdicts)
            remaining = tuple(r for r in remaining if r not in verdicts)
        await self._record(now, account, lname, dropped, queue_id=queue_id)
        if not remaining:
            reasons = ", ".join(sorted({v.reason for v in dropped.values()}))
            raise AllDropped(f"550 5.7.1 all recipients dropped by policy ({reasons})")
        if prepared.domain is None:
            _, addr = email.utils.parseaddr(meta.headers.get("From") or "")
            log.warning(
                "account %s: no DKIM key for From domain %r; message left unsigned",
                account,
                addr.rpartition("@")[2].lower(),
            )
        ledger = self.store.record_sent(
            (SentRecord(queue_id, i, account, lname, rcpt, now) for i, rcpt in enumerate(remaining)),
            caps=req.caps if self.caps in rules else None,  # the sends the caps rule let through, counted
        )
        ledger.add_done_callback(_observed)  # its error reaches whoever queues the message after it
        hits = await self._record_traps(now, account, lname, traps, meta.optin, queue_id)
        return Processed(
            queue_id,
            remaining,
            prepared,
            dropped,
            lname,
            trap_hits=hits,
            content=raw,
            msg_class=msg_class,
            ledger=ledger,
        )

    def _message_rules(
        self, account: str, lname: str | None, optin: bool, msg_class: MessageClass
    ) -> tuple[MessageRule, ...]:
        """The DATA rules for one message, by its class, list and kind."""
        if msg_class is MessageClass.TRANSACTIONAL:
            return self.transactional_rules
        if lname:
            return self.optin_rules if optin else self.message_rules  # a confirmation mail is checked as one
        if self.cfg.accounts[account].transactional:
            return self.unlisted_checked_rules
        return self.unlisted_rules

    def _check_content(self, req: ContentRequest) -> Verdict | None:
        """The first content rule's refusal, or None."""
        for rule in self.content_rules:
            verdict = rule.check(req)
            if verdict is not None:
                return verdict
        return None

    async def _record_traps(
        self,
        now: datetime,
        account: str,
        lname: str | None,
        traps: Sequence[str],
        optin: bool,
        queue_id: str,
    ) -> int:
        """Record the spam traps a message went to; returns how many count against the account.

        A confirmation mail's hits are recorded with reason ``spamtrap:optin`` and count for nothing
        (:func:`relayd.feedback.reputation.rates` counts reason ``spamtrap``): the address was typed into the
        sender's sign-up form by whoever filled it in, so counting it would let anyone suspend any
        customer with a form. The consent rule still allows only one confirmation mail per address a
        day, and the trap never gets one."""
        if not traps:
            return 0
        reason = OPTIN_TRAP_REASON if optin else TRAP_REASON
        hit = Verdict(Action.DROP, SpamtrapRule.name, reason, "250 2.1.5 Ok")
        await self._record(now, account, lname, dict.fromkeys(traps, hit), queue_id=queue_id)
        return 0 if optin else len(traps)

    def render(self, done: Processed, index: int) -> bytes:
        """Recipient ``index``'s copy of a processed message, as delivery makes it (without our
        ``Received`` field)."""
        return b"".join(self.renderer.copy(done.prepared, done.queue_id, index, done.recipients[index]))

    async def _record(
        self,
        now: datetime,
        account: str,
        lname: str | None,
        verdicts: dict[str, Verdict],
        *,
        queue_id: str | None,
    ) -> None:
        if not verdicts:
            return
        events = [
            Event(
                at=now,
                kind="dropped",
                account=account,
                list=lname,
                address=addr,
                reason=v.reason,
                queue_id=queue_id,
                evidence=json.dumps({"rule": v.rule, "reply": v.reply}),
            )
            for addr, v in verdicts.items()
        ]
        await self.store.record_events(events)
        for addr, v in verdicts.items():
            metrics.RECIPIENTS_DROPPED.labels(v.reason).inc()
            log.info(
                "%s: account=%s rcpt=<%s> %s by %s (%s)",
                queue_id or "-",
                account,
                addr,
                v.action.value,
                v.rule,
                v.reason,
            )


def _observed(write: asyncio.Future[None]) -> None:
    """Mark a write's error as seen: the queue write behind it raises it to the caller, and a message
    refused before it was queued (452, short of space) needs no word of it."""
    if not write.cancelled():
        write.exception()
