"""The copy of a kept inbox item sent to ``[inbound] postmaster_forward``.

Why a forward at all: a postmaster reads mail, not a command line. The copy goes through relayd's own
queue (retried, shaped, logged like any other delivery) as a new message from ``postmaster@<inbound
domain>`` to the configured address only, with the kept message attached whole (``message/rfc822``) or,
when it was cut at the inbox's size cap or is not 7-bit clean, as an ``application/octet-stream``
``.eml`` file, so that nothing of it is re-encoded on the way.

Loops are impossible by construction:

* the envelope sender is null (``MAIL FROM:<>``, RFC 5321 §4.5.5): a bounce of the forward goes nowhere,
  and the reporter is never written to, neither by envelope nor by header;
* the copy says ``Auto-Submitted: auto-generated`` (RFC 3834), so a well-behaved auto-responder at the
  forward address does not answer it; an answer that comes anyway (auto-reply, bounce) is kept but
  never forwarded again (:func:`should_forward`);
* the forward address may not be one of relayd's own inbound addresses (a config error), so the copy
  never comes back into the inbox.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from email.mime.application import MIMEApplication
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import SMTP
from email.utils import format_datetime, make_msgid

from relayd.core.tokens import new_queue_id
from relayd.desk.inbox import headers_of
from relayd.queue.store import NewMessage, QueueStore
from relayd.store.models import InboxItem

log = logging.getLogger(__name__)

__all__ = ["FORWARD_ACCOUNT", "MARK_HEADER", "forward", "forward_message", "should_forward"]

#: The account name the forwards are queued under (no configured account can have a dot in its name).
FORWARD_ACCOUNT = "relayd.desk"
#: Set on every forward: a message carrying it is one of ours come back, and is never forwarded again.
MARK_HEADER = "X-Relayd-Inbox-Item"


def should_forward(raw: bytes, mail_from: str) -> bool:
    """Whether a kept message may be forwarded: not from the null sender or MAILER-DAEMON (a bounce),
    not an automatic answer (``Auto-Submitted`` other than ``no``, RFC 3834; ``Precedence: auto_reply``,
    ``X-Autoreply``, ``X-Autorespond``), and not a forward of ours come back. A provider's notice sent as
    bulk mail is forwarded: it answers nothing, so it cannot start a loop."""
    headers = headers_of(raw)
    if headers.get(MARK_HEADER) is not None:
        return False
    auto = str(headers.get("Auto-Submitted", "no")).strip().lower()
    if auto and not auto.startswith("no"):
        return False
    if str(headers.get("Precedence", "")).strip().lower() == "auto_reply":
        return False
    if headers.get("X-Autoreply") is not None or headers.get("X-Autorespond") is not None:
        return False
    sender = mail_from.strip().strip("<>").lower()
    return bool(sender) and sender.partition("@")[0] != "mailer-daemon"


def forward_message(item: InboxItem, raw: bytes, sender: str, to: str, hostname: str) -> bytes:
    """The forward of ``item`` (``raw`` is what the inbox kept of it) from ``sender`` to ``to``."""
    msg = MIMEMultipart("mixed")
    msg["From"] = f"relayd postmaster desk <{sender}>"
    msg["To"] = to
    subject = item.subject or "(no subject)"
    msg["Subject"] = f"[relayd inbox {item.id} {item.kind}] {subject}"
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = make_msgid(domain=hostname)
    msg["Auto-Submitted"] = "auto-generated"
    msg[MARK_HEADER] = str(item.id)
    summary = (
        f"relayd kept this message in its postmaster inbox as item {item.id} ({item.kind}).\n\n"
        f"Received:  {item.received_at.isoformat()} from {item.source}\n"
        f"Envelope:  MAIL FROM:<{item.mail_from}>\n"
        f"From:      {item.from_header}\n"
        f"Subject:   {item.subject}\n"
        f"Date:      {item.date_header}\n"
        + (f"Note:      {item.note}\n" if item.note else "")
        + (
            f"Size:      {item.size} bytes, of which the first {len(raw)} were kept\n"
            if item.truncated
            else ""
        )
        + f"\nMark it done with: relayd inbox done {item.id}\n"
        "Replying to this message reaches nobody; write to the sender of the attached message instead.\n"
    )
    msg.attach(MIMEText(summary, "plain", "utf-8"))
    attachment: MIMEBase
    if not item.truncated and _clean(raw):
        attachment = MIMEBase("message", "rfc822")
        attachment.set_payload(raw.decode("ascii"))
        attachment["Content-Transfer-Encoding"] = "7bit"
    else:
        attachment = MIMEApplication(raw, "octet-stream")
    attachment.add_header("Content-Disposition", "attachment", filename=f"inbox-{item.id}.eml")
    msg.attach(attachment)
    return msg.as_bytes(policy=SMTP)


def _clean(raw: bytes) -> bool:
    """7-bit with lines an SMTP server takes (RFC 5322 §2.1.1): what message/rfc822 may carry as is."""
    return raw.isascii() and all(len(line) <= 998 for line in raw.split(b"\n"))


async def forward(
    queue: QueueStore, item: InboxItem, raw: bytes, *, to: str, inbound: str, hostname: str
) -> str:
    """Queue the forward of ``item`` to ``to`` with a null envelope sender; return its queue id.
    Raises StorageError when the queue cannot take it."""
    sender = f"postmaster@{inbound}"
    data = forward_message(item, raw, sender, to, hostname)
    msg = NewMessage(new_queue_id(), FORWARD_ACCOUNT, "", (to,), data)
    await queue.enqueue(msg)
    log.info("%s: inbox item %d forwarded to <%s>", msg.queue_id, item.id, to)
    return msg.queue_id
