"""The policy pipeline: the ordered rules every submitted message passes, then the rewrite, then signing.

Order is data (Mailman's chains, Postfix's restriction lists): the tuples below are the order, the first
verdict for a recipient wins, and each verdict names its rule and reason. Stages:

    MAIL FROM  suspension                                       -> 550 5.7.1 account suspended
    RCPT       discard patterns, spam traps, suppression        -> 550 5.7.1 per recipient (traps: dropped)
    DATA       list suppression, consent, send caps             -> recipient dropped, event recorded
               (all recipients dropped -> 550 5.7.1)
    rewrite    strip forged headers; List-Unsubscribe + One-Click, Feedback-ID, X-Relayd-ID;
               unsubscribe link + imprint in every text part    -> broken MIME: 554 5.6.0
    sign       DKIM, per recipient, on the exact bytes delivered (last)

Every drop is an event (DESIGN.md drop reasons). Store failures raise :class:`StoreError`: the listener
answers 451 and the client keeps its message; a policy we could not evaluate never means "accept".
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email.parser import BytesHeaderParser
from email.policy import compat32

from relayd import metrics
from relayd.config import Config, ListConfig
from relayd.dkim import Signer
from relayd.policy.caps import CapsRule, cap_windows
from relayd.policy.consent import ConsentRule, confirm_url, optin_list, prepare_confirmation
from relayd.policy.discard import DiscardRule, SpamtrapRule
from relayd.policy.listid import campaign_id, list_name
from relayd.policy.model import MessageRequest, MessageRule, RcptRequest, RcptRule, Verdict
from relayd.policy.rewrite import (
    DEFAULT_HTML_TEMPLATE,
    DEFAULT_TEXT_TEMPLATE,
    FooterSpec,
    MimeError,
    format_feedback_id,
    prepare,
)
from relayd.policy.suppression import ListSuppressionRule, SuppressionRule
from relayd.policy.suspension import SUSPENDED_REPLY, AccountGate
from relayd.store.base import Event, SentRecord, Store
from relayd.tokens import make_token

log = logging.getLogger(__name__)

_BIG_MESSAGE = 256 * 1024

_HEADERS = BytesHeaderParser(policy=compat32)


@dataclass(frozen=True, slots=True)
class Processed:
    """What the queue gets: the recipients kept, and for each the exact bytes to deliver."""

    recipients: tuple[str, ...]
    rendered: tuple[bytes, ...]
    dropped: dict[str, Verdict]
    list_name: str | None


class AllDropped(Exception):
    """Every recipient of the message was dropped by policy; the reply is this 5xx."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


def unsubscribe_url(public_url: str, secret: bytes, queue_id: str, index: int, address: str) -> str:
    return f"{public_url.rstrip('/')}/u/{make_token(secret, 'unsub', queue_id, index, address)}"


def unsubscribe_mailto(domain: str, secret: bytes, queue_id: str, index: int, address: str) -> str:
    return f"unsubscribe+{make_token(secret, 'unsub', queue_id, index, address)}@{domain}"


def relayd_id(secret: bytes, queue_id: str, index: int, address: str) -> str:
    return make_token(secret, "trace", queue_id, index, address)


class Pipeline:
    def __init__(self, cfg: Config, store: Store, secret: bytes, signer: Signer, gate: AccountGate) -> None:
        self.cfg = cfg
        self.store = store
        self.secret = secret
        self.signer = signer
        self.gate = gate
        self.rcpt_rules: tuple[RcptRule, ...] = (
            DiscardRule(
                cfg.policy.discard_patterns, {n: a.discard_patterns for n, a in cfg.accounts.items()}
            ),
            SpamtrapRule(cfg.policy.spamtraps),
            SuppressionRule(store),
        )
        # --- consent (issue 9): after list suppression (an unsubscribe wins over consent), before caps ---
        self.message_rules: tuple[MessageRule, ...] = (
            ListSuppressionRule(store),
            ConsentRule(store, cfg),
            CapsRule(store),
        )
        #: confirmation mails (X-Relayd-Optin): the same order, the consent rule lets one per 24 h through
        self.optin_rules: tuple[MessageRule, ...] = (
            ListSuppressionRule(store),
            ConsentRule(store, cfg, optin=True),
            CapsRule(store),
        )
        # --- end consent ---
        self.unlisted_rules: tuple[MessageRule, ...] = (CapsRule(store),)  # no list: RCPT checked the rest

    # --- MAIL FROM and RCPT ----------------------------------------------------------------------------

    def check_sender(self, account: str) -> str | None:
        """The refusal reply for MAIL FROM, or None."""
        return SUSPENDED_REPLY if self.gate.is_suspended(account) else None

    async def check_rcpt(self, account: str, address: str, now: datetime) -> Verdict | None:
        """First verdict of the RCPT rules; rejections and drops are recorded as events."""
        req = RcptRequest(account, address, now)
        for rule in self.rcpt_rules:
            verdict = await rule.check(req)
            if verdict is not None:
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
    ) -> Processed:
        """Run the message rules, rewrite once, render and sign per recipient.

        Raises MimeError (554 5.6.0), AllDropped (550), StoreError (451)."""
        headers = _HEADERS.parsebytes(raw)
        lname = list_name(headers.get("List-Id"))
        # --- consent (issue 9): a confirmation mail is mail of the list its X-Relayd-Optin names ---------
        optin = optin_list(headers, lname)  # OptinHeaderError (a MimeError: 554 5.6.0) when malformed
        lname = optin or lname
        # --- end consent ---
        campaign = campaign_id(headers.get("X-Campaign-ID"))
        acct = self.cfg.accounts[account]
        list_cfg = acct.lists.get(lname or "", ListConfig())
        req = MessageRequest(
            queue_id=queue_id,
            account=account,
            mail_from=mail_from,
            recipients=tuple(recipients),
            list_name=lname,
            campaign=campaign,
            now=now,
            caps=cap_windows(list_cfg.caps),
        )
        # parse before any rule counts a send: a message we refuse must not use up anyone's cap
        feedback_id = format_feedback_id(
            campaign or "", lname or "", account, self.cfg.server.feedback_sender_id
        )
        if optin:  # consent (issue 9): {{confirm_url}} is the body's link
            template = prepare_confirmation(raw, acct.imprint, feedback_id)
        else:
            spec = FooterSpec(DEFAULT_TEXT_TEMPLATE, DEFAULT_HTML_TEMPLATE, acct.imprint)
            if len(raw) > _BIG_MESSAGE:
                # a multi-megabyte parse takes seconds of CPU: on a thread, the interpreter switches to the
                # event loop every few milliseconds, so other sessions' small messages keep moving
                template = await asyncio.to_thread(prepare, raw, spec, feedback_id)
            else:
                template = prepare(raw, spec, feedback_id)
        dropped: dict[str, Verdict] = {}
        remaining = tuple(dict.fromkeys(recipients))  # a recipient given twice gets one copy
        rules = self.optin_rules if optin else self.message_rules  # consent (issue 9)
        for rule in rules if lname else self.unlisted_rules:
            verdicts = await rule.check(req, remaining)
            dropped.update(verdicts)
            remaining = tuple(r for r in remaining if r not in verdicts)
        await self._record(now, account, lname, dropped, queue_id=queue_id)
        if not remaining:
            reasons = ", ".join(sorted({v.reason for v in dropped.values()}))
            raise AllDropped(f"550 5.7.1 all recipients dropped by policy ({reasons})")

        domain = self._signing_domain(account, headers.get("From"))
        inbound = self.cfg.inbound.domains[0]
        public = self.cfg.http.public_url
        rendered = []
        for i, rcpt in enumerate(remaining):
            body = template.render(
                unsubscribe_url=unsubscribe_url(public, self.secret, queue_id, i, rcpt),
                unsubscribe_mailto=unsubscribe_mailto(inbound, self.secret, queue_id, i, rcpt),
                relayd_id=relayd_id(self.secret, queue_id, i, rcpt),
                # consent (issue 9): the confirm link, tied to this ledger record (queue id, index)
                body_url=confirm_url(public, self.secret, queue_id, i, rcpt) if optin else None,
            )
            if domain:
                t0 = time.perf_counter()
                body = self.signer.sign(body, domain) + body
                metrics.DKIM_SECONDS.observe(time.perf_counter() - t0)
            rendered.append(body)
        await self.store.record_sent(
            SentRecord(queue_id, i, account, lname, rcpt, now) for i, rcpt in enumerate(remaining)
        )
        return Processed(remaining, tuple(rendered), dropped, lname)

    def _signing_domain(self, account: str, from_header: str | None) -> str | None:
        """d= is the From domain when we hold a key for it (DMARC alignment), else the account's
        ``signing_domain``; None (unsigned, logged) when neither has a key."""
        acct = self.cfg.accounts[account]
        _, addr = email.utils.parseaddr(from_header or "")
        from_domain = addr.rpartition("@")[2].lower().rstrip(".")
        keyed = self.signer.domains()
        if from_domain in keyed:
            return from_domain
        if acct.signing_domain and acct.signing_domain.lower() in keyed:
            return acct.signing_domain.lower()
        log.warning("account %s: no DKIM key for From domain %r; message left unsigned", account, from_domain)
        return None

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


__all__ = ["AllDropped", "MimeError", "Pipeline", "Processed"]
