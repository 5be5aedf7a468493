"""Discard patterns and spam traps: addresses no account may mail.

Patterns are globs (``*`` any run, ``?`` one character) on the whole normalised address (``*@*.invalid``,
``abuse@*``), or regular
expressions when written ``re:<pattern>`` (anchored: the whole address must match). Global patterns come
from ``[policy] discard_patterns``, per-account ones from ``[accounts.NAME] discard_patterns``.

A discard-pattern hit is refused at RCPT (``550 5.7.1``): the sender should fix its list. A spam-trap hit is
*accepted and dropped*: telling the sender which address is a trap would teach list-washers to avoid it,
and the hit counts against the account (DESIGN.md: any spam-trap hit suspends) -- unless the message is a
confirmation mail (double opt-in), whose recipient is whatever someone typed into a sign-up form: that hit
is recorded as ``spamtrap:optin`` and counts for nothing, or anyone could suspend a customer by typing a
known trap into its form. The hit is recorded when the message is accepted (relayd.policy.pipeline).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from relayd.policy.model import Action, RcptRequest, Verdict


def compile_patterns(patterns: Iterable[str]) -> re.Pattern[str] | None:
    """One regex for a list of globs and ``re:`` patterns (case-insensitive); None for an empty list.

    Raises ``re.error`` on a bad ``re:`` pattern (config validation reports it)."""
    parts = []
    for pat in patterns:
        if pat.startswith("re:"):
            re.compile(pat[3:])
            parts.append(f"(?:{pat[3:]})")
        else:
            parts.append("(?:" + re.escape(pat.lower()).replace(r"\*", ".*").replace(r"\?", ".") + ")")
    if not parts:
        return None
    return re.compile(r"\A(?:" + "|".join(parts) + r")\Z", re.IGNORECASE)


class DiscardRule:
    name = "discard"

    def __init__(self, global_patterns: Iterable[str], per_account: Mapping[str, Iterable[str]]) -> None:
        self._global = compile_patterns(global_patterns)
        self._accounts = {acct: compile_patterns(pats) for acct, pats in per_account.items()}

    async def check(self, req: RcptRequest) -> Verdict | None:
        for rx in (self._global, self._accounts.get(req.account)):
            if rx is not None and rx.match(req.address):
                return Verdict(
                    Action.REJECT,
                    self.name,
                    "discard",
                    f"550 5.7.1 <{req.address}>: recipient refused by policy (discard)",
                )
        return None


#: drop reason of a spam-trap hit; these events count against the account (relayd.feedback.reputation)
TRAP_REASON = "spamtrap"
#: drop reason of a trap hit by a confirmation mail (double opt-in): recorded, never counted, since the
#: address came from whoever filled in the sender's sign-up form (relayd.policy.pipeline)
OPTIN_TRAP_REASON = "spamtrap:optin"


class SpamtrapRule:
    name = "spamtrap"

    def __init__(self, traps: Iterable[str]) -> None:
        self._exact = {t.lower() for t in traps if not any(c in t for c in "*?") and not t.startswith("re:")}
        self._patterns = compile_patterns(t for t in traps if t.lower() not in self._exact)

    async def check(self, req: RcptRequest) -> Verdict | None:
        addr = req.address.lower()
        if addr in self._exact or (self._patterns is not None and self._patterns.match(addr)):
            return Verdict(Action.DROP, self.name, TRAP_REASON, "250 2.1.5 Ok")
        return None
