"""Phrases about the message and its delivery: spamdetected ... vacation.

spamdetected, speeding, toomanyconn, mesgtoobig, exceedlimit, expired, networkerror,
notaccept, policyviolation, securityerror, systemerror, systemfull, virusdetected,
failedstarttls, mailererror, suppressed, syntaxerror, vacation.

A part of :data:`relayd.reports.dsn.patterns.PHRASES`; the rules for a fragment are in
that package's docstring.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

PHRASES: Mapping[str, Sequence[str]] = {
    "spamdetected": (
        " - spam",
        "//www.spamhaus.org/help/help_spam_16.htm",
        "//dsbl.org/help/help_spam_16.htm",
        "//mail.163.com/help/help_spam_16.htm",
        "554 5.7.0 reject, id=",
        "appears to be unsolicited",
        "spam message rejected",
        "blacklisted url in message",
        "block for spam",
        "blocked by policy: no spam please",
        "blocked by spamassassin",
        "blocked for abuse. see http://att.net/blocks",  # AT&T
        "cannot be forwarded because it was detected as spam",
        "considered unsolicited bulk e-mail (spam) by our mail filters",
        "content filter rejection",
        "cyberoam anti spam engine has identified this email as a bulk email",
        "denied due to spam list",
        "high probability of spam",
        "is classified as spam and is rejected",
        "listed in work.drbl.imedia.ru",
        "the mail server detected your message as spam and has prevented delivery.",  # cPanel
        "mail appears to be unsolicited",
        "mail content denied",  # QQ
        "may consider spam",
        "message considered as spam or virus",
        "message contains spam or virus",
        "message content rejected",
        "message detected as spam",
        "message looks like spam",
        "message is being rejected as it seems to be a spam",
        "message refused by mailmarshal spamprofiler",
        "message refused by trustwave seg spamprofiler",
        "message rejected as spam",
        "message rejected because of unacceptable content",
        "message rejected due to suspected spam content",
        "message rejected for policy reasons",
        "message was rejected for possible spam/virus content",
        "our email server thinks this email is spam",
        "our system has detected that this message is ",
        "probable spam",
        "reject bulk.advertising",
        "rejected: spamassassin score ",
        "rejected - bulk email",
        "rejecting banned content",
        "rejecting mail content",
        "related to content with spam-like characteristics",
        "sender domain listed at ",
        "sending address not accepted due to spam filter",
        "spam blocked",
        "spam check",
        "spam content matched",
        "spam detected",
        "spam email",
        "spam message rejected.",  # mail.ru
        "spam not accepted",
        "spam refused",
        "spam rejection",
        "spam score ",
        "spambouncer identified spam",
        "spamming not allowed",
        "too many spam complaints",
        "too much spam.",  # EarthLink
        "the email message was detected as spam",
        "the message has been rejected by spam filtering engine",
        "the message was rejected due to classification as bulk mail",
        "the content of this message looked like spam",  # SendGrid
        "this message appears to be spam",
        "this message has been identified as spam",
        "this message has been scored as spam with a probability",
        "this message was classified as spam",
        "this message was rejected by recurrent pattern detection system",
        "transaction failed spam message not queued",  # SendGrid
        "we dont accept spam",
        "your email appears similar to spam we have received before",
        "your email breaches local uribl policy",
        "your email had spam-like ",
        "your email is considered spam",
        "your email is probably spam",
        "your email was detected as spam",
        "your message as spam and has prevented delivery",
        "your message has been temporarily blocked by our filter",
        "your message has been rejected because it appears to be spam",
        "your message has triggered a spam block",
        "your message may contain the spam contents",
        "your message failed several antispam checks",
        "greylisted ... please try again in",
        "mail score ( ... over ",
        "mail rejete. mail rejected. ... 506",  # Orange
        "our filters rate at and above ... percent probability of being spam",
        "rejected by ... (spam)",
        "rejected due to spam ... classification",
        "rejected due to spam ... content",
        "rule imposed as ... is blacklisted on",
        "spam ... exceeded",
        "this message scored ... spam points",
    ),
    "speeding": (
        "has sent to too many recipients",  # GoDaddy
        "mail sent from your ip address has been temporarily rate limited",
        "please try again slower",
        "receiving mail at a rate that prevents additional messages from being delivered",
        "rate limit exceeded",
        "sending too fast",
    ),
    "toomanyconn": (
        "frequency limited",  # QQ/Tencent
        "all available ips are at maximum connection limit",  # SendGrid
        "connection rate limit exceeded",
        "exceeds per-domain connection limit for",
        "has exceeded the max emails per hour ",
        "throttling failure: daily message quota exceeded",  # Amazon SES
        "throttling failure: maximum sending rate exceeded",  # Amazon SES
        "too many connections",
        "too many concurrent smtp connections",  # Microsoft
        "too many errors from your ip",  # free.fr
        "too many recipients",  # NTT docomo
        "too many smtp sessions for this host",  # Sendmail
        "trop de connexions, ",
        "we have already made numerous attempts to deliver this message",
    ),
    "mesgtoobig": (
        "exceeded maximum inbound message size",
        "exceeded the maximum incoming message size",
        "line limit exceeded",
        "max message size exceeded",
        "message file too big",
        "message length exceeds administrative limit",
        "message size exceeds fixed limit",
        "message size exceeds fixed maximum message size",
        "message size exceeds maximum value",
        "message exceeds maximum fixed size",
        "message too big",
        "message too large for this ",
        "size limit",
        "taille limite du message atteinte",
        "message is too large",
        "mail size limit",
    ),
    "exceedlimit": ("message header size exceeds limit", "message too large"),
    "expired": (
        "connection timed out",
        "could not find a gateway for",
        "delivery attempts will continue to be",
        "delivery expired",
        "delivery time expired",
        "failed to deliver to domain ",
        "giving up on",
        "have been failing for a long time",
        "has been delayed",
        "it has not been collected after",
        "message expired after sitting in queue for",
        "message expired, cannot connect to remote server",
        "message expired, connection refulsed",
        "message timed out",
        "retry time not reached for any host after a long failure period",  # Exim
        "server did not respond",
        "this message has been in the queue too long",
        "unable to deliver message after multiple retries",
        "was not reachable within the allowed queue period",
        "your message could not be delivered for more than",
        "could not be delivered for ... days",
        "retry timeout exceeded",  # Exim
        "queue.expired",  # Exchange / Office 365
        "message expired",
        "greylisted",
        "greylisting in action",
        "too many retries",
        "message has been in the queue",
        "delivery has failed for ... days",
    ),
    "networkerror": (
        "lost connection with",  # Postfix
        "network error on destination mxs",  # OpenSMTPD
        "network is unreachable",
        "conversation with ... timed out",  # Postfix
        "dns error:",  # Gmail
        "wasn't able to establish an smtp connection",  # qmail
        "could not connect and send the mail to",
        "dns records for the destination computer could not be found",
        "hop count exceeded - possible mail loop",
        "host is unreachable",
        "host name lookup failure",
        "host not found, try again",
        "mail forwarding loop for ",
        "malformed name server reply",
        "malformed or unexpected name server reply",
        "maximum forwarding loop count exceeded",
        "message looping",
        "message probably in a routing loop",
        "no route to host",
        "too many hops",
        "unable to resolve route ",
        "unrouteable mail domain",
    ),
    "notaccept": (
        "does not accept mail (nullmx)",
        "domain does not accept mail",
        "accepts no mail",
        "host/domain does not accept mail",  # iCloud
        "host does not accept mail",  # Sendmail
        "mail receiving disabled",
        "name server: .: host not found",  # Sendmail
        "no mx record found for domain=",  # Yahoo
        "no route for current request",
        "smtp protocol returned a permanent error",
        "null mx",
        "doesn't receive email according to the administrator",  # Gmail: null MX
        "mx or srv record indicated no smtp service",  # Exim: null MX (RFC 7505)
    ),
    "policyviolation": (
        "an illegal attachment on your message",
        "because the recipient is not accepting mail with ",  # AOL
        "by non-member to a members-only list",
        "closed mailing list",
        "denied by policy",
        "email not accepted for policy reasons",
        "email rejected due to security policies",  # Mimecast
        "header are not accepted",
        "header error",
        "local policy violation",
        "message bounced due to organizational settings",
        "message given low priority",
        "message not accepted for policy reasons",
        "message rejected due to local policy",
        "messages with multiple addresses",
        "rejected for policy reasons",
        "protocol violation",
        "the email address used to send your message is not subscribed to this group",
        "the message was rejected by organization policy",
        "this message was blocked because its content presents a potential",
        "we do not accept messages containing images or other attachments",
        "you're using a mass mailer",
        "you have exceeded the ... allowable number of posts without solving a captcha",
    ),
    "securityerror": (
        "account not subscribed to ses",
        "authentication credentials invalid",
        "authentication failure",
        "authentication required",
        "authentication turned on in your email client",
        "executable files are not allowed in compressed files",
        "insecure mail relay",
        "recipient address rejected: access denied",
        "sorry, you don't authenticate or the domain isn't in my list of allowed rcpthosts",
        "unauthenticated senders not allowed",
        "must issue a starttls command first",  # the receiver requires TLS we did not offer
        "encryption required for requested authentication mechanism",
        "verification failure",
        "you are not authorized to send mail, authentication is required",
        "authentication failed; server ... said: ",  # Postfix
        "authentification invalide ... 305",  # Orange
        "authentification requise ... 402",  # Orange
        "domain ... is a dead domain",
        "user ... is not authorized to perform ses:sendrawemail on resource",  # Amazon SES
    ),
    "systemerror": (
        "aliasing/forwarding loop broken",
        "can't create user output file",
        "could not load drd for domain",
        "internal error reading data",  # Microsoft
        "internal server error: operation now in progress",  # Microsoft
        "interrupted system call",
        "it encountered an error while being processed",
        "it would create a mail loop",
        "local configuration error",
        "local error in processing",
        "loop was found in the mail exchanger",
        "loops back to myself",
        "mail system configuration error",
        "queue file write error",
        "recipient deferred because there is no mdb",
        "remote server is misconfigured",
        "server configuration error",
        "service currently unavailable",
        "system config error",
        "temporary local problem",
        "timeout waiting for input",
        "transaction failed ",
        "unable to connect ... daemon",
        "duplicated message-id",  # fml mailing list loop alert
    ),
    "systemfull": (
        "mail system full",
        "requested mail action aborted: exceeded storage allocation",  # Exchange
    ),
    "virusdetected": (
        "it has a potentially executable attachment",
        "the message was rejected because it contains prohibited virus or spam content",
        "this form of attachment has been used by recent viruses or other malware",
        "virus detected",
        "virus found in message",
        "infected by a virus",
        "virus phishing/malicious_url detected",
        "your message was infected with a virus",
        "message contains a virus",
        "infected with",
    ),
    "failedstarttls": (
        "starttls is required to send mail",
        "tls required but not supported",  # SendGrid
    ),
    "mailererror": (
        " || exit ",
        "procmail: ",
        "bin/procmail",
        "bin/maidrop",
        "command failed: ",
        "command died with status ",
        "command output:",
        "mailer error",
        "pipe to |/",
        "x-unix; ",
    ),
    "suppressed": (),
    "syntaxerror": (
        "malformed address",  # Exim
        "syntax error in address",
    ),
    "vacation": (
        "i am away on vacation",
        "i am away until",
        "i am out of the office",
        "i will be traveling for work on",
    ),
}
