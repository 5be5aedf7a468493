"""systemd's notify protocol (``Type=notify``): READY, RELOADING, STOPPING and watchdog pings.

A module of its own so the supervisor can use it without importing the daemon (and everything the daemon
imports) before it forks: each worker would then carry those pages in its own resident set as well.
"""

from __future__ import annotations

import contextlib
import os
import socket


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), addr)
