"""Phrases of refusals of the recipient: userunknown, filtered, rejected.

The address does not exist, the recipient's own filter refused the message, or the
recipient (or sender) address was refused.

A part of :data:`relayd.reports.dsn.patterns.PHRASES`; the rules for a fragment are in
that package's docstring.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

PHRASES: Mapping[str, Sequence[str]] = {
    "userunknown": (
        "#5.1.1 bad address",
        "550 address invalid",
        "5.1.0 address rejected.",
        "address does not exist",
        "address not present in directory",
        "address unknown",
        "can't accept user",
        "does not exist.",
        "destination addresses were unknown",
        "destination server rejected recipients",
        "email address does not exist",
        "email address could not be found",
        "invalid address",
        "invalid mailbox",
        "invalid recipient",
        "is not a known user",
        "is not a valid mailbox",
        "is not an active address at this host",
        "mailbox does not exist",
        "mailbox invalid",
        "mailbox is inactive",
        "mailbox is unavailable",
        "mailbox not present",
        "mailbox not found",
        "mailbox unavaiable",
        "nessun utente simile in questo indirizzo",
        "no account by that name here",
        "no existe dicha persona",
        "no existe ese usuario ",
        "no mail box available for this user",
        "no mailbox by that name is currently available",
        "no mailbox found",
        "no such address here",
        "no such mailbox",
        "no such person at this address",
        "no such recipient",
        "no such user",
        "no thank you rejected: account unavailable",
        "no valid recipients, bye",
        "not a valid recipient",
        "not a valid user here",
        "not a local address",
        "not email addresses",
        "recipient address rejected. (in reply to rcpt to command)",
        "recipient address rejected: access denied",
        "recipient address rejected: invalid user",
        "recipient address rejected: invalid-recipient",
        "recipient address rejected: unknown user",
        "recipient address rejected: userunknown",
        "recipient does not exist",
        "recipient is not accepted",
        "recipient is not local",
        "recipient not exist",
        "recipient not found",
        "recipient not ok",
        "recipient refuses to accept your mail",
        "recipient unknown",
        "requested action not taken: mailbox unavailable",
        "resolver.adr.recipientnotfound",  # Exchange / Office 365
        "resolver.adr.recipient notfound",
        "sorry, user unknown",
        "sorry, badrcptto",
        "sorry, no mailbox here by that name",
        "sorry, your envelope recipient has been denied",
        "the email account that you tried to reach does not exist",  # Gmail
        "the following recipients was undeliverable",
        "the user's email name is not found",
        "there is no one at this address",
        "this address no longer accepts mail",
        "this email address is wrong or no longer valid",
        "this recipient is in my badrecipientto list",
        "this recipient is not in my validrcptto list",
        "unknown mailbox",
        "unknown recipient",
        "unknown user",
        "user does not exist",
        "user missing home directory",
        "user not active",
        "user not exist",
        "user not found",
        "user not known",
        "user unknown",
        "utilisateur inconnu !",
        "vdeliver: invalid or unknown virtual user",
        "weil die adresse nicht gefunden wurde oder keine e-mails empfangen kann",
        "your envelope recipient is in my badrcptto list",
        "does not have an account here",
        "< ... > not found",
        "account ... does not exist at the organization",
        "bad ... recipient",
        "mailbox ... does not exist",
        "no ... in name directory",
        "non ... existent user",
        "rcpt < ... does not exist",
        "recipient ... was not found in",
        "recipient address rejected: user ... does not exist",
        "recipient address rejected: user unknown in ... table",
        "this user doesn't have a ... account",
        "unknown e ... mail address",
        "unknown local ... part",
        "user ... was not found",
        "user ... does not exist",
        "user ( ... ) unknown",
    ),
    # Said by the mailbox host itself about its own directory: the user is unknown
    # whatever SMTP command (if any) the notice was answering.
    "userunknown-definitive": (
        "recipientnotfound",  # Exchange/Office 365 RESOLVER.ADR.RecipientNotFound
        "recipient not found by smtp address lookup",  # Exchange/Office 365
        "recipient name is not recognized",  # Exchange 2003
        "not listed in domino directory",  # Lotus Domino
        "not listed in public name & address book",  # Lotus Notes
        "no valid recipients for this mm",  # Verizon MMS gateway
        "because the address couldn't be found",  # Google Workspace
        "the email account that you tried to reach does not exist",  # Gmail
    ),
    "filtered": (
        "account is protected by",
        "bounced address",  # SendGrid: address bounced before
        "has restricted sms e-mail",  # AT&T
        "is not accepting any mail",
        "message filtered",
        "message rejected due to user rules",
        "not found recipient account",
        "recipient id refuse to receive mail",  # Willcom
        "recipient is only accepting mail from specific email addresses",  # AOL
        "refused due to recipient preferences",  # Facebook
        "user refuses to receive this mail",
        "user reject",
        "you have been blocked by the recipient",
        "rejected by the domain filter",
        "your message was rejected by the recipient's filter",
    ),
    "rejected-not": (
        "5.1.0 address rejected",
        "recipient address rejected",
        "sender ip address rejected",
    ),
    "rejected": (
        "access denied (in reply to mail from command)",
        "access denied (sender blacklisted)",
        "address rejected",
        "administrative prohibition",
        "batv failed to verify",  # SonicWall
        "batv validation failure",  # SonicWall
        "backscatter protection detected an invalid or expired email address",  # MDaemon
        "because the sender isn't on the recipient's list of senders to accept mail from",
        "bogus mail from",  # IMail: empty sender
        "can't determine purported responsible address",
        "connections not accepted from servers without a valid sender domain",
        "denied [bouncedeny]",  # McAfee
        "delivery not authorized, message refused",
        "domain of sender address ",
        "email address is on senderfilterconfig list",
        "emetteur invalide",
        "empty envelope senders not allowed",
        "envelope blocked - ",
        "error: no third-party dsns",
        "from: domain is invalid. please provide a valid from:",
        "fully qualified email address required",  # McAfee
        "invalid domain, see <url:",
        "invalid sender",
        "is not a registered gateway user",
        "mail from not owned by user",
        "message rejected: email address is not verified",
        "null sender is not allowed",
        "recipient addresses rejected : access denied",
        "recipient not accepted. (batv: no tag",
        "returned mail not accepted here",
        "rule imposed mailbox access for",  # MailMarshal
        "sending this from a different address or alias using the ",
        "sender address has been blacklisted",
        "sender email address rejected",
        "sender is in my black list",
        "sender is spammer",
        "sender not pre-approved",
        "sender rejected",
        "sender domain is empty",
        "sender verify failed",  # Exim callout
        "sender was rejected",  # qmail
        "spam reporting address",  # SendGrid: earlier spam report
        "syntax error: empty email address",
        "the message has been rejected by batv defense",
        "this server does not accept mail from",
        "transaction failed unsigned dsn for",
        "unroutable sender address",
        "you are not allowed to post to this mailing list",
        "you are sending to/from an address that has been blacklisted",
        "your access to submit messages to this e-mail system has been rejected",
        "your email address has been blacklisted",  # MessageLabs
        "you do not have permission to post",  # Google Groups
        "you may not have permission to post",  # Google Groups
        "groups.google.com/support",  # Google Groups refusal notice, in every language
        "you don't have permission to post",  # Google Groups
        "sender address rejected",
    ),
}
