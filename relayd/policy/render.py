"""Each recipient's copy, made at delivery: the rewritten message filled in for that recipient and signed.

Why at delivery and not before the ``250``: every recipient gets a copy of their own (unsubscribe link in
``List-Unsubscribe`` and in the footer, trace token, and so a DKIM signature of its own, one RSA operation
each). Made before the reply, a message to 10 recipients kept its client waiting for 10 signatures and the
queue wrote and fsynced 10 copies. Now the queue holds the message once, as accepted (our ``Received``
field + the content), and a copy is a pure function of it, the account's config, the secret and (queue id,
index, address): a retry or a restart makes the same copy again. What differs is deliberate: the DKIM
``t=`` is the time of that attempt, and the key is the one configured then (a rotated key signs the mail
still queued; Postfix + OpenDKIM sign before queueing and would send the old key's signature).

The rewrite of the message (:class:`Prepared`) is done once at submission, which is also where broken MIME
is refused; it is kept in memory until each recipient's first attempt has used it. A retry after that, or
after a restart, prepares it again from the stored message: the same code on the same bytes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32

from relayd.config import Config, domain_key
from relayd.core import metrics
from relayd.core.models import DueRecipient
from relayd.core.msgclass import MessageClass
from relayd.core.tokens import make_token
from relayd.core.usecache import UseCache
from relayd.mail import chunks
from relayd.mail.author import author_domain
from relayd.mail.confirmation import confirm_url, optin_list, prepare_confirmation
from relayd.mail.dkim import Signer
from relayd.mail.listid import campaign_id, list_name
from relayd.mail.rewrite import (
    DEFAULT_HTML_TEMPLATE,
    DEFAULT_TEXT_TEMPLATE,
    FooterSpec,
    Template,
    format_feedback_id,
    prepare,
)
from relayd.policy.reloaded import Reloaded

log = logging.getLogger(__name__)

#: above this a rewrite runs on a thread: a multi-megabyte parse takes seconds of CPU, and on a thread the
#: interpreter switches back to the event loop every few milliseconds, so other sessions keep moving
BIG_MESSAGE = 256 * 1024

#: prepared messages kept for their first attempts, in bytes of template text per worker process (the
#: scheduler keeps the messages themselves as well, up to 64 MiB): a burst bigger than this is prepared
#: again from disk at delivery, which costs CPU, not correctness
_CACHE_BYTES = 32 * 1024 * 1024

_FROM_DISK_BYTES = 8 * 1024 * 1024
_REUSES = 1 << 30  # until it is pushed out

_HEADERS = BytesHeaderParser(policy=compat32)


def _size(prepared: Prepared) -> int:
    return prepared.template.size


def unsubscribe_url(public_url: str, secret: bytes, queue_id: str, index: int, address: str) -> str:
    """The RFC 8058 one-click target (and footer link) of one recipient's copy."""
    return _unsubscribe_url(public_url, make_token(secret, "unsub", queue_id, index, address))


def _unsubscribe_url(public_url: str, token: str) -> str:
    return f"{public_url.rstrip('/')}/u/{token}"


def _unsubscribe_mailto(domain: str, token: str) -> str:
    return f"unsubscribe+{token}@{domain}"


def relayd_id(secret: bytes, queue_id: str, index: int, address: str) -> str:
    return make_token(secret, "trace", queue_id, index, address)


@dataclass(frozen=True, slots=True)
class Meta:
    """What the policy reads from a message's header before deciding anything."""

    headers: Message
    #: the list the message is mail of: List-Id's, or the one a confirmation mail's X-Relayd-Optin names
    list_name: str | None
    optin: bool  # a double opt-in confirmation mail: the body's link is the confirm link
    campaign: str | None


def read_meta(raw: bytes, start: int = 0) -> Meta:
    """Raises OptinHeaderError (a MimeError: 554 5.6.0) for a malformed X-Relayd-Optin.

    Only the header section goes to the parser: handed the whole message, it decodes all of it to one
    string, splits that into lines and joins them again as the payload, several times the message's size
    for a body nothing here reads. The header fields it returns are the same (the first empty line ends the
    header section, RFC 5322 §2.1). The message is ``raw[start:]``."""
    end = raw.find(b"\r\n\r\n", start)
    headers = _HEADERS.parsebytes(raw[start : end + 4] if end >= 0 else raw[start:])
    lname = list_name(headers.get("List-Id"))
    optin = optin_list(headers, lname)
    return Meta(headers, optin or lname, optin is not None, campaign_id(headers.get("X-Campaign-ID")))


@dataclass(frozen=True, slots=True)
class Prepared:
    """One message rewritten, with holes for each recipient's values, and whose key signs it."""

    template: Template
    optin: bool
    domain: str | None  # DKIM d=; None: no key for it, sent unsigned (logged at submission)


def prepare_message(
    cfg: Config,
    signer: Signer,
    account: str,
    meta: Meta,
    raw: bytes,
    msg_class: MessageClass = MessageClass.BULK,
    start: int = 0,
) -> Prepared:
    """Rewrite ``raw[start:]`` (the content as submitted) for ``account``. Raises MimeError (554 5.6.0).

    Transactional mail gets the imprint without an unsubscribe link or List-Unsubscribe
    (:mod:`relayd.policy.rules.messageclass`). An account no longer configured (removed while its mail was
    queued) still gets the footer, without an imprint, and no DKIM signature (:func:`signing_domain`)."""
    acct = cfg.accounts.get(account)
    imprint = acct.imprint if acct is not None else ""
    feedback_id = format_feedback_id(
        meta.campaign or "", meta.list_name or "", account, cfg.server.feedback_sender_id
    )
    if meta.optin:
        template = prepare_confirmation(raw[start:] if start else raw, imprint, feedback_id)
    else:
        bulk = msg_class is not MessageClass.TRANSACTIONAL
        spec = FooterSpec(DEFAULT_TEXT_TEMPLATE, DEFAULT_HTML_TEMPLATE, imprint, link=bulk)
        template = prepare(raw, spec, feedback_id, unsubscribe=bulk, start=start)
    return Prepared(template, meta.optin, signing_domain(cfg, signer, account, author_domain(meta.headers)))


def rebased(prepared: Prepared, content: bytes, data: bytes, shift: int) -> Prepared:
    """``prepared`` (made from ``content``) over ``data``, which holds ``content`` from offset ``shift``:
    the message as queued, behind our ``Received`` field. The template then shares the queue's bytes
    instead of keeping a second copy of a big message alive; ``prepared`` as it is when its template is
    not over ``content`` itself (a message whose line ends had to be made CRLF)."""
    template = prepared.template
    if template.source is not content:
        return prepared
    return dataclasses.replace(prepared, template=template.rebase(data, shift))


def signing_domain(cfg: Config, signer: Signer, account: str, from_domain: str | None) -> str | None:
    """DKIM ``d=`` for a message of ``account`` whose (first) From address has ``from_domain``.

    Only the account's own domains are candidates: a key held for another tenant's domain must never
    sign this account's mail, or the mail passes DMARC as that tenant. So: the From domain, or the
    closest parent of it that is still the account's (relaxed alignment, RFC 7489 §3.1.1), when we hold
    a key for it; else the account's ``signing_domain`` (the operator's choice) when keyed; else None,
    and the message goes unsigned (logged at submission). An account no longer configured signs
    nothing: nothing says which domains are its own any more."""
    acct = cfg.accounts.get(account)
    if acct is None:
        return None
    keyed = signer.domains()
    candidate = domain_key(from_domain) if from_domain else ""
    while candidate and acct.sends_as(candidate):
        if candidate in keyed:
            return candidate
        candidate = candidate.partition(".")[2]
    own = domain_key(acct.signing_domain) if acct.signing_domain else ""
    return own if own in keyed else None


def trace_end(data: bytes) -> int:
    """Where our ``Received`` field (the first field of every stored message, folded) ends and the
    content as submitted begins; 0 for stored data without one (written by a test or a tool)."""
    if not data.startswith(b"Received:"):
        return 0
    pos = 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            return 0
        if data[end + 2 : end + 3] not in (b" ", b"\t"):
            return end + 2
        pos = end + 2


class Renderer:
    """Makes the copy for one recipient; holds the prepared messages between submission and delivery."""

    def __init__(self, cfg: Config, secret: bytes, signer: Signer) -> None:
        self.cfg = cfg
        self.secret = secret
        self.signer = signer
        self._cache: UseCache[Prepared] = UseCache(_CACHE_BYTES)
        #: prepared again from disk (a delivery process, a retry, a restart): kept for the message's
        #: other recipients, most recent first, within a smaller budget
        self._from_disk: UseCache[Prepared] = UseCache(_FROM_DISK_BYTES)

    def reload(self, new: Reloaded) -> None:
        """New accounts, imprints or keys: messages already prepared are prepared again when next sent."""
        self.cfg, self.signer = new.cfg, new.signer
        self._cache.clear()
        self._from_disk.clear()

    def keep(self, queue_id: str, prepared: Prepared, uses: int) -> None:
        """Hold ``prepared`` for the first attempt of each of the message's ``uses`` recipients."""
        self._cache.put(queue_id, prepared, uses, _size(prepared))

    def forget(self, queue_id: str) -> None:
        """The message was not queued after all."""
        self._cache.forget(queue_id)

    def copy(self, prepared: Prepared, queue_id: str, index: int, address: str) -> list[bytes | memoryview]:
        """The signed copy (without our ``Received`` field) for recipient ``index``, ``address``, as the
        pieces to send in order (relayd.mail.chunks: the message's big slices are shared, not copied)."""
        cfg, secret = self.cfg, self.secret
        public = cfg.http.public_url
        unsub = make_token(secret, "unsub", queue_id, index, address)  # the link's and the mailto's
        body = prepared.template.render_parts(
            unsubscribe_url=_unsubscribe_url(public, unsub),
            unsubscribe_mailto=_unsubscribe_mailto(cfg.inbound.domains[0], unsub),
            relayd_id=relayd_id(secret, queue_id, index, address),
            # consent: the confirm link, tied to this ledger record (queue id, index)
            body_url=confirm_url(public, secret, queue_id, index, address) if prepared.optin else None,
        )
        if sum(map(len, body)) <= chunks.WINDOW:  # everyday mail: one join, then the plain bytes paths
            body = [b"".join(body)]
        if prepared.domain is None:
            return body
        t0 = time.perf_counter()
        one = chunks.single(body)
        if one is not None:
            signature = self.signer.sign(one, prepared.domain)
        else:
            signature = chunks.sign(self.signer, body, prepared.domain)
        metrics.DKIM_SECONDS.observe(time.perf_counter() - t0)
        return [signature, *body]

    async def render(self, item: DueRecipient, data: bytes) -> list[bytes | memoryview]:
        """The exact bytes to deliver to ``item``, from the message as stored, as pieces to send in order
        (:meth:`copy`). Raises MimeError only if a stored message no longer parses, which it did at
        submission (a bug: the attempt is deferred)."""
        cut = trace_end(data)
        prepared = self._cache.take(item.queue_id) or self._from_disk.take(item.queue_id)
        if prepared is None:
            # prepared over the stored bytes themselves (from ``cut``): the template's slices are of them
            meta = read_meta(data, cut)
            args = (self.cfg, self.signer, item.account, meta, data, item.msg_class, cut)
            if len(data) - cut > BIG_MESSAGE:
                prepared = await asyncio.to_thread(prepare_message, *args)
            else:
                prepared = prepare_message(*args)
            self._from_disk.put(item.queue_id, prepared, _REUSES, _size(prepared))
        pieces = [data[:cut], *self.copy(prepared, item.queue_id, item.index, item.address)]
        if sum(map(len, pieces)) <= chunks.WINDOW:
            return [b"".join(pieces)]  # one piece: the transport sends it with one write, no windows
        return pieces
