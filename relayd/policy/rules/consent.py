"""Consent: lists with ``require_consent`` only mail addresses that confirmed, and double opt-in.

Why: an ESP must be able to prove that every recipient asked for its mail ("double opt-in with proof",
seeds/003; "consent must be provable: date, time, IP of the sign-up", seeds/004). relayd keeps that proof
itself (:class:`~relayd.store.base.ConsentRecord`) instead of trusting the app's word, and refuses to send a
list's mail to anyone without it.

The rule (a :class:`~relayd.policy.model.MessageRule`, after list suppression and before caps in
:mod:`relayd.policy.pipeline`):

* ``[accounts.A.lists.L] require_consent = true``: a recipient without a consent record for (A, L) is dropped
  with reason ``no_consent`` (the pipeline records the event and counts the metric). One store query per
  message (:meth:`~relayd.store.base.ConsentStore.has_consent`).
* An unsubscribe wins over an older consent without any check here: list suppression runs first, so a
  recipient who unsubscribed is dropped ``suppressed:unsubscribe`` before consent is even asked about.

Double opt-in: the app sends the confirmation mail itself, with the header ``X-Relayd-Optin: <list>``
(the list name, or a List-Id naming it) and ``{{confirm_url}}`` where the link goes. Such a message:

* is a message *of that list* (ledger, Feedback-ID, List-Unsubscribe all name it; a ``List-Id`` naming
  another list is refused): using its List-Unsubscribe means "never ask me again", and list suppression keeps
  further confirmation mails away from someone who did;
* passes the consent rule for recipients without consent, but at most one per (account, list, address) per
  24 h (:data:`OPTIN_WINDOW`), reserved atomically in the store
  (:meth:`~relayd.store.base.ConsentStore.reserve_optin`), so the exemption can't be used to mail someone
  over and over who never confirms; a second one inside the window is dropped ``no_consent``. Recipients who
  already consented get it like any mail of the list. Like a send cap, a reservation is not given back when
  a later rule drops the recipient or the queue commit fails (451): it errs on the side of sending less;
* still counts against the list's send caps: it is mail of that list;
* gets ``{{confirm_url}}`` replaced per recipient by ``{public_url}/c/<token>`` (token purpose ``confirm``,
  tied to the queue id and recipient index of the sent ledger and MAC'd over the address, like unsubscribe
  tokens), and text parts without the placeholder get the link in their footer instead of the unsubscribe
  link: the recipient is not subscribed to anything yet. The imprint is still appended everywhere, and the
  ``X-Relayd-Optin`` field is removed (:data:`relayd.mail.rewrite.FORBIDDEN_FIELDS`).

Opening the link shows a page with a button (GET changes nothing: link scanners prefetch); pressing it
records the consent with time, client IP and user agent (:mod:`relayd.feedback.confirm`).
"""

from __future__ import annotations

import logging
from email.message import Message

from relayd.config import Config, ListConfig
from relayd.core.tokens import make_token
from relayd.mail.headers import MimeError
from relayd.mail.listid import list_name
from relayd.mail.rewrite import FooterSpec, Template, prepare
from relayd.policy.model import Action, MessageRequest, Verdict
from relayd.store.base import ConsentStore

__all__ = [
    "CONFIRM_PLACEHOLDER",
    "OPTIN_HEADER",
    "OPTIN_WINDOW",
    "PURPOSE",
    "ConsentRule",
    "OptinHeaderError",
    "confirm_url",
    "optin_list",
    "prepare_confirmation",
]

log = logging.getLogger(__name__)

#: The token purpose mixed into the MAC: a confirm token can't be replayed as an unsubscribe and vice versa.
PURPOSE = "confirm"
#: The header that marks a submitted message as the confirmation mail of a list.
OPTIN_HEADER = "X-Relayd-Optin"
#: What the app writes in a confirmation mail's body where the confirm link goes.
CONFIRM_PLACEHOLDER = "{{confirm_url}}"
#: At most one confirmation mail per (account, list, address) in this many seconds.
OPTIN_WINDOW = 86_400.0

# A confirmation mail's footer: the confirm link where other mail has the unsubscribe link (FooterSpec
# needs the {url} slot in both templates), and the imprint, which every mail carries (seeds/003).
_TEXT_FOOTER = "\n\n-- \nConfirm your subscription: {url}\n{imprint}\n"
_HTML_FOOTER = (
    '\n<div style="margin-top:2em;font-size:12px;color:#666666">'
    '<a href="{url}">Confirm your subscription</a><br>\n{imprint}</div>\n'
)


class OptinHeaderError(MimeError):
    """``X-Relayd-Optin`` is malformed, repeated, contradicts ``List-Id``, or the body uses the unsubscribe
    placeholder. A :class:`MimeError`, so the listener answers ``554 5.6.0`` and the app sees why."""


def confirm_url(public_url: str, secret: bytes, queue_id: str, index: int, address: str) -> str:
    """``{public_url}/c/<token>``: the link that lets ``address`` confirm (as short as ``/u/<token>``)."""
    return f"{public_url.rstrip('/')}/c/{make_token(secret, PURPOSE, queue_id, index, address)}"


def optin_list(headers: Message, list_id_name: str | None) -> str | None:
    """The list a confirmation mail is for, or None when ``headers`` has no ``X-Relayd-Optin``.

    ``list_id_name`` is the list the ``List-Id`` names (None when absent). Raises :class:`OptinHeaderError`
    for two ``X-Relayd-Optin`` fields, a value that names no list, or a ``List-Id`` naming another list: a
    message can't be the confirmation mail of one list and the mail of another.
    """
    values = headers.get_all(OPTIN_HEADER) or []
    if not values:
        return None
    if len(values) > 1:
        raise OptinHeaderError(f"{OPTIN_HEADER} occurs {len(values)} times; name one list")
    name = list_name(str(values[0]))
    if name is None:
        raise OptinHeaderError(f"{OPTIN_HEADER}: {str(values[0])[:64]!r} is not a list name")
    if list_id_name is not None and list_id_name != name:
        raise OptinHeaderError(f"{OPTIN_HEADER} names list {name!r} but List-Id names list {list_id_name!r}")
    return name


def prepare_confirmation(raw: bytes, imprint: str, feedback_id: str) -> Template:
    """:func:`relayd.mail.rewrite.prepare` for a confirmation mail: ``{{confirm_url}}`` is the URL slot.

    Render it with ``body_url=confirm_url(...)``. Raises :class:`OptinHeaderError` when the body holds
    ``{{unsubscribe_url}}`` (searched in the raw bytes, so only where it is literal): a confirmation mail
    goes to someone not subscribed yet, and that link would have to be either missing or the confirm link
    under a false name. Raises :class:`MimeError` like ``prepare``.
    """
    if b"{{unsubscribe_url}}" in raw:
        raise OptinHeaderError(
            "a confirmation mail (X-Relayd-Optin) places its link with {{confirm_url}}, "
            "not {{unsubscribe_url}}"
        )
    footer = FooterSpec(_TEXT_FOOTER, _HTML_FOOTER, imprint)
    return prepare(raw, footer, feedback_id, placeholder=CONFIRM_PLACEHOLDER)


def _no_consent(address: str, lname: str) -> Verdict:
    return Verdict(
        Action.REJECT, ConsentRule.name, "no_consent", f"550 5.7.1 <{address}>: no consent for list {lname}"
    )


def _optin_spent(address: str, lname: str) -> Verdict:
    return Verdict(
        Action.REJECT,
        ConsentRule.name,
        "no_consent",
        f"550 5.7.1 <{address}>: no consent for list {lname}; "
        "a confirmation mail was sent less than 24 h ago",
    )


class ConsentRule:
    """The consent check; ``optin=True`` is the instance the pipeline uses for confirmation mails.

    Two instances rather than a flag on the request: the pipeline picks a rule tuple per kind of message
    (order is data), and :class:`~relayd.policy.model.MessageRequest` stays as it is.
    """

    name = "consent"

    def __init__(self, store: ConsentStore, cfg: Config, *, optin: bool = False) -> None:
        self._store = store
        self._cfg = cfg
        self._optin = optin

    def _required(self, account: str, lname: str) -> bool:
        acct = self._cfg.accounts.get(account)
        return acct is not None and acct.lists.get(lname, ListConfig()).require_consent

    async def check(self, req: MessageRequest, recipients: tuple[str, ...]) -> dict[str, Verdict]:
        lname = req.list_name
        if not recipients or lname is None:
            return {}  # an unnamed list has no config, so it can't require consent
        if not self._optin and not self._required(req.account, lname):
            return {}  # the common case costs nothing
        consented = await self._store.has_consent(req.account, lname, recipients)
        missing = [r for r in recipients if r not in consented]
        if not self._optin:
            return {r: _no_consent(r, lname) for r in missing}
        if not missing:
            return {}
        allowed = await self._store.reserve_optin(req.account, lname, missing, req.now, OPTIN_WINDOW)
        for rcpt in missing:
            if rcpt in allowed:
                log.info(
                    "%s: account=%s list=%s rcpt=<%s> confirmation mail (double opt-in)",
                    req.queue_id,
                    req.account,
                    lname,
                    rcpt,
                )
        return {r: _optin_spent(r, lname) for r in missing if r not in allowed}
