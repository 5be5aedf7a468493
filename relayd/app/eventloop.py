"""The event loop every long-running relayd process runs on.

Why a module of its own: the command line starts the daemon with it and the supervisor starts each forked
worker with it; both sit above this module, so neither imports the other for it.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # glibc's mallopt(3) parameter
#: allocations from this size up get pages of their own, given back to the system when freed
MMAP_THRESHOLD = 256 * 1024


def fix_mmap_threshold() -> None:
    """Pin glibc's mmap threshold at :data:`MMAP_THRESHOLD` (what ``MALLOC_MMAP_THRESHOLD_`` would do).

    Why: glibc raises the threshold after a big block is freed (up to 32 MiB), so the buffers of the next
    large messages come from the heap, where a freed one stays in the process's RSS until the memory
    above it is freed as well; pinned, a multi-megabyte message's buffers go back to the system as soon
    as its copies are sent (bench/bigmail.py). Small objects are not affected. Elsewhere than glibc this
    does nothing."""
    try:  # the symbols already in the process (libc's among them): no library search, no subprocess
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    except OSError as exc:  # no C library to load: nothing to tune
        log.debug("mallopt not available: %s", exc)
        return
    if mallopt is not None:  # musl has it too, as a no-op
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def run_event_loop(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` on uvloop when it is installed (measurably faster I/O), else asyncio's loop; with
    glibc's mmap threshold pinned first (:func:`fix_mmap_threshold`)."""
    fix_mmap_threshold()
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
