"""How much of a report the parsers examine: caps against hostile input.

Anyone can mail a bounce or a complaint to the inbound domains, so every parser must
finish quickly on any input. The matching code is linear in what it reads; these caps
bound what it reads, so one message costs a bounded amount of CPU however it is built.
Each cap is generous for real reports: the diagnostic an MTA writes about one recipient
is rarely over a few hundred bytes, a notice rarely over a few KB, and a DSN names one
recipient for mail sent with VERP (one envelope per recipient). What lies beyond a cap
is ignored, never an error.
"""

from __future__ import annotations

#: Characters of diagnostic text (normalised) matched against the phrase tables per
#: recipient. Each reason's table is a few hundred substring searches over this text.
DIAGNOSTIC_LIMIT = 8 * 1024

#: Characters of raw text read around one recipient (Diagnostic-Code, notice block)
#: before whitespace is collapsed, and of text scanned for SMTP reply facts.
CONTEXT_LIMIT = 64 * 1024

#: Characters of human-readable notice (the text before any returned message) read
#: for recipients and their context.
NOTICE_LIMIT = 64 * 1024

#: Bytes of each decoded MIME part turned into text (notice parts, delivery-status
#: and feedback-report bodies, returned headers). Whole returned messages are not read.
PART_LIMIT = 256 * 1024

#: MIME parts examined per message; a report has two or three.
MAX_PARTS = 100

#: Per-recipient status records classified per report. Mail sent with VERP has one
#: recipient per envelope, so a genuine report about relayd mail names one.
MAX_RECIPIENTS = 100

#: Characters of a recipient field (Final-Recipient, Original-Rcpt-To...) searched for
#: an address: an address is at most 254 octets (RFC 5321 4.5.3.1.3), plus a comment.
ADDRESS_FIELD_LIMIT = 2 * 1024

#: Bytes of a message handed to flufl.bounce (the last-resort recipient finder), and
#: the length each of its lines is cut to: RFC 5322 allows 998 characters a line, the
#: historic notices flufl.bounce reads keep far below it, and some of its expressions
#: are quadratic in the length of a line.
FALLBACK_LIMIT = 32 * 1024
FALLBACK_LINE_LIMIT = 256

#: Bytes of each Content-Type header field given to the standard library's MIME
#: parser, whose parameter parsing is quadratic in the field's length.
CONTENT_TYPE_LIMIT = 4 * 1024
