"""PostgreSQL backend of the policy store (asyncpg): several relayd nodes sharing one state.

:class:`PostgresStore` is one class made of one part per concern, each in its own module, all on the
pool of :mod:`.connection` (how the database is used across nodes, and why: its docstring):

* :mod:`.suppression`: who must not be mailed;
* :mod:`.sends`: send counters for the frequency caps (advisory locks across nodes), and the sent ledger;
* :mod:`.accounts`: account suspension;
* :mod:`.events`: the events log (ids in commit order) and the webhook cursors;
* :mod:`.consent`: consent records and the opt-in rate limit;
* :mod:`.transport`: the MTA-STS policy cache and TLS report counts;
* :mod:`.desk`: the postmaster's inbox and DMARC counts;
* :mod:`.apikeys`: the tenants' API keys;
* :mod:`.notify`: ``LISTEN`` for the changes other nodes announce with ``NOTIFY``.

Rows convert to values in :mod:`relayd.store.rows`, as for SQLite.
"""

from __future__ import annotations

from .accounts import AccountTables
from .apikeys import ApiKeyTables
from .connection import CHANNEL_ACCOUNT, CHANNEL_SUPPRESSION, ChangeCallback
from .consent import ConsentTables
from .desk import DeskTables
from .events import EventTables
from .notify import Notifications
from .sends import SendTables
from .suppression import SuppressionTables
from .transport import TransportTables

__all__ = ["CHANNEL_ACCOUNT", "CHANNEL_SUPPRESSION", "ChangeCallback", "PostgresStore"]


class PostgresStore(
    SuppressionTables,
    SendTables,
    AccountTables,
    EventTables,
    ConsentTables,
    TransportTables,
    DeskTables,
    ApiKeyTables,
    Notifications,
):
    """The policy store in a PostgreSQL database; implements :class:`relayd.store.protocols.Store`.

    ``PostgresStore(dsn, schema=None, min_size=1, max_size=10, command_timeout=5.0, connect_timeout=5.0)``:
    see :class:`~relayd.store.postgresql.connection.PostgresConnection`.
    """
