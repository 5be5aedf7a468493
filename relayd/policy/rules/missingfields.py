"""Add the ``Date:`` and ``Message-ID:`` fields a submitted message lacks, as Postfix's cleanup does for
submission (``always_add_missing_headers``).

Why: RFC 5322 §3.6 requires an origination date and RFC 5322 §3.6.4 says every message SHOULD have a
Message-ID; receivers enforce both (Gmail refuses mail without a Message-ID, spam filters score a missing
Date). Apps that build messages by hand (``smtplib.sendmail`` with a string) often leave them out, so the
submission server adds them (RFC 6409 §8.3 "Add 'Message-ID:'", §8.2 "Add 'Date:'").

* ``Date:`` is the time of acceptance, RFC 5322 §3.3 form, in UTC (``Mon, 07 Dec 2026 11:47:07 +0000``).
* ``Message-ID: <queue-id@hostname>`` with ``[server] hostname``: the queue id is unique per message, so the
  id is too, and it tells an admin which queue entry a complaint is about.

The fields go at the top of the header block, the way relayd adds its other fields
(:mod:`relayd.mail.rewrite`), so the app's block stays one untouched slice. They are added to the message
as it is queued, not to the per-recipient template: a copy made again at delivery (a retry, a restart)
then carries the very same Date and Message-ID as the first ones, and ``relayd queue cat`` shows them.
Both names are in :data:`relayd.mail.dkim.SIGNED_HEADERS`, so every copy's signature covers them.

A field counts as present when a field of that name exists at the top level, whatever its value, like
Postfix (which only looks at the name): an empty or duplicated Date or Message-ID is the app's choice and
stays as sent; adding a second instance next to it would leave receivers to pick one (RFC 5322 §3.6 allows
exactly one of each), and removing the app's would change its signed header block.
"""

from __future__ import annotations

import email.utils
from datetime import datetime
from email.message import Message

__all__ = ["add_missing_fields"]


def add_missing_fields(raw: bytes, headers: Message, *, queue_id: str, hostname: str, now: datetime) -> bytes:
    """``raw`` with ``Date:`` and ``Message-ID:`` prepended when ``headers`` (its parsed top-level header
    block) has no field of that name; ``raw`` itself when it has both.

    ``now`` is the time of acceptance (an aware datetime); ``queue_id`` and ``hostname`` are relayd's own
    values, never the sender's; a character of ``hostname`` that can't stand in a dot-atom
    (RFC 5322 §3.6.4) becomes ``-``, so the field is always well-formed.
    """
    # obs-syntax allows blanks before the colon (RFC 5322 §4.5): "Date :" is a Date field too
    names = {key.rstrip(" \t").lower() for key in headers}
    added = b""
    if "date" not in names:
        added += b"Date: " + email.utils.format_datetime(now).encode("ascii") + b"\r\n"
    if "message-id" not in names:
        right = "".join(c if c.isascii() and (c.isalnum() or c in ".-") else "-" for c in hostname)
        added += f"Message-ID: <{queue_id}@{right or 'localhost'}>\r\n".encode("ascii")
    return added + raw if added else raw
