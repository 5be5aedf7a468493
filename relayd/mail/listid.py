"""Which list a message belongs to, from its ``List-Id`` (RFC 2919), and its campaign.

DESIGN.md: the list name is the first dot-separated label of the List-Id: ``List-Id: News <news.acme.test>``
is list ``news``. A List-Id that names no configured list is still that list (so unsubscribes from it work),
with the account's defaults (no caps, no consent requirement).
"""

from __future__ import annotations

import re

_ANGLE = re.compile(r"<([^<>]*)>")
_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_-]{0,62})$")
_CAMPAIGN = re.compile(r"^[\x21-\x7e]{1,64}$")


def list_name(list_id: str | None) -> str | None:
    """``"News <news.acme.example.test>"`` -> ``"news"``; None when absent or malformed."""
    if not list_id:
        return None
    m = _ANGLE.search(list_id)
    value = (m.group(1) if m else list_id).strip()
    label = value.split(".", 1)[0].lower()
    return label if _LABEL.match(label) else None


def campaign_id(value: str | None) -> str | None:
    """The ``X-Campaign-ID`` as given, if it is printable ASCII without spaces or colons (it goes into
    ``Feedback-ID``, whose fields are colon-separated)."""
    if not value:
        return None
    value = value.strip()
    if not _CAMPAIGN.match(value) or ":" in value:
        return None
    return value
