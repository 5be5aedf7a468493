"""Consent: lists with ``require_consent`` only mail addresses that confirmed, and double opt-in.

Why: an ESP must be able to prove that every recipient asked for its mail ("double opt-in with proof",
seeds/003; "consent must be provable: date, time, IP of the sign-up", seeds/004). relayd keeps that proof
itself (:class:`~relayd.store.models.ConsentRecord`) instead of trusting the app's word, and refuses to send a
list's mail to anyone without it.

The rule (a :class:`~relayd.policy.model.MessageRule`, after list suppression and before caps in
:mod:`relayd.policy.pipeline`):

* ``[accounts.A.lists.L] require_consent = true``: a recipient without a consent record for (A, L) is dropped
  with reason ``no_consent`` (the pipeline records the event and counts the metric). One store query per
  message (:meth:`~relayd.store.protocols.ConsentStore.has_consent`).
* An unsubscribe wins over an older consent without any check here: list suppression runs first, so a
  recipient who unsubscribed is dropped ``suppressed:unsubscribe`` before consent is even asked about.

Double opt-in: the app sends the confirmation mail itself, with the header ``X-Relayd-Optin: <list>``
(the list name, or a List-Id naming it) and ``{{confirm_url}}`` where the link goes. Such a message:

* is a message *of that list* (ledger, Feedback-ID, List-Unsubscribe all name it; a ``List-Id`` naming
  another list is refused): using its List-Unsubscribe means "never ask me again", and list suppression keeps
  further confirmation mails away from someone who did;
* passes the consent rule for recipients without consent, but at most one per (account, list, address) per
  24 h (:data:`OPTIN_WINDOW`), reserved atomically in the store
  (:meth:`~relayd.store.protocols.ConsentStore.reserve_optin`), so the exemption can't be used to mail someone
  over and over who never confirms; a second one inside the window is dropped ``no_consent``. Recipients who
  already consented get it like any mail of the list. Like a send cap, a reservation is not given back when
  a later rule drops the recipient or the queue commit fails (451): it errs on the side of sending less;
* still counts against the list's send caps: it is mail of that list;
* gets ``{{confirm_url}}`` replaced per recipient by its confirm link, the footer of a confirmation
  mail, and no ``X-Relayd-Optin`` field (:mod:`relayd.mail.confirmation` reads the header and makes the
  link).

Opening the link shows a page with a button (GET changes nothing: link scanners prefetch); pressing it
records the consent with time, client IP and user agent (:mod:`relayd.feedback.confirm`).
"""

from __future__ import annotations

import logging

from relayd.config import Config, ListConfig
from relayd.policy.model import Action, MessageRequest, Verdict
from relayd.store.protocols import ConsentStore

__all__ = ["OPTIN_WINDOW", "ConsentRule"]

log = logging.getLogger(__name__)

#: At most one confirmation mail per (account, list, address) in this many seconds.
OPTIN_WINDOW = 86_400.0


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
