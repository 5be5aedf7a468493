"""The event loop every long-running relayd process runs on.

Why a module of its own: the command line starts the daemon with it and the supervisor starts each forked
worker with it; both sit above this module, so neither imports the other for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


def run_event_loop(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` on uvloop when it is installed (measurably faster I/O), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
