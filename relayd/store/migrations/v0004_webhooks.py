"""Schema version 4: delivery cursors of the event webhooks.

Why only a cursor table and no outbox: the ``events`` table already is the durable outbox. Every event is
committed there anyway (``record_event`` on the hot path), and its integer ``id`` gives a total order, so a
webhook endpoint needs only "the last event id I delivered" to resume after a crash or an outage. Writing a
second outbox row per event per endpoint would double the writes of every delivery for nothing.

``endpoint`` is the dispatcher's key for one (account, url) pair (see ``relayd.edge.webhooks``); ``event_id``
is
the highest event id of that account that the endpoint has acknowledged with a 2xx, or scanned past without
anything to send. ``updated_at`` (microseconds, like every time in the store) is for operators only.
"""

from __future__ import annotations

from . import Migration

MIGRATION = Migration(
    version=4,
    name="webhooks",
    sqlite=(
        """
        CREATE TABLE webhook_cursor (
            endpoint    TEXT    PRIMARY KEY,
            event_id    INTEGER NOT NULL,
            updated_at  INTEGER NOT NULL
        )
        """,
    ),
    postgresql=(
        """
        CREATE TABLE webhook_cursor (
            endpoint    TEXT    PRIMARY KEY,
            event_id    BIGINT  NOT NULL,
            updated_at  BIGINT  NOT NULL
        )
        """,
    ),
)
