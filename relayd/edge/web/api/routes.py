"""The tenant API in the aiohttp app: its route table (each resource module's share, in the order of the
package docstring), the OpenAPI document, set-up and reload."""

from __future__ import annotations

from typing import Final

from aiohttp import web

from relayd.config import Config
from relayd.edge.ratelimit import RateLimiter
from relayd.edge.web.api import account, consent, events, messages, suppressions, transfer
from relayd.edge.web.api.context import API, PREFIX, ApiState, Route, json_response
from relayd.edge.web.openapi import document
from relayd.store.protocols import Store


async def _openapi(request: web.Request) -> web.Response:
    return json_response(document(request.app[API].cfg.http.public_url))


#: (method, path, handler): every route of the API, in the order of the package docstring.
ROUTES: Final[tuple[Route, ...]] = (
    *suppressions.ROUTES,
    *transfer.ROUTES,
    *events.ROUTES,
    *consent.ROUTES,
    *account.ROUTES,
    *messages.ROUTES,
    ("GET", f"{PREFIX}/openapi.json", _openapi),
)


def setup(app: web.Application, cfg: Config, store: Store) -> None:
    """Add the API to ``app`` when ``[http] api`` is on (a change needs a restart: routes are fixed once
    the app runs). The fixed paths (``import``, ``export``) are added before ``{address}`` so they win."""
    if not cfg.http.api:
        return
    app[API] = ApiState(cfg, store)
    fixed = sorted(ROUTES, key=lambda r: "{" in r[1])
    for method, path, handler in fixed:
        app.router.add_route(method, path, handler)


def update_config(app: web.Application, cfg: Config) -> None:
    """SIGHUP: thresholds, accounts (a removed account's keys stop working), public_url and the limits
    change at once (a changed limit starts with full buckets); turning the API on or off needs a restart."""
    if API not in app:
        return
    api = app[API]
    if cfg.http.api_rate != api.cfg.http.api_rate:
        api.per_key = RateLimiter(cfg.http.api_rate.events, cfg.http.api_rate.per)
    if cfg.http.rate_per_ip != api.cfg.http.rate_per_ip:
        api.per_ip = RateLimiter(cfg.http.rate_per_ip.events, cfg.http.rate_per_ip.per)
    api.cfg = cfg
