"""The header From (and Sender) must name the submitting account's own domains.

Why: the listener checks the envelope sender (``553 5.7.1``), but on the way out the envelope is relayd's
VERP address; what DMARC judges (RFC 7489 §3.1), what DKIM ``d=`` aligns with and what the reader sees is
the header From. Unchecked, account acme could write ``From: ceo@beta.example`` and have it signed with
beta's key, passing DMARC as another tenant. So every address of From (RFC 5322 §3.6.2 allows a list) and
the Sender, when present, must be the account's, decided by the same
:meth:`~relayd.config.AccountConfig.sends_as` as MAIL FROM (``allow_subdomains`` included); DKIM ``d=``
is then chosen among the account's own domains only (:func:`relayd.policy.render.signing_domain`).

Replies (the first that applies):

* ``550 5.6.0``: no From field (RFC 5322 §3.6 requires one: without it nothing says whose mail it is,
  DMARC has no domain to judge and receivers refuse it), more than one From or Sender field (RFC 5322
  §3.6 allows one of each), a From or Sender that can't be read as addresses, a Sender of more than one
  address, several From addresses without a Sender (RFC 5322 §3.6.2);
* ``550 5.7.1 From: <ceo@beta.example>: beta.example is not a sending domain of account acme`` (or
  ``Sender:``), for the first address that isn't the account's.

Parsing is :func:`relayd.mail.author.parse_mailboxes`, a linear scanner: a value it can't read one way
only is refused, not guessed (no receiver may read another domain out of the field than we did).
"""

from __future__ import annotations

from relayd.config import Config
from relayd.mail.author import field_values, parse_mailboxes
from relayd.policy.model import Action, ContentRequest, Verdict

__all__ = ["FromHeaderRule"]


def _show(address: str) -> str:
    """An address as it may appear in a reply line: printable, at most 254 characters."""
    return "".join(c if c.isprintable() else "?" for c in address[:254])


def _malformed(text: str) -> Verdict:
    return Verdict(Action.REJECT, FromHeaderRule.name, "from_malformed", f"550 5.6.0 Message refused: {text}")


class FromHeaderRule:
    """Refuse a message whose From or Sender is not the account's (a :class:`ContentRule`)."""

    name = "from_header"

    def __init__(self, cfg: Config) -> None:
        self._cfg = cfg

    def check(self, req: ContentRequest) -> Verdict | None:
        acct = self._cfg.accounts.get(req.account)
        if acct is None:
            return None  # removed by a reload mid-session: the listener answers for that
        froms = field_values(req.headers, "From")
        if not froms:
            return Verdict(
                Action.REJECT,
                self.name,
                "from_missing",
                "550 5.6.0 Message refused: no From header field (RFC 5322 §3.6)",
            )
        if len(froms) > 1:
            return _malformed(f"{len(froms)} From: fields (RFC 5322 §3.6 allows one)")
        authors = parse_mailboxes(froms[0])
        if authors is None:
            return _malformed("From: field can't be read as a list of addresses (RFC 5322 §3.6.2)")
        senders = field_values(req.headers, "Sender")
        if len(senders) > 1:
            return _malformed(f"{len(senders)} Sender: fields (RFC 5322 §3.6 allows one)")
        checked = [("From", a) for a in authors]
        if senders:
            sender = parse_mailboxes(senders[0])
            if sender is None or len(sender) != 1:
                return _malformed("Sender: field must be exactly one address (RFC 5322 §3.6.2)")
            checked.append(("Sender", sender[0]))
        elif len(authors) > 1:
            return _malformed(
                f"From: lists {len(authors)} addresses but there is no Sender: field (RFC 5322 §3.6.2)"
            )
        for field, mailbox in checked:
            if not acct.sends_as(mailbox.domain):
                return Verdict(
                    Action.REJECT,
                    self.name,
                    "from_domain",
                    f"550 5.7.1 {field}: <{_show(mailbox.address)}>: {_show(mailbox.domain)} "
                    f"is not a sending domain of account {req.account}",
                )
        return None
