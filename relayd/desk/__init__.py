"""The postmaster's desk: what mail to abuse@, postmaster@ and dmarc@ asks of a person, kept and summed up.

* :mod:`relayd.desk.inbox`: which inbound messages are kept for a person, and keeping them (size and
  per-source caps);
* :mod:`relayd.desk.forward`: the copy of a kept message sent to ``[inbound] postmaster_forward``;
* :mod:`relayd.reports.dmarc`: reading DMARC aggregate reports (RFC 7489 appendix C) safely;
* :mod:`relayd.desk.dmarcstats`: storing their counts and the summary ``relayd dmarc summary`` prints;
* :mod:`relayd.desk.service`: the object the inbound listener hands these messages to.
"""
