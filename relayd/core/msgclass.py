"""The class of a message: bulk (the default) or transactional.

A value every layer needs (the queue stores it, policy decides with it, delivery renders by it, events and
metrics carry it), so it lives here, below all of them. What the class means is
:mod:`relayd.policy.rules.messageclass`.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["CLASS_FIELD", "MessageClass"]

#: The header field an app marks a message's class with; relayd removes it before anything is stored.
CLASS_FIELD = "X-Relayd-Class"


class MessageClass(StrEnum):
    """What kind of mail a message is; the value is what the queue, events and metrics record."""

    BULK = "bulk"  # mail of a list (or of the account's unnamed list): every bulk rule applies
    TRANSACTIONAL = "transactional"  # mail a person asked for by doing something: a password reset, a receipt
