"""Schema version 4: ``messages.render``, whether each recipient's copy is made from the message at delivery.

The queue holds a message once; unsubscribe link, trace token and DKIM signature are added per recipient when
it is sent (relayd.policy.render). Mail queued before keeps ``render = 0`` and goes out as stored.
"""

from __future__ import annotations

from . import Migration

MIGRATION = Migration(
    version=4,
    name="render_at_delivery",
    sqlite=(),
    column=("messages", "render", "INTEGER NOT NULL DEFAULT 0"),
)
