"""What every part of the tenant API shares: its state on the app (config, store, limiters), the
key a request was authenticated with, the error every handler raises and the JSON answers."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Final

from aiohttp import web

from relayd.config import Config
from relayd.edge.ratelimit import RateLimiter, source_key
from relayd.store.models import ApiKey, Event, as_utc
from relayd.store.protocols import Store

PREFIX: Final = "/api/v1"
_BLOCKED_MAX: Final = 100_000

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: (method, path, handler)
Route = tuple[str, str, Handler]


class ApiState:
    """What the API handlers share: config (replaced on reload), store, the limiters."""

    def __init__(self, cfg: Config, store: Store) -> None:
        self.cfg = cfg
        self.store = store
        self.per_key = RateLimiter(cfg.http.api_rate.events, cfg.http.api_rate.per)
        self.per_ip = RateLimiter(cfg.http.rate_per_ip.events, cfg.http.rate_per_ip.per)
        #: client key -> monotonic time until which its failed-key requests get 429 without a lookup
        self.blocked: dict[str, float] = {}

    def is_blocked(self, client: str) -> bool:
        until = self.blocked.get(client)
        if until is None:
            return False
        if until > time.monotonic():
            return True
        del self.blocked[client]
        return False

    def keyless(self, client: str) -> bool:
        """Count one request without a valid key; False (and the client blocked a while) when over."""
        if self.per_ip.allow(client):
            return True
        if len(self.blocked) >= _BLOCKED_MAX:
            self.blocked.clear()
        self.blocked[client] = time.monotonic() + self.per_ip.retry_after()
        return False


API = web.AppKey("relayd_api", ApiState)
KEY = web.RequestKey("relayd_api_key", ApiKey)


class ApiError(Exception):
    """An answer other than 2xx: ``status`` and the ``{"error": message}`` body, plus headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return web.Response(
        text=body, status=status, content_type="application/json", charset="utf-8", headers=headers
    )


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return json_response({"error": message}, status, headers)


def iso_time(value: datetime | None) -> str | None:
    return None if value is None else as_utc(value).isoformat().replace("+00:00", "Z")


def client_key(request: web.Request) -> str:
    """The rate-limit key of the TCP peer (never a header the client writes)."""
    peer = request.transport.get_extra_info("peername") if request.transport is not None else None
    return source_key(str(peer[0])) if isinstance(peer, tuple) and peer else ""


def api_event(key: ApiKey, kind: str, now: datetime, evidence: dict[str, Any], **fields: Any) -> Event:
    text = json.dumps({"who": f"api:{key.key_id}", **evidence}, sort_keys=True, default=str)
    return Event(now, kind, account=key.account, evidence=text, **fields)
