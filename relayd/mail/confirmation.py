"""The confirmation mail of double opt-in: how an app marks it, where its link goes, and the link itself.

Why here and not beside the consent rule: three places read these -- the rule's pipeline, which renders
each recipient's copy (:mod:`relayd.policy.render`), the check that the link stands where a person clicks
(:mod:`relayd.policy.rules.confirmlink`) and the confirm page that checks the token
(:mod:`relayd.feedback.confirm`) -- and none of it decides who gets mail: that is
:mod:`relayd.policy.rules.consent`.

The app sends the confirmation mail itself, with the header ``X-Relayd-Optin: <list>`` (the list name, or a
List-Id naming it) and ``{{confirm_url}}`` where the link goes. Each recipient's copy gets
``{{confirm_url}}`` replaced by ``{public_url}/c/<token>`` (token purpose ``confirm``, tied to the queue id
and recipient index of the sent ledger and MAC'd over the address, like unsubscribe tokens), and text parts
without the placeholder get the link in their footer instead of the unsubscribe link: the recipient is not
subscribed to anything yet. The imprint is still appended everywhere, and the ``X-Relayd-Optin`` field is
removed (:data:`relayd.mail.rewrite.FORBIDDEN_FIELDS`).
"""

from __future__ import annotations

from email.message import Message

from relayd.core.tokens import make_token
from relayd.mail.headers import MimeError
from relayd.mail.listid import list_name
from relayd.mail.rewrite import FooterSpec, Template, prepare

__all__ = [
    "CONFIRM_PLACEHOLDER",
    "OPTIN_HEADER",
    "PURPOSE",
    "OptinHeaderError",
    "confirm_url",
    "optin_list",
    "prepare_confirmation",
]

#: The token purpose mixed into the MAC: a confirm token can't be replayed as an unsubscribe and vice versa.
PURPOSE = "confirm"
#: The header that marks a submitted message as the confirmation mail of a list.
OPTIN_HEADER = "X-Relayd-Optin"
#: What the app writes in a confirmation mail's body where the confirm link goes.
CONFIRM_PLACEHOLDER = "{{confirm_url}}"

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
