"""Phrases of refusals of the sender, the mailbox and the host: blocked ... contenterror.

blocked, mailboxfull, suspend, hostunknown, hasmoved, norelaying, authfailure,
badreputation, requireptr, notcompliantrfc, contenterror.

A part of :data:`relayd.reports.dsn.patterns.PHRASES`; the rules for a fragment are in
that package's docstring.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

PHRASES: Mapping[str, Sequence[str]] = {
    "blocked": (
        " said: 550 blocked",
        "//www.spamcop.net/bl.",
        "bad sender ip address",
        "banned sending ip",  # Office 365
        "blacklisted by",
        "blocked using ",
        "client host blocked",
        "client host rejected",  # Postfix smtpd_client_restrictions
        "helo command rejected",  # Postfix smtpd_helo_restrictions: about our host
        "listed in a dns blocklist",
        "dnsbl",
        ".spamhaus.org",
        "barracudacentral.org",
        ".sorbs.net",
        "blocked - see http",
        "dnsbl:attrbl",
        "client host rejected: abus detecte gu_eib_02",  # SFR
        "client host rejected: abus detecte gu_eib_04",  # SFR
        "client host rejected: may not be mail exchanger",
        "client host rejected: was not authenticated",  # Microsoft
        "confirm this mail server",
        "connection dropped",
        "connection refused by",
        "connection reset by peer",
        "connection was dropped by remote host",
        "connections not accepted from ip addresses on spamhaus xbl",
        "currently sending spam see: ",
        "domain does not exist:",
        "dynamic/zombied/spam ips blocked",
        "error: no valid recipients from ",
        "esmtp not accepting connections",  # iCloud
        "extreme bad ip profile",
        "go away",
        "helo command rejected:",
        "host network not allowed",
        "hosts with dynamic ip",
        "invalid ip for sending mail of domain",
        "is in a black list",
        "is not allowed to send mail from",
        "mailfrom domain is listed in spamhaus",
        "no access from mail server",
        "no matches to nameserver query",
        "not currently accepting mail from your ip",  # Microsoft
        "part of their network is on our block list",
        "please use the smtp server of your isp",
        "refused - see http",
        "rejected - multi-blacklist",
        "rejected because the sending mta or the sender has not passed validation",
        "rejecting open proxy",  # Sendmail
        "sender ip address rejected",
        "server access forbidden by your ip ",
        "service not available, closing transmission channel",
        "smtp error from remote mail server after initial connection:",  # Exim
        "sorry, that domain isn't in my list of allowed rcpthosts",
        "sorry, your remotehost looks suspiciously like spammer",
        "temporarily deferred due to unexpected volume or user complaints",
        "to submit messages to this e-mail system has been rejected",
        "too many spams from your ip",  # free.fr
        "too many unwanted messages have been sent from the following ip address above",
        "was blocked by ",
        "we do not accept mail from dynamic ips",  # mail.ru
        "you are not allowed to connect",
        "you are sending spam",
        "your ip address is listed in the rbl",
        "your network is temporary blacklisted",
        "your server requires confirmation",
        "( ... @ ... :blocked)",
        "access from ip address ... blocked",
        "client host ... blocked using",
        "connections will not be accepted from ... because the ip is in spamhaus's list",
        "dnsbl:rbl ... >_is_blocked",
        "email blocked by ... .barracudacentral.org",
        "email blocked by ... spamhaus",
        "host ... refused to talk to me: ... blocked",
        "ip ... is blocked by earthlink",
        "is in an ... rbl on ",
        "mail server at ... is blocked",
        "mail from ... refused:",
        "message from ... rejected based on blacklist",
        "messages from ... temporarily deferred due to user complaints",  # Yahoo
        "server ip ... listed as abusive",
        "sorry! your ip address ... is blocked by rbl",
        "the domain ... is blacklisted",
        "the email ... is blacklisted",
        "the ip ... is blacklisted",
        "veuillez essayer plus tard. service refused, please try later. ... 103",  # Orange
        "veuillez essayer plus tard. service refused, please try later. ... 510",  # Orange
        "your access ip ... has been rejected",
        "your sender's ip address is listed at ... .abuseat.org",
    ),
    "mailboxfull": (
        "452 insufficient disk space",
        "account disabled temporarly for exceeding receiving limits",
        "boite du destinataire pleine",
        "exceeded storage allocation",
        "full mailbox",
        "mailbox exceeds allowed size",
        "mailbox size limit exceeded",
        "mailbox would exceed maximum allowed storage",
        "mailfolder is full",
        "no space left on device",
        "not sufficient disk space",
        "quota violation for",
        "too much mail data",  # NTT docomo
        "user has exceeded quota, bouncing mail",
        "user has too many messages on the server",
        "user's space has been used up",
        "mailbox is full",
        "their mailbox is full",  # KDDI
        "account is ... quota",
        "disk ... quota",
        "enough ... space",
        "mailbox ... exceeded ... limit",
        "mailbox ... full",
        "mailbox ... quota",
        "maildir ... quota",
        "over ... quota",
        "quota ... exceeded",
    ),
    "suspend": (
        "recipient account is blocked",  # La Poste
        "compte du destinataire est bloque",  # La Poste
        " is currently suspended",
        " temporary locked",
        "archived recipient",
        "boite du destinataire archivee",
        "email account that you tried to reach is disabled",  # Gmail
        "account is inactive",
        "mailbox disabled",  # RFC 3463 X.2.1 text
        "has been suspended",
        "inactive account",
        "invalid/inactive user",
        "is a deactivated mailbox",  # QQ
        "is unavailable: user is terminated",
        "mailbox currently suspended",
        "mailbox disabled",
        "mailbox is frozen",
        "mailbox unavailable or access denied",
        "recipient rejected: temporarily inactive",
        "recipient suspend the service",
        "the email account that you tried to reach is inactive",
        "this account has been disabled or discontinued",
        "this account has been temporarily suspended",
        "this address no longer accepts mail",
        "this mailbox is disabled",
        "user or domain is disabled",
        "user suspended",  # 163.com
        "vdelivermail: account is locked email bounced",
        "account disabled",
        "account has been disabled",
    ),
    "hostunknown": (
        "domain does not exist",
        "domain is not reachable",
        "domain must exist",
        "host or domain name not found",
        "host unknown",
        "host unreachable",
        "mail domain mentioned in email address is unknown",
        "name or service not known",
        "no such domain",
        "recipient address rejected: unknown domain name",
        "recipient domain must exist",
        "the account or domain may not exist",
        "unknown host",
        "unroutable address",
        "unrouteable address",  # Exim
        "all relevant mx records point to non-existent hosts",  # Exim
        "553 ... does not exist",
    ),
    "hasmoved": (
        " has been replaced by ",
        "user not local; please try",  # RFC 5321 section 3.4, reply 551
        "mailbox was moved to",
    ),
    "norelaying": (
        "as a relay",
        "email address is not verified.",
        "insecure mail relay",
        "is not permitted to relay through this server without authentication",
        "mail server requires authentication when attempting to send to a non-local e-mail address",
        "no relaying",
        "not a gateway",
        "not allowed to relay through this machine",
        "not an open relay, so get lost",
        "not local host",
        "relay access denied",
        "relay denied",
        "relay not permitted",
        "relaying denied",  # Sendmail
        "relaying mail to ",
        "specified domain is not allowed",
        "that domain isn't in my list of allowed rcpthost",
        "this system is not configured to relay mail",
        "unable to relay ",
        "we don't handle mail for",
    ),
    "authfailure": (
        "//spf.pobox.com",
        "bad spf records for",
        "dmarc policy",
        "doesn't meet the required authentication level",
        "please inspect your spf settings",
        "sender policy framework (spf) fail",
        "sender policy framework violation",
        "spf (sender policy framework) domain authentication fail",
        "spf check: fail",
        "the 5322.from address doesn't meet the authentication requirements defined for the sender",
        "does not pass dmarc verification",  # Outlook.com 5.7.509
        "is not allowed to send mail. ... _401",
        "is not allowed to send from < ... per it's spf record",
        "unauthenticated email from ... is not accepted due to domain's dmarc policy",  # Gmail
        "this message does not have authentication information",  # Gmail
        "this message does not pass authentication checks",  # Gmail
        "spf ... dkim ... fail",
        "dkim ... spf ... fail",
    ),
    "badreputation": (
        "a poor email reputation score",
        "has been temporarily rate limited due to ip reputation",
        "ip/domain reputation problems",
        "likely suspicious due to the very low reputation",
        "none/bad reputation",  # t-online.de
        "temporarily deferred due to unexpected volume or user complaints",  # Yahoo
        "the sending mta's poor reputation",
        "very low reputation of the sending domain",  # Gmail
        "our system has detected an unusual rate of unsolicited mail originating from your ip",  # Gmail
    ),
    "requireptr": (
        "access denied. ip name lookup failed",
        "all mail servers must have a ptr record with a valid reverse dns entry",
        "bad dns ptr resource record",
        "cannot find your hostname",
        "cannot find your reverse hostname",  # Postfix reject_unknown_reverse_client_hostname
        "cannot resolve your address.",
        "client host rejected: cannot find your hostname",  # Postfix, Yahoo
        "fix reverse dns for ",
        "ips with missing ptr records",
        "no ptr record found.",
        "please get a custom reverse dns name from your isp for your host",
        "ptr record setup",
        "reverse dns failed",
        "reverse dns required",
        "sender ip reverse lookup rejected",
        "the ip address sending this message does not have a ptr record setup",  # Gmail
        "the corresponding forward dns entry does not point to the sending ip",  # Gmail
        "this system will not accept messages from servers/devices with no reverse dns",
        "unresolvable relay host name",
        "we do not accept mail from hosts with dynamic ip or generic dns ptr-records",
        "domain ... mismatches client ip",
        "dns lookup failure: ... try again later",
        "reverse dns lookup for host ... failed permanently",
        "server access ... forbidden by invalid rdns record of your mail server",
        "service permits ... unverifyable sending ips",
        "no reverse dns",
        "reverse dns ... required",
        "rdns ... required",
    ),
    "notcompliantrfc": (
        "duplicate header",
        "this message is not rfc 5322 compliant",
        "https://support.google.com/mail/?p=rfcmessagenoncompliant",
        " multiple ... header",
    ),
    "contenterror": (
        "header size exceeds maximum permitted",
        "improper use of 8-bit data in message header",
        "message header size, or recipient list, exceeds policy limit",
        "message mime complexity exceeds the policy maximum",
        "routing loop detected -- too many received: headers",
        "this message contain invalid mime headers",
        "this message contain improperly-formatted binary content",
        "this message contain text that uses unnecessary base64 encoding",
    ),
}
