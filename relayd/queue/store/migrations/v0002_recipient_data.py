"""Schema version 2: ``recipients.data``, a recipient's own finished copy.

Relayd once rendered each recipient's copy before the ``250`` and stored it here; copies are now made at
delivery (version 4), but a queue holding such copies delivers them as they are (QueueStore.recipient_data).
The first relayd's queue had no such column: its mail is still delivered after an upgrade.
"""

from __future__ import annotations

from . import Migration

MIGRATION = Migration(
    version=2,
    name="recipient_data",
    sqlite=(),
    column=("recipients", "data", "BLOB"),
)
