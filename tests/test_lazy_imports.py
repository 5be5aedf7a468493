"""A process loads only the libraries its role uses (each costs memory in every worker process).

A delivery process imports :mod:`relayd.app.daemon` but never serves HTTP or talks to PostgreSQL: aiohttp
(~13 MB per process) and asyncpg (~6 MB) must not come with it. Checked in a fresh interpreter, since this
one has long imported both.
"""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import relayd.app.daemon, relayd.store, relayd.feedback.unsubscribe
loaded = lambda: sorted(m for m in ("aiohttp", "asyncpg") if m in sys.modules)
print(loaded())
from relayd.store import PostgresStore
from relayd.edge.web import create_app
print(PostgresStore.__name__, create_app.__name__, loaded())
"""


def test_daemon_loads_aiohttp_and_asyncpg_only_when_used() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60, check=True
    )
    before, after = out.stdout.splitlines()
    assert before == "[]"
    assert after == "PostgresStore create_app ['aiohttp', 'asyncpg']"
