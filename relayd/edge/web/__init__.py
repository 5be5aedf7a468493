"""HTTP side of relayd: the unsubscribe page and RFC 8058 one-click unsubscribe, /healthz (and /metrics).

``create_app`` and ``start_web`` (:mod:`relayd.edge.web.app`) are what the daemon wires in; ``unsubscribe``
(:mod:`relayd.feedback.unsubscribe`, no aiohttp inside) is shared with the mailto unsubscribe path of the
inbound
listener; the HTML is in :mod:`relayd.edge.web.pages`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from relayd.feedback.unsubscribe import UnsubscribeResult, UnsubscribeSource, resolve, unsubscribe

if TYPE_CHECKING:
    from relayd.edge.web.app import MAX_BODY, create_app, start_web

#: loaded on first use, so that importing :mod:`relayd.feedback.unsubscribe` (the inbound listener's mailto
#: path,
#: in every process) does not load aiohttp (~13 MB in each process that never serves HTTP)
_FROM_APP = frozenset({"MAX_BODY", "create_app", "start_web"})


def __getattr__(name: str) -> Any:
    if name in _FROM_APP:
        from relayd.edge.web import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "MAX_BODY",
    "UnsubscribeResult",
    "UnsubscribeSource",
    "create_app",
    "resolve",
    "start_web",
    "unsubscribe",
]
