"""What the scripted next hops answer, and the label each answer earns by construction.

Each :class:`Scenario` is one way delivery can fail; its ``replies`` are several wordings of
that failure as real receiving MTAs and providers phrase them (Postfix's smtpd restriction
texts, Exim ACL defaults, Sendmail's ``...`` replies, Exchange/Office 365, Gmail, qmail
chkuser, RFC 5321's own example texts, the DNSBL operators' documented reject lines).
The label (reason from the sisimai v5 taxonomy, hard/soft as in DESIGN.md) belongs to the
scenario, never to a wording: the wordings are what a classifier must see through.

``phase`` says where the next hop answers: ``rcpt`` (per recipient), ``mail`` (the
envelope sender), ``data`` (after the final dot), ``greeting`` (the banner, whole
connection), or ``local`` for failures the sending MTA finds itself (DNS, refused
connection), whose text comes from the MTA under test.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    phase: str
    reason: str
    hard: bool
    status: str
    replies: tuple[str, ...]
    #: the recipient domain (its MX decides which scripted host answers)
    domain: str = "users.example.net"
    #: a temporary answer: the bounce comes when the queue lifetime runs out
    temporary: bool = False


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "userunknown",
        "rcpt",
        "userunknown",
        True,
        "5.1.1",
        (
            "550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown in virtual mailbox table",
            "550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown in local recipient table",
            "550 5.1.1 The email account that you tried to reach does not exist. Please try "
            "double-checking the recipient's email address for typos or unnecessary spaces.",
            "550 5.1.1 RESOLVER.ADR.RecipNotFound; not found",
            "550 5.1.1 <{rcpt}>... User unknown",
            "511 sorry, no mailbox here by that name (#5.1.1 - chkuser)",
            "550 No such user here",
            "550 5.1.1 {rcpt}: Mailbox does not exist",
            "550 Requested action not taken: mailbox unavailable (no such recipient)",
            "550 5.1.1 Unknown recipient address",
        ),
    ),
    Scenario(
        "userunknown-corp",
        "rcpt",
        "userunknown",
        True,
        "5.1.1",
        (
            "550 5.1.1 User unknown",
            "550-5.1.1 The email account that you tried to reach does not exist. Please try\r\n"
            "550-5.1.1 double-checking the recipient's email address for typos or\r\n"
            "550 5.1.1 unnecessary spaces. https://support.google.com/mail/?p=NoSuchUser - gsmtp",
            "553 5.1.1 <{rcpt}>: recipient address does not exist",
            "550 Invalid recipient <{rcpt}> (#5.1.1)",
        ),
        domain="corp.example.com",
    ),
    Scenario(
        "hasmoved",
        "rcpt",
        "hasmoved",
        True,
        "5.1.6",
        (
            "551 5.1.6 User not local; please try <moved.away@example.org>",
            "550 5.1.6 Recipient addresses has moved; the mailbox was moved to <new.home@example.org>",
            "551 User not local; please try <forwarded@example.org>",
        ),
    ),
    Scenario(
        "suspend",
        "rcpt",
        "suspend",
        False,
        "5.2.1",
        (
            "550 5.2.1 The email account that you tried to reach is disabled.",
            "550 5.2.1 <{rcpt}>: Mailbox disabled, not accepting messages",
            "550 5.2.1 {rcpt}... Account is inactive",
        ),
    ),
    Scenario(
        "mailboxfull",
        "rcpt",
        "mailboxfull",
        False,
        "5.2.2",
        (
            "552 5.2.2 <{rcpt}>: Recipient address rejected: Mailbox full",
            "552 5.2.2 Mailbox size limit exceeded",
            "552 5.2.2 Quota exceeded (mailbox for user is full)",
            "550 5.2.2 {rcpt}... Mailbox quota exceeded",
            "552 5.2.2 The email account that you tried to reach is over quota.",
        ),
    ),
    Scenario(
        "mailboxfull-temp",
        "rcpt",
        "mailboxfull",
        False,
        "4.2.2",
        (
            "452 4.2.2 The email account that you tried to reach is over quota.",
            "452 4.2.2 <{rcpt}>: Mailbox full",
            "452 4.2.2 Over quota",
        ),
        temporary=True,
    ),
    Scenario(
        "norelaying",
        "rcpt",
        "norelaying",
        False,
        "5.7.1",
        (
            "554 5.7.1 <{rcpt}>: Relay access denied",
            "550 5.7.1 Unable to relay for {rcpt}",
            "550 relay not permitted",
            "550 5.7.1 <{rcpt}>... Relaying denied",
        ),
        domain="elsewhere.example.org",
    ),
    Scenario(
        "blocked",
        "rcpt",
        "blocked",
        False,
        "5.7.1",
        (
            "554 5.7.1 Service unavailable; Client host [{ip}] blocked using zen.spamhaus.org; "
            "https://www.spamhaus.org/query/ip/{ip}",
            "554 5.7.1 Service unavailable; Client host [{ip}] blocked using bl.spamcop.net; "
            "Blocked - see https://www.spamcop.net/bl.shtml?{ip}",
            "554 5.7.1 Service unavailable; client host [{ip}] blocked using b.barracudacentral.org",
            "550 5.7.606 Access denied, banned sending IP [{ip}].",
            "554 5.7.1 <{rcpt}>: Client host rejected: Access denied",
        ),
        domain="isp.example.com",
    ),
    Scenario(
        "requireptr",
        "rcpt",
        "requireptr",
        False,
        "5.7.25",
        (
            "550 5.7.25 Client host rejected: cannot find your hostname, [{ip}]",
            "550 5.7.1 Client host rejected: cannot find your reverse hostname, [{ip}]",
            "550 5.7.25 [{ip}] The IP address sending this message does not have a PTR record setup, "
            "or the corresponding forward DNS entry does not point to the sending IP.",
        ),
        domain="isp.example.com",
    ),
    Scenario(
        "greeting-block",
        "greeting",
        "blocked",
        False,
        "5.7.1",
        (
            "554 5.7.1 Service unavailable; client host blocked",
            "554 mx.greet.example.org ESMTP not accepting messages",
            "554 5.7.1 Your IP address [{ip}] is listed in a DNS blocklist; connection refused",
        ),
        domain="greet.example.org",
    ),
    Scenario(
        "rejected",
        "mail",
        "rejected",
        False,
        "5.1.8",
        (
            "553 5.1.8 <{sender}>: Sender address rejected: Domain not found",
            "550 5.7.1 <{sender}>: Sender address rejected: Access denied",
            "550 5.1.0 <{sender}> sender rejected",
            "553 5.1.8 Sender address domain does not exist",
            "550 Sender verify failed",
        ),
        domain="strict.example.net",
    ),
    Scenario(
        "securityerror",
        "mail",
        "securityerror",
        False,
        "5.7.0",
        (
            "530 5.7.0 Must issue a STARTTLS command first",
            "530 5.7.0 Must issue a STARTTLS command first. - gsmtp",
            "530 5.7.0 Encryption required for requested authentication mechanism",
        ),
        domain="tlsonly.example.net",
    ),
    Scenario(
        "mesgtoobig",
        "data",
        "mesgtoobig",
        False,
        "5.3.4",
        (
            "552 5.3.4 Message size exceeds fixed maximum message size",
            "552 5.3.4 Error: message file too big",
            "552 5.3.4 Message too big for system",
            "552 Message exceeds maximum fixed size",
        ),
        domain="small.example.net",
    ),
    Scenario(
        "exceedlimit",
        "data",
        "exceedlimit",
        False,
        "5.2.3",
        (
            "552 5.2.3 Message length exceeds administrative limit",
            "552 5.2.3 Message size exceeds maximum value",
        ),
        domain="small.example.net",
    ),
    Scenario(
        "spamdetected",
        "data",
        "spamdetected",
        False,
        "5.7.1",
        (
            "550 5.7.1 Message rejected as spam by Content Filtering.",
            "554 5.7.1 Spam message rejected",
            "550 5.7.350 Remote server returned message detected as spam",
            "550 High probability of spam",
        ),
        domain="filter.example.net",
    ),
    Scenario(
        "virusdetected",
        "data",
        "virusdetected",
        False,
        "5.7.1",
        (
            "554 5.7.1 Virus found in message: Eicar-Test-Signature",
            "550 5.7.1 Message rejected: infected by a virus",
        ),
        domain="filter.example.net",
    ),
    Scenario(
        "toomanyconn",
        "rcpt",
        "toomanyconn",
        False,
        "4.5.3",
        ("452 4.5.3 Too many recipients", "452 4.5.3 Error: too many recipients"),
        temporary=True,
    ),
    Scenario(
        "greylisted",
        "rcpt",
        "expired",
        False,
        "4.7.1",
        (
            "450 4.7.1 <{rcpt}>: Recipient address rejected: Greylisted, see "
            "http://postgrey.schweikert.ch/help/{domain}.html",
            "451 4.7.1 Please try again later",
            "450 4.2.0 <{rcpt}>: Recipient address rejected: Greylisted for 300 seconds",
            "451 4.7.1 Greylisting in action, please come back later",
        ),
        domain="slow.example.net",
        temporary=True,
    ),
    Scenario(
        "systemfull",
        "rcpt",
        "systemfull",
        False,
        "4.3.1",
        ("452 4.3.1 Insufficient system storage", "452 4.3.1 Out of memory or disk space"),
        temporary=True,
    ),
    Scenario("hostunknown", "local", "hostunknown", True, "5.1.2", (), domain="nxdomain-{n}.example.org"),
    Scenario("notaccept", "local", "notaccept", True, "5.1.10", (), domain="nullmx.example.org"),
    Scenario("refused", "local", "expired", False, "4.4.1", (), domain="refused.example.org", temporary=True),
)

BY_NAME = {scenario.name: scenario for scenario in SCENARIOS}
