"""SQLite backend of the policy store (aiosqlite, WAL): one node.

:class:`SqliteStore` is one class made of one part per concern, each in its own module, all on the
connections of :mod:`.connection` (how the file is opened, read and written, and why: its docstring):

* :mod:`.suppression`: who must not be mailed;
* :mod:`.sends`: send counters for the frequency caps, and the sent ledger;
* :mod:`.accounts`: account suspension;
* :mod:`.events`: the events log and the webhook cursors;
* :mod:`.consent`: consent records and the opt-in rate limit;
* :mod:`.transport`: the MTA-STS policy cache and TLS report counts;
* :mod:`.desk`: the postmaster's inbox and DMARC counts;
* :mod:`.apikeys`: the tenants' API keys.

Rows convert to values in :mod:`relayd.store.rows`, as for PostgreSQL.
"""

from __future__ import annotations

from .accounts import AccountTables
from .apikeys import ApiKeyTables
from .consent import ConsentTables
from .desk import DeskTables
from .events import EventTables
from .sends import SendTables
from .suppression import SuppressionTables
from .transport import TransportTables

__all__ = ["SqliteStore"]


class SqliteStore(
    SuppressionTables,
    SendTables,
    AccountTables,
    EventTables,
    ConsentTables,
    TransportTables,
    DeskTables,
    ApiKeyTables,
):
    """The policy store in one SQLite file; implements :class:`relayd.store.protocols.Store`.

    ``SqliteStore(path, readers=2, busy_timeout=5.0, cache_kib=8192)``: see
    :class:`~relayd.store.sqlite.connection.SqliteConnection`.
    """
