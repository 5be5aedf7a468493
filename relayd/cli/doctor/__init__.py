"""``relayd check-config --dns``: does the published DNS say what the config says?

Mail from a bulk sender is judged by records relayd does not control: the SPF record must authorise every
address relayd sends from (RFC 7208), the DKIM key record must hold the public half of the key relayd signs
with (RFC 6376 §3.6), the domain should publish a DMARC policy (RFC 7489; Gmail and Yahoo require one of
bulk senders since 2024), and the inbound (VERP) domains must have an MX that reaches relayd, or bounces and
complaints never come back and suppression silently stops working. A typo in any of these costs days of
junk-foldered mail before anyone notices, so the operator can ask before sending. The inbound domains
should also publish an MTA-STS policy (RFC 8461) and a TLS reporting record (RFC 8460), so that bounces and
reports reach relayd over verified TLS; those rows warn (``WARN``) rather than fail.

Each check is one :class:`Check` row; :func:`format_table` prints them. DNS trouble (timeouts, SERVFAIL, no
resolver configuration) never raises: it is a failed check whose detail says what went wrong, because the
point of the tool is to report, and one broken zone must not hide the results for the others.

Lookups go to ``[delivery] nameservers`` when set (the resolver relayd delivers with), else the system
resolver. The SPF evaluation is pyspf's (macros, includes, the 10-lookup limit: RFC 7208 is too intricate to
redo here); its DNS is routed through the same nameservers, see relayd.cli.doctor.sending.
"""

from relayd.cli.doctor.lookups import Check, CheckName
from relayd.cli.doctor.plan import format_table, run_checks

__all__ = ["Check", "CheckName", "format_table", "run_checks"]
