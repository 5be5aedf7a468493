"""Schema version 5: ``recipients.held_by``, who held a recipient.

``suspension`` (reinstating the account releases it) or ``operator`` (only ``relayd queue release`` does).
A held row from before has NULL, read as ``suspension``: the only hold there was.
"""

from __future__ import annotations

from . import Migration

MIGRATION = Migration(
    version=5,
    name="held_by",
    sqlite=(),
    column=("recipients", "held_by", "TEXT"),
)
