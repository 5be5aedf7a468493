"""Bounce reason classification: enhanced status code + reply code + command + text.

One pure function, :func:`decide`, turns the evidence about one failed recipient into a
sisimai (v5) reason name; :func:`is_hard` says whether that reason means the address
itself is bad. The same table serves DSNs and our own synchronous SMTP failures
(:func:`classify_reply`), so a 550 5.1.1 means the same thing wherever we meet it.

Order of evidence (after sisimai's ``reason.Find``):

1. success codes and Action: delivered/relayed/expanded -> ``delivered``;
2. a first ordered pass of *probes* which combine the status code's meaning with text
   patterns and the SMTP command the failure answered (a "user unknown" after DATA is a
   content filter speaking, not a missing mailbox);
3. the status code alone when it is specific, otherwise a second ordered pass over the
   text patterns, then coarse fallbacks (x.6.x content, x.7.x security, local mailer
   exit codes, syntax-error reply codes, delayed -> expired);
4. ``onhold`` when there was text we could not place, ``undefined`` when there was none;
5. then the verdict meets the report's own facts: a failed report on a temporary 4.7.x
   code whose text names no block is an expiry; a delayed 4.4.1/4.4.2 report is a network
   error; and a hard reason gives way to the soft one its text also names (policy,
   reputation, content, the sender), since suppression for good needs proof that the
   mailbox itself is gone.

The phrase lists live in :mod:`relayd.reports.dsn.patterns`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from relayd.reports.dsn.limits import CONTEXT_LIMIT, DIAGNOSTIC_LIMIT
from relayd.reports.dsn.patterns import mentions

#: Reasons that say the address itself is bad. ``notaccept`` joins them on a 5xx only.
HARD_REASONS = frozenset({"userunknown", "hostunknown", "hasmoved"})

#: Reasons which a first guess from the status code may still be overridden for.
_RETRIED = frozenset(
    {
        "undefined",
        "onhold",
        "systemerror",
        "securityerror",
        "expired",
        "networkerror",
        "hostunknown",
        "userunknown",
    }
)

#: SMTP commands sent before DATA: a rejection there cannot be about the content.
_BEFORE_DATA = frozenset({"CONN", "EHLO", "HELO", "STARTTLS", "AUTH", "MAIL", "RCPT"})

#: RFC 3463 / IANA enhanced status codes -> reason. x.0.0 and the codes missing here
#: carry too little to decide on their own.
STATUS_REASONS: Mapping[str, str] = {
    "2.1.5": "delivered",
    "4.1.6": "hasmoved",
    "4.1.7": "rejected",
    "4.1.8": "rejected",
    "4.1.9": "systemerror",
    "4.2.1": "blocked",
    "4.2.2": "mailboxfull",
    "4.2.3": "exceedlimit",
    "4.2.4": "filtered",
    "4.3.1": "systemfull",
    "4.3.2": "notaccept",
    "4.3.3": "systemerror",
    "4.3.5": "systemerror",
    "4.4.1": "expired",
    "4.4.2": "networkerror",
    "4.4.3": "systemerror",
    "4.4.4": "networkerror",
    "4.4.5": "systemfull",
    "4.4.6": "networkerror",
    "4.4.7": "expired",
    "4.4.8": "networkerror",
    "4.5.3": "systemerror",
    "4.5.5": "systemerror",
    "4.6.0": "contenterror",
    "4.6.2": "contenterror",
    "4.6.5": "contenterror",
    "4.7.1": "blocked",
    "4.7.2": "blocked",
    "4.7.5": "securityerror",
    "4.7.6": "securityerror",
    "4.7.7": "securityerror",
    "4.7.12": "securityerror",
    "4.7.15": "securityerror",
    "4.7.16": "mesgtoobig",
    "4.7.24": "authfailure",
    "4.7.25": "requireptr",
    "4.7.26": "authfailure",
    "5.1.1": "userunknown",
    "5.1.2": "hostunknown",
    "5.1.3": "userunknown",
    "5.1.4": "filtered",
    "5.1.6": "hasmoved",
    "5.1.7": "rejected",
    "5.1.8": "rejected",
    "5.1.9": "systemerror",
    "5.1.10": "notaccept",
    "5.2.0": "filtered",
    "5.2.1": "filtered",
    "5.2.2": "mailboxfull",
    "5.2.3": "exceedlimit",
    "5.2.4": "filtered",
    "5.3.0": "systemerror",
    "5.3.1": "systemfull",
    "5.3.2": "notaccept",
    "5.3.3": "systemerror",
    "5.3.4": "mesgtoobig",
    "5.3.5": "systemerror",
    "5.4.0": "networkerror",
    "5.4.3": "systemerror",
    "5.4.4": "hostunknown",
    "5.4.6": "networkerror",
    "5.5.2": "syntaxerror",
    "5.5.3": "toomanyconn",
    "5.5.4": "systemerror",
    "5.5.5": "systemerror",
    "5.5.6": "syntaxerror",
    "5.6.0": "contenterror",
    "5.6.1": "contenterror",
    "5.6.2": "contenterror",
    "5.6.3": "contenterror",
    "5.6.5": "contenterror",
    "5.6.6": "contenterror",
    "5.6.7": "contenterror",
    "5.6.8": "contenterror",
    "5.6.9": "contenterror",
    "5.7.0": "securityerror",
    "5.7.1": "securityerror",
    "5.7.2": "securityerror",
    "5.7.3": "securityerror",
    "5.7.4": "securityerror",
    "5.7.5": "securityerror",
    "5.7.6": "securityerror",
    "5.7.7": "securityerror",
    "5.7.8": "securityerror",
    "5.7.9": "securityerror",
    "5.7.10": "securityerror",
    "5.7.11": "securityerror",
    "5.7.13": "suspend",
    "5.7.14": "securityerror",
    "5.7.15": "securityerror",
    "5.7.16": "mesgtoobig",
    "5.7.17": "hasmoved",
    "5.7.18": "hasmoved",
    "5.7.19": "securityerror",
    "5.7.20": "authfailure",
    "5.7.21": "authfailure",
    "5.7.22": "authfailure",
    "5.7.23": "authfailure",
    "5.7.24": "authfailure",
    "5.7.25": "requireptr",
    "5.7.26": "authfailure",
    "5.7.27": "notaccept",
    "5.7.28": "spamdetected",
    "5.7.29": "authfailure",
    "5.7.30": "failedstarttls",
    # Vendor codes beyond the IANA registry, seen often enough to be worth a line.
    "5.7.509": "authfailure",  # Outlook.com: DMARC reject
    "5.7.606": "blocked",  # Office 365: banned sending IP
    "5.7.607": "blocked",
    "5.7.608": "blocked",
    "5.1.351": "userunknown",  # Office 365: remote server rejected recipient
    "5.4.316": "expired",  # Office 365: message expired, connection refused
    "5.4.300": "expired",  # Office 365: message expired
}


@dataclass(frozen=True, slots=True)
class Evidence:
    """Everything known about one recipient's failure; all fields optional.

    ``command`` is the SMTP command that drew the reply (``CONN``, ``EHLO``, ``MAIL``,
    ``RCPT``, ``DATA``...), ``diagnostic_type`` the RFC 3464 diagnostic type (``smtp``,
    ``x-unix``...), ``action`` the DSN Action.
    """

    status: str | None = None
    reply_code: str | None = None
    diagnostic: str | None = None
    action: str | None = None
    command: str | None = None
    diagnostic_type: str | None = None


_SPACE = re.compile(r"\s+")


_CONTINUATION = re.compile(r"(?<=\s)[245]\d\d-(?:[245]\.\d{1,3}\.\d{1,3}\s)?")


def normalise_text(text: str | None) -> str:
    """Lower-case and collapse whitespace, the form the phrase tables are written in.

    Multi-line replies quoted into one line (``550-5.7.1 ... 550-5.7.1 ...``, Gmail)
    lose their continuation prefixes so phrases spanning two reply lines still match.
    At most :data:`~relayd.reports.dsn.limits.CONTEXT_LIMIT` characters are read and
    :data:`~relayd.reports.dsn.limits.DIAGNOSTIC_LIMIT` returned: the text comes from whoever
    sent the report, and every phrase table is searched over it.
    """
    text = _SPACE.sub(" ", (text or "")[:CONTEXT_LIMIT]).strip()
    return _CONTINUATION.sub("", text[:DIAGNOSTIC_LIMIT]).lower()


def status_reason(status: str | None) -> str | None:
    """Reason implied by an enhanced status code, or None when it implies nothing.

    sisimai's invented ``x.0.9nn`` codes and the undefined ``x.0.0`` fall through.
    """
    if not status:
        return None
    return STATUS_REASONS.get(status)


@dataclass(frozen=True, slots=True)
class _Facts:
    ev: Evidence
    text: str
    sreason: str | None


def _p_mailboxfull(f: _Facts) -> bool:
    if mentions("mailboxfull", f.text):
        return True
    # Sendmail turns a bare "552 Message exceeds maximum fixed size" into Status 5.2.2
    # (RFC 1893's reading of 552): the size phrase is the better evidence then.
    return f.sreason == "mailboxfull" and not mentions("mesgtoobig", f.text)


def _p_mesgtoobig(f: _Facts) -> bool:
    if f.sreason == "mesgtoobig":
        return True
    if f.sreason == "exceedlimit":
        return False
    return mentions("mesgtoobig", f.text)


def _p_exceedlimit(f: _Facts) -> bool:
    return f.sreason == "exceedlimit" or mentions("exceedlimit", f.text)


def _p_suspend(f: _Facts) -> bool:
    return f.ev.reply_code == "525" or mentions("suspend", f.text)


def _p_hasmoved(f: _Facts) -> bool:
    return f.sreason == "hasmoved" or mentions("hasmoved", f.text)


def _p_norelaying(f: _Facts) -> bool:
    if f.ev.command in {"CONN", "EHLO", "HELO"}:
        return False
    return mentions("norelaying", f.text)


def _p_authfailure(f: _Facts) -> bool:
    return f.sreason == "authfailure" or mentions("authfailure", f.text)


def _rejected_text(text: str) -> bool:
    """Sender-rejection phrases, minus the ones that are about the recipient."""
    return mentions("rejected", text) and not mentions("rejected-not", text)


def _p_userunknown(f: _Facts) -> bool:
    if f.sreason == "userunknown":
        # 5.1.1 is also used for relay denials, blocklists and full mailboxes.
        others = (
            "norelaying",
            "blocked",
            "mailboxfull",
            "hasmoved",
            "notaccept",
            "filtered",
            "speeding",
            "toomanyconn",
        )
        return not (any(mentions(other, f.text) for other in others) or _rejected_text(f.text))
    if mentions("userunknown-definitive", f.text):
        return True
    # A "no such user" answer to DATA (or to nothing we can name) is a content filter
    # speaking (sisimai's rule): only the RCPT answer says the mailbox is missing.
    return f.ev.command == "RCPT" and mentions("userunknown", f.text)


def _p_filtered(f: _Facts) -> bool:
    if f.sreason == "filtered":
        return mentions("userunknown", f.text) or mentions("filtered", f.text)
    if f.ev.command in _BEFORE_DATA:
        return False
    return mentions("filtered", f.text) or mentions("userunknown", f.text)


def _p_requireptr(f: _Facts) -> bool:
    return f.sreason == "requireptr" or mentions("requireptr", f.text)


def _p_notcompliantrfc(f: _Facts) -> bool:
    return mentions("notcompliantrfc", f.text)


def _p_badreputation(f: _Facts) -> bool:
    return mentions("badreputation", f.text)


def _p_spamdetected(f: _Facts) -> bool:
    if f.sreason == "spamdetected":
        return True
    if f.ev.command in _BEFORE_DATA:
        return False
    return mentions("spamdetected", f.text)


def _p_contenterror(f: _Facts) -> bool:
    if _p_spamdetected(f):
        return False
    return f.sreason == "contenterror" or mentions("contenterror", f.text)


def _p_rejected(f: _Facts) -> bool:
    if f.sreason == "rejected":
        return True
    if f.ev.command == "MAIL":
        return _rejected_text(f.text)
    if f.ev.command == "DATA" and f.sreason != "userunknown":
        return _rejected_text(f.text)
    if f.sreason in {None, "onhold", "undefined", "securityerror", "systemerror"}:
        return _rejected_text(f.text)
    return False


def _p_hostunknown(f: _Facts) -> bool:
    if f.sreason == "hostunknown":
        return not mentions("networkerror", f.text)
    return mentions("hostunknown", f.text)


def _p_speeding(f: _Facts) -> bool:
    return mentions("speeding", f.text)


def _p_toomanyconn(f: _Facts) -> bool:
    return f.sreason == "toomanyconn" or mentions("toomanyconn", f.text)


def _p_blocked(f: _Facts) -> bool:
    return f.sreason == "blocked" or mentions("blocked", f.text)


def _p_expired(f: _Facts) -> bool:
    # x.4.7 "Delivery time expired" is the MTA's own verdict after days of retries; the
    # last temporary error quoted next to it (connection refused...) is only history.
    return (f.ev.status or "")[1:] == ".4.7"


#: First pass: status-aware probes, in this order (the first true one wins).
PROBES: tuple[tuple[str, Callable[[_Facts], bool]], ...] = (
    ("expired", _p_expired),
    ("mailboxfull", _p_mailboxfull),
    ("mesgtoobig", _p_mesgtoobig),
    ("exceedlimit", _p_exceedlimit),
    ("suspend", _p_suspend),
    ("hasmoved", _p_hasmoved),
    ("norelaying", _p_norelaying),
    ("authfailure", _p_authfailure),
    ("userunknown", _p_userunknown),
    ("filtered", _p_filtered),
    ("requireptr", _p_requireptr),
    ("notcompliantrfc", _p_notcompliantrfc),
    ("badreputation", _p_badreputation),
    ("contenterror", _p_contenterror),
    ("rejected", _p_rejected),
    ("hostunknown", _p_hostunknown),
    ("spamdetected", _p_spamdetected),
    ("speeding", _p_speeding),
    ("toomanyconn", _p_toomanyconn),
    ("blocked", _p_blocked),
)

#: Second pass: plain phrase matching, for what the probes left open.
SECOND_PASS: tuple[str, ...] = (
    "mailboxfull",
    "userunknown-definitive",
    "authfailure",
    "badreputation",
    "speeding",
    "spamdetected",
    "virusdetected",
    "policyviolation",
    "norelaying",
    "notaccept",
    "systemerror",
    "networkerror",
    "suspend",
    "contenterror",
    "systemfull",
    "hostunknown",
    "failedstarttls",
    "securityerror",
    "suppressed",
    "mailererror",
    "syntaxerror",
)


def _reply_number(code: str | None) -> int:
    try:
        return int(code or "")
    except ValueError:
        return 0


def _second_pass(f: _Facts) -> str | None:
    ev = f.ev
    if f.sreason and f.sreason not in _RETRIED and ev.diagnostic_type in (None, "smtp"):
        return f.sreason
    for reason in SECOND_PASS:
        if mentions(reason, f.text):
            return reason.split("-", 1)[0]
    if f.sreason:
        return f.sreason
    # "Gave up after retrying" is the weakest statement: any specific cause wins over it.
    if mentions("expired", f.text):
        return "expired"
    status = ev.status or ""
    if status[:3] in {"5.6", "4.6"}:
        return "contenterror"
    if status[:3] in {"5.7", "4.7"}:
        return "securityerror"
    if (ev.diagnostic_type or "").startswith("x-unix"):
        return "mailererror"
    reply = _reply_number(ev.reply_code)
    if 400 < reply < 408 or 500 < reply < 508:
        return "syntaxerror"
    if ev.action in {"delayed", "expired"}:
        return "expired"
    if ev.command in {"CONN", "EHLO", "HELO"}:
        # The server refused to talk to this client at all: a block on the client.
        return "blocked"
    if reply in {521, 556}:
        return "notaccept"
    if ev.command == "STARTTLS" or reply in {523, 524, 538}:
        return "failedstarttls"
    return None


#: What a delayed report about an unanswered or broken connection may otherwise read as
#: ("Connection refused by" is also a blocklist phrase; 4.4.1 alone maps to expiry).
_STILL_TRYING = frozenset({"expired", "blocked", "onhold", "undefined"})

#: Reasons that a temporary 4.7.x code alone suggests ("4.7.1 Please try again later" is
#: how greylisting answers): when the MTA gave up on such a failure, the expiry is the news.
_GAVE_UP_ON = frozenset({"blocked", "securityerror"})


def decide(ev: Evidence) -> str:
    """The sisimai reason name for one recipient's failure. Never raises."""
    status = ev.status or ""
    if ev.action in {"delivered", "relayed", "expanded"} or status.startswith("2."):
        return "delivered"
    facts = _Facts(ev=ev, text=normalise_text(ev.diagnostic), sreason=status_reason(ev.status))
    reason = _decide(facts)
    if _gave_up(facts, reason):
        return "expired"
    if (
        ev.action == "delayed"
        and status[1:] in {".4.1", ".4.2"}
        and reason in _STILL_TRYING
        and not mentions("expired", facts.text)
        and "timed out" not in facts.text  # sisimai: a timeout is an expiry in the making
    ):
        # RFC 3463 X.4.1 "no answer from host", X.4.2 "bad connection": the MTA is still
        # retrying, so nothing has expired yet; what it reports is the network failing.
        return "networkerror"
    if reason in HARD_REASONS or reason == "notaccept":
        return _policy_instead(facts) or reason
    return reason


#: Soft reasons whose phrases, next to a "user unknown" or "domain not found", show that
#: the refusal may be about the sender, its host or the content rather than the mailbox
#: ("Sender address rejected: Domain not found", "... blocked using zen.spamhaus.org").
_POLICY_REASONS = (
    "blocked",
    "requireptr",
    "badreputation",
    "spamdetected",
    "virusdetected",
    "policyviolation",
    "authfailure",
    "norelaying",
)


def _policy_instead(facts: _Facts) -> str | None:
    """The soft reason to report instead of a hard one, when the text gives one.

    A hard verdict removes the address for good, so it needs evidence that the mailbox
    itself is gone: a reply that also speaks of policy, reputation or the sender stays
    soft however the rest of it is worded.
    """
    for reason in _POLICY_REASONS:
        if mentions(reason, facts.text):
            return reason
    if facts.ev.command == "MAIL" or _sender_refused(facts.text):
        return "rejected"
    return None


def _sender_refused(text: str) -> bool:
    """A refusal that names the envelope sender ("Sender address rejected: ...")."""
    return mentions("rejected", text) and ("sender" in text or "mail from" in text or "envelope from" in text)


def _decide(facts: _Facts) -> str:
    """Probes, then the second pass, then onhold/undefined (steps 2-4 of the module doc)."""
    if facts.ev.diagnostic_type in (None, "smtp"):
        for name, probe in PROBES:
            if probe(facts):
                return name
    found = _second_pass(facts)
    if found:
        return found
    if mentions("vacation", facts.text):
        return "vacation"
    return "onhold" if facts.text else "undefined"


def _gave_up(facts: _Facts, reason: str) -> bool:
    """Action: failed on a temporary (4.x.x / 4xx) failure: the queue lifetime ran out.

    RFC 3464 section 2.3.3: "failed" is final; with a transient status it means the MTA
    stopped retrying. When only the generic 4.7.x code pointed at a block (the text names
    no blocklist) and the server did not refuse the connection outright, the report is
    an expiry.
    """
    ev = facts.ev
    if ev.action != "failed" or reason not in _GAVE_UP_ON:
        return False
    transient = (ev.status or "").startswith("4.") or (
        not ev.status and (ev.reply_code or "").startswith("4")
    )
    if not transient or ev.command in {"CONN", "EHLO", "HELO"}:
        return False
    return not mentions(reason, facts.text)


def is_permanent(status: str | None, reply_code: str | None, action: str | None = None) -> bool:
    """True for a 5.x.x status or 5xx reply; without either, for Action: failed."""
    if status and status[0] in "245":
        return status[0] == "5"
    if reply_code and reply_code[0] in "245":
        return reply_code[0] == "5"
    return action == "failed"


def is_hard(reason: str, status: str | None, reply_code: str | None, action: str | None = None) -> bool:
    """Whether the reason says the address itself is bad (DESIGN.md "Reasons").

    Each of them is hard only when permanent: a 4xx (or a delayed report) says the
    host cannot take the mail for now, not that the address is gone.
    """
    if reason not in HARD_REASONS and reason != "notaccept":
        return False
    # A hard verdict removes the address for good: a temporary code (a delayed report,
    # a 4xx "user unknown" while a directory is down) is no proof that it is gone.
    return is_permanent(status, reply_code, action)


def classify_reply(
    code: int, enhanced: str | None, text: str, command: str | None = None
) -> tuple[str, bool]:
    """Reason and hard flag for a synchronous SMTP failure of our own delivery attempt.

    Uses the same table as DSNs so that a rejection seen directly and one reported
    later by a relay are suppressed alike. ``text`` is the reply text (without code);
    ``command`` the command it answered (``RCPT``, ``DATA``...) when the caller knows
    it: "550 No such user" to RCPT is a missing mailbox, to DATA a content filter.
    """
    reply = str(code) if 100 <= code <= 599 else None
    status = enhanced.strip() if enhanced else None
    diagnostic = " ".join(part for part in (reply, status, text) if part)
    ev = Evidence(
        status=status,
        reply_code=reply,
        diagnostic=diagnostic,
        action="failed" if code >= 500 else None,
        command=command.upper() if command else None,
        diagnostic_type="smtp",
    )
    reason = decide(ev)
    return reason, is_hard(reason, status, reply, ev.action)
