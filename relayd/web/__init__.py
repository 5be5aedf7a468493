"""HTTP side of relayd: the unsubscribe page and RFC 8058 one-click unsubscribe, /healthz (and /metrics).

``create_app`` and ``start_web`` (:mod:`relayd.web.app`) are what the daemon wires in; ``unsubscribe``
(:mod:`relayd.web.unsubscribe`, no aiohttp inside) is shared with the mailto unsubscribe path of the inbound
listener; the HTML is in :mod:`relayd.web.pages`.
"""

from __future__ import annotations

from relayd.web.app import MAX_BODY, create_app, start_web
from relayd.web.unsubscribe import UnsubscribeResult, UnsubscribeSource, resolve, unsubscribe

__all__ = [
    "MAX_BODY",
    "UnsubscribeResult",
    "UnsubscribeSource",
    "create_app",
    "resolve",
    "start_web",
    "unsubscribe",
]
