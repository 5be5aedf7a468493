"""Each policy rule on its own, without a daemon: built directly on a real SQLite store and a config read
from TOML, asked one question, and held to its verdict (rule name, reason and the exact SMTP reply).

One class per module of ``relayd/policy/rules/`` and one for the check at dequeue. The end-to-end suites
(``test_policy_e2e.py``, ``test_consent.py``) show the rules in their order behind a listener; these show
what each rule alone lets through (``None`` or no entry) and refuses, so a rule that changes its mind
fails here, next to its name.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import tomllib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path

import pytest

from relayd.config import CapsConfig, Config
from relayd.core.models import DueRecipient
from relayd.core.msgclass import MessageClass
from relayd.mail.dkim import Signer
from relayd.policy.dequeue import SEND, Decision, DequeueCheck, DequeueVerdict
from relayd.policy.model import Action, ContentRequest, MessageRequest, RcptRequest, Verdict
from relayd.policy.pipeline import Pipeline
from relayd.policy.rules.caps import DAY, MONTH, WEEK, CapsRule, cap_windows
from relayd.policy.rules.confirmlink import ConfirmLinkRule
from relayd.policy.rules.consent import OPTIN_WINDOW, ConsentRule
from relayd.policy.rules.discard import (
    OPTIN_TRAP_REASON,
    TRAP_REASON,
    DiscardRule,
    SpamtrapRule,
    compile_patterns,
)
from relayd.policy.rules.fromheader import FromHeaderRule
from relayd.policy.rules.messageclass import MessageClassRule, message_class, strip_class_field
from relayd.policy.rules.missingfields import add_missing_fields
from relayd.policy.rules.suppression import (
    ListSuppressionRule,
    SuppressionRule,
    TransactionalSuppressionRule,
    transactional_passes,
)
from relayd.policy.rules.suspension import SUSPENDED_REPLY, AccountGate
from relayd.store import Reason, Scope, SentRecord, SqliteStore, SuppressionEntry, SuspendReason
from relayd.store.models import ConsentRecord

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)

CONFIG = """
[accounts.acme]
domains = ["acme.test"]
networks = ["127.0.0.1/32"]
imprint = "ACME Ltd, 1 Test Street"
transactional = true
discard_patterns = ["*@rival.test"]

[accounts.acme.lists.news]
require_consent = true

[accounts.acme.lists.promo]
caps = { day = 1 }

[accounts.beta]
domains = ["beta.test"]
networks = ["127.0.0.2/32"]
allow_subdomains = true
"""


def make_config(text: str = CONFIG) -> Config:
    return Config.model_validate(tomllib.loads(text))


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "relayd.db")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def entry(
    address: str,
    scope: Scope,
    reason: Reason,
    account: str | None = None,
    list_name: str | None = None,
) -> SuppressionEntry:
    return SuppressionEntry(address, scope, account, list_name, reason, "test", T0 - timedelta(days=1))


def rcpt(address: str, account: str = "acme") -> RcptRequest:
    return RcptRequest(account, address, T0)


def message(
    list_name: str | None,
    *,
    account: str = "acme",
    now: datetime = T0,
    caps: dict[int, int] | None = None,
) -> MessageRequest:
    return MessageRequest(
        queue_id="agrasmy74a7h54gd",
        account=account,
        mail_from=f"app@{account}.test",
        recipients=(),
        list_name=list_name,
        campaign=None,
        now=now,
        caps=caps or {},
    )


def content(raw: bytes, account: str = "acme", *, optin: bool = False) -> ContentRequest:
    headers: Message = BytesHeaderParser(policy=compat32).parsebytes(raw)
    return ContentRequest(account, headers, raw, optin)


def mail(*fields: str, body: str = "Hello.\r\n") -> bytes:
    return ("".join(f"{f}\r\n" for f in fields) + "\r\n" + body).encode()


# --- caps ------------------------------------------------------------------------------------------------


async def send(store: SqliteStore, req: MessageRequest, recipients: tuple[str, ...]) -> dict[str, Verdict]:
    """The caps rule as the pipeline runs it: its check, then the ledger rows of the recipients it let
    through written with their counts (``record_sent(..., caps=)``); its verdicts."""
    verdicts = await CapsRule(store).check(req, recipients)
    kept = [r for r in recipients if r not in verdicts]
    records = [
        SentRecord(f"Q{req.now.timestamp():.0f}", i, req.account, req.list_name, r, req.now)
        for i, r in enumerate(kept)
    ]
    await store.record_sent(records, caps=req.caps)
    return verdicts


class TestCapsRule:
    """Per-list send caps over rolling windows, counted on accepted mail only (with its ledger rows)."""

    async def test_a_recipient_over_the_day_cap_is_refused_with_the_list_named(
        self, store: SqliteStore
    ) -> None:
        first = await send(store, message("promo", caps={DAY: 1}), ("a@x.test", "b@x.test"))
        assert first == {}
        again = await CapsRule(store).check(message("promo", caps={DAY: 1}), ("a@x.test", "c@x.test"))
        assert again == {
            "a@x.test": Verdict(
                Action.REJECT, "caps", "cap", "550 5.7.1 <a@x.test>: send cap of list promo reached"
            )
        }

    async def test_the_check_alone_counts_nothing(self, store: SqliteStore) -> None:
        """A message refused after the check (or never queued) must not use anyone's cap: on SQLite the
        count is made by the ledger write of the message, not by the check."""
        rule = CapsRule(store)
        for _ in range(3):
            assert await rule.check(message("promo", caps={DAY: 1}), ("a@x.test",)) == {}
        assert await store.count_sends("acme", "promo", ["a@x.test"], T0 - timedelta(days=1)) == {
            "a@x.test": 0
        }

    async def test_the_unnamed_list_is_named_none_in_the_reply(self, store: SqliteStore) -> None:
        assert await send(store, message(None, caps={DAY: 1}), ("a@x.test",)) == {}
        verdicts = await CapsRule(store).check(message(None, caps={DAY: 1}), ("a@x.test",))
        assert verdicts["a@x.test"].reply == "550 5.7.1 <a@x.test>: send cap of list (none) reached"

    async def test_only_accepted_mail_counts_against_the_window(self, store: SqliteStore) -> None:
        caps = {DAY: 1, WEEK: 2}

        async def refused(at: datetime) -> bool:
            return "w@x.test" in await send(store, message("promo", now=at, caps=caps), ("w@x.test",))

        assert not await refused(T0)
        assert await refused(T0 + timedelta(hours=12))  # over the day cap: refused, and not counted
        assert not await refused(T0 + timedelta(seconds=DAY))  # a refusal counted would make this 3 a week
        assert await refused(T0 + timedelta(days=2))  # 2 accepted in the week
        sent = await store.count_sends("acme", "promo", ["w@x.test"], T0 - timedelta(seconds=1))
        assert sent == {"w@x.test": 2}

    async def test_no_caps_means_no_opinion_and_nothing_counted(self, store: SqliteStore) -> None:
        rule = CapsRule(store)
        for _ in range(3):
            assert await rule.check(message("promo"), ("n@x.test",)) == {}
        assert await store.count_sends("acme", "promo", ["n@x.test"], T0 - timedelta(days=1)) == {
            "n@x.test": 0
        }

    def test_cap_windows_keeps_the_configured_windows(self) -> None:
        assert cap_windows(CapsConfig(day=1, month=5)) == {DAY: 1, MONTH: 5}
        assert cap_windows(CapsConfig()) == {}
        assert cap_windows(make_config().accounts["acme"].lists["promo"].caps) == {DAY: 1}


# --- discard patterns and spam traps ---------------------------------------------------------------------


class TestDiscardRule:
    """Globs (and ``re:`` patterns) on the whole address, global and per account: refused at RCPT."""

    def rule(self, *patterns: str) -> DiscardRule:
        cfg = make_config()
        return DiscardRule(patterns, {n: a.discard_patterns for n, a in cfg.accounts.items()})

    async def test_a_global_glob_refuses_with_the_discard_reply(self) -> None:
        verdict = await self.rule("*@*.invalid").check(rcpt("x@host.invalid"))
        assert verdict == Verdict(
            Action.REJECT,
            "discard",
            "discard",
            "550 5.7.1 <x@host.invalid>: recipient refused by policy (discard)",
        )
        assert await self.rule("*@*.invalid").check(rcpt("x@host.test")) is None

    async def test_globs_are_anchored_at_both_ends(self) -> None:
        rule = self.rule("abuse@*", "*@x.invalid")
        assert await rule.check(rcpt("abuse@anything.test")) is not None
        assert await rule.check(rcpt("notabuse@anything.test")) is None
        assert await rule.check(rcpt("a@x.invalid")) is not None
        assert await rule.check(rcpt("a@x.invalid.example.test")) is None

    async def test_question_mark_is_one_character_and_case_is_ignored(self) -> None:
        rule = self.rule("bot?@x.test")
        assert await rule.check(rcpt("BOT1@X.TEST")) is not None
        assert await rule.check(rcpt("bot@x.test")) is None
        assert await rule.check(rcpt("bot12@x.test")) is None

    async def test_re_patterns_are_anchored_too(self) -> None:
        rule = self.rule(r"re:bad[0-9]+@x\.test")
        assert await rule.check(rcpt("bad12@x.test")) is not None
        assert await rule.check(rcpt("verybad1@x.test")) is None
        assert await rule.check(rcpt("bad1@x.test.example")) is None

    async def test_account_patterns_bind_only_their_account(self) -> None:
        rule = self.rule()
        verdict = await rule.check(rcpt("ceo@rival.test", account="acme"))
        assert verdict is not None and verdict.reason == "discard"
        assert await rule.check(rcpt("ceo@rival.test", account="beta")) is None

    def test_compile_patterns(self) -> None:
        assert compile_patterns([]) is None
        with pytest.raises(re.error):
            compile_patterns(["re:("])


class TestSpamtrapRule:
    """A trap hit is accepted with the very reply a real address gets, and dropped."""

    async def test_a_trap_is_dropped_with_an_ordinary_250(self) -> None:
        rule = SpamtrapRule(["Trap@Traps.test", "honey-*@traps.test"])
        hit = Verdict(Action.DROP, "spamtrap", TRAP_REASON, "250 2.1.5 Ok")
        assert await rule.check(rcpt("trap@traps.test")) == hit
        assert await rule.check(rcpt("TRAP@traps.TEST")) == hit
        assert await rule.check(rcpt("honey-42@traps.test")) == hit

    async def test_other_addresses_pass(self) -> None:
        rule = SpamtrapRule(["trap@traps.test", "honey-*@traps.test", r"re:pot[0-9]@traps\.test"])
        assert await rule.check(rcpt("trap2@traps.test")) is None
        assert await rule.check(rcpt("xhoney-1@traps.test")) is None
        assert await rule.check(rcpt("pot12@traps.test")) is None
        assert await rule.check(rcpt("pot1@traps.test")) is not None
        assert await SpamtrapRule([]).check(rcpt("trap@traps.test")) is None

    def test_reasons(self) -> None:
        assert (TRAP_REASON, OPTIN_TRAP_REASON) == ("spamtrap", "spamtrap:optin")


# --- suppression -----------------------------------------------------------------------------------------


class TestSuppressionRule:
    """RCPT: global and account entries; the list is not known yet."""

    async def test_a_global_hard_bounce_refuses_with_its_reason(self, store: SqliteStore) -> None:
        await store.add([entry("g@x.test", Scope.GLOBAL, Reason.HARD_BOUNCE)])
        rule = SuppressionRule(store)
        assert await rule.check(rcpt("g@x.test")) == Verdict(
            Action.REJECT,
            "suppression",
            "suppressed:hard_bounce",
            "550 5.7.1 <g@x.test>: suppressed (hard_bounce)",
        )
        assert await rule.check(rcpt("other@x.test")) is None

    async def test_list_entries_and_other_accounts_entries_do_not_count_at_rcpt(
        self, store: SqliteStore
    ) -> None:
        await store.add(
            [
                entry("l@x.test", Scope.LIST, Reason.UNSUBSCRIBE, "acme", "news"),
                entry("b@x.test", Scope.ACCOUNT, Reason.COMPLAINT, "beta"),
            ]
        )
        rule = SuppressionRule(store)
        assert await rule.check(rcpt("l@x.test")) is None
        assert await rule.check(rcpt("b@x.test")) is None
        verdict = await rule.check(rcpt("b@x.test", account="beta"))
        assert verdict is not None and verdict.reply == "550 5.7.1 <b@x.test>: suppressed (complaint)"

    async def test_the_broadest_scope_wins(self, store: SqliteStore) -> None:
        await store.add(
            [
                entry("p@x.test", Scope.ACCOUNT, Reason.UNSUBSCRIBE, "acme"),
                entry("p@x.test", Scope.GLOBAL, Reason.SPAMTRAP),
            ]
        )
        verdict = await SuppressionRule(store).check(rcpt("p@x.test"))
        assert verdict is not None and verdict.reason == "suppressed:spamtrap"

    async def test_transactional_accounts_leave_account_unsubscribes_to_data(
        self, store: SqliteStore
    ) -> None:
        await store.add(
            [
                entry("u@x.test", Scope.ACCOUNT, Reason.UNSUBSCRIBE, "acme"),
                entry("u@x.test", Scope.ACCOUNT, Reason.UNSUBSCRIBE, "beta"),
                entry("c@x.test", Scope.ACCOUNT, Reason.COMPLAINT, "acme"),
                entry("g@x.test", Scope.GLOBAL, Reason.UNSUBSCRIBE),
            ]
        )
        rule = SuppressionRule(store, ["acme"])
        assert await rule.check(rcpt("u@x.test")) is None  # acme may send transactional mail
        refused = await rule.check(rcpt("u@x.test", account="beta"))
        assert refused is not None and refused.reason == "suppressed:unsubscribe"
        complaint = await rule.check(rcpt("c@x.test"))
        assert complaint is not None and complaint.reason == "suppressed:complaint"
        assert await rule.check(rcpt("g@x.test")) is not None  # a global unsubscribe stops every mail


class TestListSuppressionRule:
    """DATA: every scope, the message's list included, for all recipients at once."""

    async def test_a_list_unsubscribe_refuses_that_list_only(self, store: SqliteStore) -> None:
        await store.add([entry("l@x.test", Scope.LIST, Reason.UNSUBSCRIBE, "acme", "news")])
        rule = ListSuppressionRule(store)
        verdicts = await rule.check(message("news"), ("l@x.test", "ok@x.test"))
        assert verdicts == {
            "l@x.test": Verdict(
                Action.REJECT,
                "suppression",
                "suppressed:unsubscribe",
                "550 5.7.1 <l@x.test>: suppressed (unsubscribe)",
            )
        }
        assert await rule.check(message("promo"), ("l@x.test",)) == {}
        assert await rule.check(message("news", account="beta"), ("l@x.test",)) == {}

    async def test_expired_entries_do_not_refuse(self, store: SqliteStore) -> None:
        gone = SuppressionEntry(
            "e@x.test",
            Scope.GLOBAL,
            None,
            None,
            Reason.MANUAL,
            "test",
            T0 - timedelta(days=2),
            T0 - timedelta(days=1),
        )
        await store.add([gone, entry("m@x.test", Scope.GLOBAL, Reason.MANUAL)])
        verdicts = await ListSuppressionRule(store).check(message("news"), ("e@x.test", "m@x.test"))
        assert set(verdicts) == {"m@x.test"}


class TestTransactionalSuppressionRule:
    """DATA, transactional mail: an unsubscribe of a list or of the account passes; nothing else does."""

    async def test_unsubscribes_pass_and_everything_else_refuses(self, store: SqliteStore) -> None:
        await store.add(
            [
                entry("list-unsub@x.test", Scope.LIST, Reason.UNSUBSCRIBE, "acme", "news"),
                entry("acct-unsub@x.test", Scope.ACCOUNT, Reason.UNSUBSCRIBE, "acme"),
                entry("global-unsub@x.test", Scope.GLOBAL, Reason.UNSUBSCRIBE),
                entry("complaint@x.test", Scope.LIST, Reason.COMPLAINT, "acme", "news"),
                entry("bounce@x.test", Scope.GLOBAL, Reason.HARD_BOUNCE),
            ]
        )
        recipients = (
            "list-unsub@x.test",
            "acct-unsub@x.test",
            "global-unsub@x.test",
            "complaint@x.test",
            "bounce@x.test",
            "ok@x.test",
        )
        verdicts = await TransactionalSuppressionRule(store).check(message("news"), recipients)
        assert {a: v.reason for a, v in verdicts.items()} == {
            "global-unsub@x.test": "suppressed:unsubscribe",
            "complaint@x.test": "suppressed:complaint",
            "bounce@x.test": "suppressed:hard_bounce",
        }
        assert verdicts["bounce@x.test"].reply == "550 5.7.1 <bounce@x.test>: suppressed (hard_bounce)"
        assert all(v.rule == "suppression" and v.action is Action.REJECT for v in verdicts.values())

    async def test_an_account_unsubscribe_does_not_hide_a_list_entry_below_it(
        self, store: SqliteStore
    ) -> None:
        await store.add(
            [
                entry("h@x.test", Scope.ACCOUNT, Reason.UNSUBSCRIBE, "acme"),
                entry("h@x.test", Scope.LIST, Reason.MANUAL, "acme", "news"),
            ]
        )
        rule = TransactionalSuppressionRule(store)
        verdicts = await rule.check(message("news"), ("h@x.test",))
        assert verdicts["h@x.test"].reply == "550 5.7.1 <h@x.test>: suppressed (manual)"
        assert await rule.check(message("promo"), ("h@x.test",)) == {}

    @pytest.mark.parametrize(
        ("scope", "reason", "passes"),
        [
            (Scope.LIST, Reason.UNSUBSCRIBE, True),
            (Scope.ACCOUNT, Reason.UNSUBSCRIBE, True),
            (Scope.GLOBAL, Reason.UNSUBSCRIBE, False),
            (Scope.ACCOUNT, Reason.COMPLAINT, False),
            (Scope.LIST, Reason.MANUAL, False),
            (Scope.GLOBAL, Reason.SOFT_BOUNCE_LIMIT, False),
        ],
    )
    def test_transactional_passes(self, scope: Scope, reason: Reason, passes: bool) -> None:
        account = None if scope is Scope.GLOBAL else "acme"
        list_name = "news" if scope is Scope.LIST else None
        assert transactional_passes(entry("t@x.test", scope, reason, account, list_name)) is passes


# --- suspension ------------------------------------------------------------------------------------------


class TestSuspension:
    """The gate holds the suspended accounts in memory; MAIL FROM of one gets ``550 5.7.1``."""

    async def test_a_suspension_takes_effect_at_the_next_refresh(self, store: SqliteStore) -> None:
        gate = AccountGate(store)
        await store.suspend("acme", SuspendReason.MANUAL, at=T0)
        assert not gate.is_suspended("acme")  # the cached set is read once a second, not per MAIL FROM
        assert await gate.refresh() == frozenset({"acme"})
        assert gate.is_suspended("acme") and not gate.is_suspended("beta")
        await store.reinstate("acme", at=T0)
        await gate.refresh()
        assert not gate.is_suspended("acme")

    async def test_a_store_failure_keeps_the_last_known_set(self, store: SqliteStore) -> None:
        gate = AccountGate(store)
        await store.suspend("acme", SuspendReason.SPAMTRAP, at=T0)
        await gate.refresh()
        await store.close()
        assert await gate.refresh() == frozenset({"acme"})
        assert gate.is_suspended("acme")

    async def test_mail_from_of_a_suspended_account_gets_550(self, store: SqliteStore) -> None:
        gate = AccountGate(store)
        pipeline = Pipeline(make_config(), store, b"s" * 32, Signer([]), gate)
        assert pipeline.check_sender("acme") is None
        await store.suspend("acme", SuspendReason.COMPLAINT_RATE, at=T0)
        await gate.refresh()
        assert pipeline.check_sender("acme") == SUSPENDED_REPLY == "550 5.7.1 account suspended"
        assert pipeline.check_sender("beta") is None


# --- consent ---------------------------------------------------------------------------------------------


async def consent(store: SqliteStore, address: str, list_name: str = "news") -> None:
    await store.add_consent(
        [ConsentRecord("acme", list_name, address, T0 - timedelta(days=3), "192.0.2.1", None, "test")]
    )


class TestConsentRule:
    """Lists with ``require_consent`` mail only those who confirmed; a confirmation mail once a day."""

    async def test_a_required_list_refuses_recipients_without_consent(self, store: SqliteStore) -> None:
        await consent(store, "yes@x.test")
        verdicts = await ConsentRule(store, make_config()).check(message("news"), ("yes@x.test", "no@x.test"))
        assert verdicts == {
            "no@x.test": Verdict(
                Action.REJECT, "consent", "no_consent", "550 5.7.1 <no@x.test>: no consent for list news"
            )
        }

    async def test_lists_without_the_requirement_pass_everyone(self, store: SqliteStore) -> None:
        rule = ConsentRule(store, make_config())
        assert await rule.check(message("promo"), ("no@x.test",)) == {}
        assert await rule.check(message("unconfigured"), ("no@x.test",)) == {}
        assert await rule.check(message(None), ("no@x.test",)) == {}
        assert await rule.check(message("news", account="beta"), ("no@x.test",)) == {}

    async def test_a_consent_counts_for_its_own_list_only(self, store: SqliteStore) -> None:
        await consent(store, "p@x.test", list_name="promo")
        verdicts = await ConsentRule(store, make_config()).check(message("news"), ("p@x.test",))
        assert verdicts["p@x.test"].reason == "no_consent"

    async def test_a_confirmation_mail_passes_once_per_window(self, store: SqliteStore) -> None:
        await consent(store, "yes@x.test")
        rule = ConsentRule(store, make_config(), optin=True)
        assert await rule.check(message("news"), ("new@x.test", "yes@x.test")) == {}
        later = message("news", now=T0 + timedelta(hours=23))
        assert await rule.check(later, ("new@x.test", "yes@x.test")) == {
            "new@x.test": Verdict(
                Action.REJECT,
                "consent",
                "no_consent",
                "550 5.7.1 <new@x.test>: no consent for list news; "
                "a confirmation mail was sent less than 24 h ago",
            )
        }
        assert (
            await rule.check(message("news", now=T0 + timedelta(seconds=OPTIN_WINDOW)), ("new@x.test",)) == {}
        )

    async def test_the_optin_limit_applies_to_lists_without_the_requirement(self, store: SqliteStore) -> None:
        rule = ConsentRule(store, make_config(), optin=True)
        assert await rule.check(message("promo"), ("new@x.test",)) == {}
        assert set(await rule.check(message("promo"), ("new@x.test",))) == {"new@x.test"}


# --- header From and Sender ------------------------------------------------------------------------------


class TestFromHeaderRule:
    """Every From address and the Sender must be the account's; unreadable fields are refused."""

    def check(self, raw: bytes, account: str = "acme") -> Verdict | None:
        return FromHeaderRule(make_config()).check(content(raw, account))

    def test_the_accounts_own_domain_passes(self) -> None:
        assert self.check(mail("From: App <app@acme.test>", "To: a@x.test")) is None
        assert self.check(mail("From: app@ACME.test")) is None
        assert self.check(mail('From: "ceo@beta.test" <app@acme.test>')) is None  # a display name only

    def test_another_domain_is_refused_with_its_name(self) -> None:
        assert self.check(mail("From: CEO <ceo@beta.test>")) == Verdict(
            Action.REJECT,
            "from_header",
            "from_domain",
            "550 5.7.1 From: <ceo@beta.test>: beta.test is not a sending domain of account acme",
        )

    def test_subdomains_only_where_allowed(self) -> None:
        verdict = self.check(mail("From: app@news.acme.test"))
        assert verdict is not None and verdict.reason == "from_domain"
        assert self.check(mail("From: app@news.beta.test"), account="beta") is None

    def test_no_from_and_two_froms_are_malformed(self) -> None:
        assert self.check(mail("To: a@x.test")) == Verdict(
            Action.REJECT,
            "from_header",
            "from_missing",
            "550 5.6.0 Message refused: no From header field (RFC 5322 §3.6)",
        )
        assert self.check(mail("From: a@acme.test", "From: b@acme.test")) == Verdict(
            Action.REJECT,
            "from_header",
            "from_malformed",
            "550 5.6.0 Message refused: 2 From: fields (RFC 5322 §3.6 allows one)",
        )

    def test_an_address_read_two_ways_is_refused(self) -> None:
        verdict = self.check(mail("From: x@acme.test@beta.test"))
        assert verdict is not None
        assert verdict.reply == (
            "550 5.6.0 Message refused: From: field can't be read as a list of addresses (RFC 5322 §3.6.2)"
        )

    def test_several_authors_need_a_sender_of_the_account(self) -> None:
        two = "From: a@acme.test, b@acme.test"
        verdict = self.check(mail(two))
        assert verdict is not None and verdict.reason == "from_malformed"
        assert verdict.reply.endswith(
            "From: lists 2 addresses but there is no Sender: field (RFC 5322 §3.6.2)"
        )
        assert self.check(mail(two, "Sender: ops@acme.test")) is None
        foreign = self.check(mail(two, "Sender: ops@beta.test"))
        assert foreign is not None
        assert (
            foreign.reply
            == "550 5.7.1 Sender: <ops@beta.test>: beta.test is not a sending domain of account acme"
        )

    def test_an_account_removed_by_a_reload_is_left_to_the_listener(self) -> None:
        assert self.check(mail("From: ceo@beta.test"), account="gone") is None


# --- message class ---------------------------------------------------------------------------------------


class TestMessageClassRule:
    """``X-Relayd-Class``: bulk or transactional, the latter only for granted accounts."""

    def check(self, raw: bytes, account: str = "acme", *, optin: bool = False) -> Verdict | None:
        return MessageClassRule(make_config()).check(content(raw, account, optin=optin))

    def test_no_field_bulk_and_granted_transactional_pass(self) -> None:
        assert self.check(mail("From: a@acme.test")) is None
        assert self.check(mail("X-Relayd-Class: bulk"), account="beta") is None
        assert self.check(mail("X-Relayd-Class:  Transactional ")) is None

    def test_transactional_from_an_account_without_the_grant_is_refused(self) -> None:
        assert self.check(mail("X-Relayd-Class: transactional"), account="beta") == Verdict(
            Action.REJECT,
            "message-class",
            "message_class",
            "550 5.7.1 X-Relayd-Class: account beta may not send transactional mail",
        )

    def test_unknown_values_repeated_fields_and_confirmation_mails_are_refused(self) -> None:
        unknown = self.check(mail("X-Relayd-Class: urgent"))
        assert (
            unknown is not None
            and unknown.reply == '550 5.6.0 X-Relayd-Class: must be "bulk" or "transactional"'
        )
        twice = self.check(mail("X-Relayd-Class: bulk", "X-Relayd-Class: bulk"))
        assert twice is not None
        assert twice.reply == "550 5.6.0 X-Relayd-Class: more than one field; send one, bulk or transactional"
        optin = self.check(mail("X-Relayd-Class: transactional"), optin=True)
        assert optin is not None
        assert (
            optin.reply
            == "550 5.6.0 X-Relayd-Class: a confirmation mail (X-Relayd-Optin) can't be transactional"
        )
        assert self.check(mail("X-Relayd-Class: bulk"), optin=True) is None

    def test_the_class_read_and_the_field_removed(self) -> None:
        raw = mail("From: a@acme.test", "X-Relayd-Class:", "\tTransactional", "To: b@x.test")
        assert message_class(content(raw).headers) is MessageClass.TRANSACTIONAL
        assert message_class(content(mail("From: a@acme.test")).headers) is MessageClass.BULK
        assert strip_class_field(raw) == mail("From: a@acme.test", "To: b@x.test")
        untouched = mail("From: a@acme.test", body="X-Relayd-Class: transactional\r\n")
        assert strip_class_field(untouched) is untouched


# --- missing Date and Message-ID -------------------------------------------------------------------------


class TestAddMissingFields:
    """Date and Message-ID added on top when the field is absent, whatever an existing one holds."""

    def add(self, raw: bytes, hostname: str = "relay.example.test") -> bytes:
        return add_missing_fields(
            raw, content(raw).headers, queue_id="agrasmy74a7h54gd", hostname=hostname, now=T0
        )

    def test_both_missing_are_prepended(self) -> None:
        raw = mail("From: a@acme.test")
        assert self.add(raw) == (
            b"Date: Mon, 07 Dec 2026 12:00:00 +0000\r\n"
            b"Message-ID: <agrasmy74a7h54gd@relay.example.test>\r\n" + raw
        )

    def test_present_fields_are_kept_as_sent(self) -> None:
        raw = mail("From: a@acme.test", "Date:", "Message-ID: <x@y>")
        assert self.add(raw) is raw
        lower = mail("date: Mon, 07 Dec 2026 11:00:00 +0000", "message-id: <x@y>")
        assert self.add(lower) is lower
        only_id = mail("Date: Mon, 07 Dec 2026 11:00:00 +0000")
        assert self.add(only_id) == b"Message-ID: <agrasmy74a7h54gd@relay.example.test>\r\n" + only_id

    def test_the_hostname_is_made_a_dot_atom(self) -> None:
        raw = mail("Date: x")
        assert self.add(raw, hostname="bad host/ä").startswith(b"Message-ID: <agrasmy74a7h54gd@bad-host-->")
        assert self.add(raw, hostname="").startswith(b"Message-ID: <agrasmy74a7h54gd@localhost>")


# --- the confirm link of a confirmation mail -------------------------------------------------------------

PLACEMENT = (
    "554 5.7.1 Message refused: {{confirm_url}} may stand only as the whole href of an <a> in HTML or "
    "as a URL on its own in text, not in "
)


class TestConfirmLinkRule:
    """In a confirmation mail, ``{{confirm_url}}`` only where a person clicks."""

    def check(self, raw: bytes, *, optin: bool = True) -> Verdict | None:
        return ConfirmLinkRule().check(content(raw, optin=optin))

    def html(self, body: str) -> bytes:
        return mail("From: a@acme.test", "Content-Type: text/html; charset=utf-8", body=body)

    def test_a_link_a_person_clicks_passes(self) -> None:
        assert self.check(self.html('<p><a href="{{confirm_url}}">Confirm</a></p>\r\n')) is None
        assert self.check(mail("From: a@acme.test", body="Confirm: {{confirm_url}}\r\n")) is None
        assert self.check(mail("From: a@acme.test", body="Confirm: <{{confirm_url}}>\r\n")) is None

    def test_a_fetched_link_is_refused_with_its_place(self) -> None:
        assert self.check(self.html('<img src="{{confirm_url}}">\r\n')) == Verdict(
            Action.REJECT, "confirm_link", "confirm_link", PLACEMENT + "<img src>"
        )
        query = self.check(self.html('<a href="https://t.example/?u={{confirm_url}}">x</a>\r\n'))
        assert query is not None and query.reply == PLACEMENT + "<a href>"

    def test_text_glued_to_the_placeholder_and_headers_are_refused(self) -> None:
        glued = self.check(mail("From: a@acme.test", body="https://t.example/?u={{confirm_url}}\r\n"))
        assert glued is not None
        assert (
            glued.reply
            == PLACEMENT + "a text part, next to other characters (only a URL on its own is a link)"
        )
        header = self.check(mail("From: a@acme.test", "Subject: {{confirm_url}}"))
        assert header is not None and header.reply == PLACEMENT + "the Subject: header field"

    def test_mail_that_is_not_a_confirmation_mail_is_not_looked_at(self) -> None:
        assert self.check(self.html('<img src="{{confirm_url}}">\r\n'), optin=False) is None


# --- the check at dequeue --------------------------------------------------------------------------------


def due(
    address: str,
    account: str = "acme",
    list_name: str | None = "news",
    msg_class: MessageClass = MessageClass.BULK,
) -> DueRecipient:
    return DueRecipient(
        "agrasmy74a7h54gd", 0, address, 0, account, "app@acme.test", time.time(), list_name, msg_class
    )


class TestDequeueCheck:
    """Suppression (all scopes) and suspension asked again before each attempt."""

    async def test_an_address_suppressed_while_queued_is_dropped_with_an_event(
        self, store: SqliteStore
    ) -> None:
        await store.add([entry("l@x.test", Scope.LIST, Reason.UNSUBSCRIBE, "acme", "news")])
        check = DequeueCheck(store, AccountGate(store))
        assert await check.check(due("l@x.test")) == DequeueVerdict(Decision.DROP, "suppressed:unsubscribe")
        assert await check.check(due("ok@x.test")) is SEND
        assert await check.check(due("l@x.test", list_name="promo")) is SEND
        events = await store.events(T0, kind="dropped")
        assert [(e.address, e.reason, e.queue_id) for e in events] == [
            ("l@x.test", "suppressed:unsubscribe", "agrasmy74a7h54gd")
        ]
        assert json.loads(events[0].evidence)["rule"] == "dequeue-suppression"

    async def test_transactional_mail_passes_unsubscribes_only(self, store: SqliteStore) -> None:
        await store.add(
            [
                entry("u@x.test", Scope.ACCOUNT, Reason.UNSUBSCRIBE, "acme"),
                entry("b@x.test", Scope.GLOBAL, Reason.HARD_BOUNCE),
            ]
        )
        check = DequeueCheck(store, AccountGate(store))
        tx = MessageClass.TRANSACTIONAL
        assert await check.check(due("u@x.test", msg_class=tx)) is SEND
        assert await check.check(due("u@x.test")) == DequeueVerdict(Decision.DROP, "suppressed:unsubscribe")
        assert await check.check(due("b@x.test", msg_class=tx)) == DequeueVerdict(
            Decision.DROP, "suppressed:hard_bounce"
        )

    async def test_a_suspended_accounts_mail_is_held_until_reinstated(self, store: SqliteStore) -> None:
        gate = AccountGate(store)
        check = DequeueCheck(store, gate)
        await store.suspend("acme", SuspendReason.MANUAL, at=T0)
        await gate.refresh()
        assert await check.check(due("a@x.test")) == DequeueVerdict(Decision.HOLD, "suspended")
        assert await check.check(due("a@x.test", account="beta")) is SEND
        await store.reinstate("acme", at=T0)  # the gate still has the old set: the store is asked
        assert gate.is_suspended("acme")
        assert await check.check(due("a@x.test")) is SEND

    async def test_a_store_outage_delivers_on_the_last_known_state(self, store: SqliteStore) -> None:
        await store.add([entry("g@x.test", Scope.GLOBAL, Reason.HARD_BOUNCE)])
        gate = AccountGate(store)
        await store.suspend("beta", SuspendReason.MANUAL, at=T0)
        await gate.refresh()
        check = DequeueCheck(store, gate)
        await store.close()
        verdicts = await asyncio.gather(
            check.check(due("g@x.test")), check.check(due("a@x.test", account="beta"))
        )
        assert list(verdicts) == [SEND, DequeueVerdict(Decision.HOLD, "suspended")]
