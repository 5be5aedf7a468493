"""Transactional mail: the message class an app asks for with ``X-Relayd-Class``, and what it changes.

Why: a password reset, a receipt or a login code is mail the person asked for by doing something, not mail
of a list. Sent as bulk it carries the unsubscribe link of "all mail of the account"; one click and the next
password reset to that person is refused. An account with ``transactional = true`` may mark such a message
``X-Relayd-Class: transactional``; ``bulk`` (or no field) is the normal class.

The field (value case-insensitive, blanks around it ignored):

* ``transactional`` from an account without ``transactional = true`` -> ``550 5.7.1``: an account that
  could set it on its newsletter would escape every unsubscribe, so the operator grants it per account;
* any other value than ``bulk`` or ``transactional``, or more than one such field -> ``550 5.6.0``:
  guessing would send a newsletter as a password reset or the other way round;
* a confirmation mail (``X-Relayd-Optin``) is its own kind of mail and can't be transactional
  -> ``550 5.6.0``.

It is an instruction to relayd, never delivered: :func:`strip_class_field` removes it before the message
is queued, so it is neither stored, nor DKIM-signed, nor sent (and :mod:`relayd.mail.rewrite` removes
any instance left, as it does for the other fields only relayd may set). The class is stored with the
queued message (``messages.msg_class``), where the dequeue check and the copy made at delivery read it.

What transactional mail changes:

* no ``List-Unsubscribe`` / ``List-Unsubscribe-Post`` and no unsubscribe link in the footer; the imprint
  stays (the sender's legal identity is owed on every message); ``Feedback-ID`` and the ``X-Relayd-ID``
  trace token stay, so bounces and complaints are still attributed. An app's ``{{unsubscribe_url}}`` in
  the body is left as written: there is no link to put there. No ``List-Id`` is needed.
* suppression: it passes an *unsubscribe* at list or account scope, and nothing else
  (:func:`relayd.policy.rules.suppression.transactional_passes`): a hard bounce or any other global entry, a
  complaint (at any scope), a spam-trap entry, a manual or discard entry, a soft-bounce limit, or a reason
  added later stops it, at submission and at dequeue alike. A later unsubscribe leaves it in the queue.
* not held back by per-list send caps or consent (nor counted against a cap), at submission or dequeue.
* unchanged: discard patterns, spam traps, suspension, the From and MIME checks; a bounce of it
  suppresses and a complaint about it counts as for any mail.
"""

from __future__ import annotations

from email.message import Message

from relayd.config import Config
from relayd.core.msgclass import CLASS_FIELD, MessageClass
from relayd.policy.model import Action, ContentRequest, Verdict

__all__ = ["MessageClassRule", "class_values", "message_class", "strip_class_field"]

_NAME = CLASS_FIELD.lower()
_NAME_BYTES = _NAME.encode("ascii")


def class_values(headers: Message) -> list[str]:
    """The values of every top-level class field; obs-syntax blanks before the colon count too."""
    return [str(v) for k, v in headers.items() if k.rstrip(" \t").lower() == _NAME]


def _parse(value: str) -> MessageClass | None:
    try:
        return MessageClass(" ".join(value.split()).lower())
    except ValueError:
        return None


def message_class(headers: Message) -> MessageClass:
    """The class a message asks for, once :class:`MessageClassRule` has let it through."""
    values = class_values(headers)
    return (_parse(values[0]) if len(values) == 1 else None) or MessageClass.BULK


class MessageClassRule:
    """Content rule: the class field is well-formed, and only granted accounts use ``transactional``."""

    name = "message-class"

    def __init__(self, cfg: Config) -> None:
        self._allowed = frozenset(name for name, acct in cfg.accounts.items() if acct.transactional)

    def check(self, req: ContentRequest) -> Verdict | None:
        values = class_values(req.headers)
        if not values:
            return None
        if len(values) > 1:
            return self._refuse("550 5.6.0", "more than one field; send one, bulk or transactional")
        wanted = _parse(values[0])
        if wanted is None:
            return self._refuse("550 5.6.0", 'must be "bulk" or "transactional"')
        if wanted is MessageClass.BULK:
            return None
        if req.account not in self._allowed:
            return self._refuse("550 5.7.1", f"account {req.account} may not send transactional mail")
        if req.optin:
            return self._refuse("550 5.6.0", "a confirmation mail (X-Relayd-Optin) can't be transactional")
        return None

    def _refuse(self, code: str, text: str) -> Verdict:
        return Verdict(Action.REJECT, self.name, "message_class", f"{code} {CLASS_FIELD}: {text}")


def strip_class_field(raw: bytes) -> bytes:
    """``raw`` without its top-level class fields (each with its continuation lines); ``raw`` itself when
    it has none. One pass over the header block with ``find``: linear, no regex over the sender's text.

    Lines may end in CRLF or, before canonicalisation, a bare LF; the header block ends at the first
    empty line (or at the end of ``raw``)."""
    out: list[bytes] = []
    pos = 0
    skipping = False
    removed = False
    while pos < len(raw):
        end = raw.find(b"\n", pos)
        end = len(raw) if end < 0 else end + 1
        line = raw[pos:end]
        if line in (b"\r\n", b"\n"):
            break  # the empty line: the body starts here
        if line[:1] in (b" ", b"\t"):
            keep = not skipping  # a continuation belongs to the field before it
        else:
            colon = line.find(b":")
            skipping = colon > 0 and line[:colon].rstrip(b" \t").lower() == _NAME_BYTES
            keep = not skipping
        if keep:
            out.append(line)
        else:
            removed = True
        pos = end
    if not removed:
        return raw
    return b"".join(out) + raw[pos:]
