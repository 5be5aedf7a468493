"""The aiohttp application: ``/u/<token>`` (unsubscribe page and RFC 8058 one-click) and ``/healthz``.

Routes::

    GET  /u/<token>   the confirmation page with one button; reads only (link scanners prefetch)
    POST /u/<token>   unsubscribe at once when the body is ``List-Unsubscribe=One-Click`` (RFC 8058 §3.2)
                      or our button's ``confirm=yes``; 200 with the done page
    GET  /c/<token>   double opt-in: the confirm page with one button; reads only (relayd.feedback.confirm)
    POST /c/<token>   record the consent (time, client IP, user agent) when the body is our button's
                      ``confirm=yes``; 200 with the done page, or 303 to the list's ``redirect`` URL
    GET  /healthz     200 ``ok``: the process serves HTTP (liveness, not a store check)
    GET  /metrics     Prometheus; only to peers inside ``[http] metrics_allow`` (default loopback), else 403
    /api/v1/...       the tenant API when ``[http] api = true`` (relayd.edge.web.api: its own keys, limits and
                      JSON errors)

Rate limit: each client address gets ``[http] rate_per_ip`` requests (token bucket, IPv6 by /64)
to the token pages; beyond that ``429`` with ``Retry-After``, before any token is looked at. ``/healthz`` and
``/metrics`` for ``metrics_allow`` peers are not counted (monitoring polls them; they touch no store).
Mailbox providers send one-click POSTs from a few addresses of their own, so the default is generous; behind
a reverse proxy every request comes from the proxy's address, and the limit should be set there instead
(``rate_per_ip = "unlimited"``).

Status codes: 200 done or page shown; 400 invalid token (malformed, tampered, for another address, not in
the ledger) or a POST that does not ask to unsubscribe, and then nothing changed; 405 any other method
(HEAD too: the unsubscribe URL has no business being probed); 413 a body over 8 KB (the one-click body is
26 bytes); 503 when the store cannot record the unsubscribe (the client retries; nothing changed); 500 on
our bug, logged, never with exception text.

RFC 8058 obligations kept here:

* §3.1: the sender MUST NOT answer the POST with a redirect (redirected POSTs become GETs): we answer 200
  with the page itself, from the same URL. The only redirect anywhere is the confirm page's optional 303
  after a double opt-in, which is no unsubscribe.
* §3.2: the POST carries no cookies or other context, so we set none and need none; its body SHOULD be
  ``multipart/form-data`` and MAY be ``application/x-www-form-urlencoded``: both are parsed. A bare body
  ``List-Unsubscribe=One-Click`` with another (or no) content type is accepted too: only something acting
  on our ``List-Unsubscribe-Post`` header sends it, and a receiver's sloppy content type should not keep a
  recipient subscribed.
* §4: the URL's token is opaque and MAC'd; it is verified against the sent ledger before anything changes.

Every response carries a script-forbidding ``Content-Security-Policy``, ``Cache-Control: no-store`` (a
shared cache must not keep a page showing someone's address), ``X-Robots-Tag: noindex`` and
``Referrer-Policy: no-referrer`` (the token must not leak to anyone in a Referer).
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_request import BaseRequest

from relayd.config import Config
from relayd.core import metrics
from relayd.core.errors import StorageError
from relayd.edge.ratelimit import RateLimiter, source_key
from relayd.edge.web import api as tenant_api
from relayd.edge.web import pages
from relayd.feedback import confirm as optin
from relayd.feedback.unsubscribe import (
    UnsubscribeSource,
    is_unsubscribed,
    resolve,
    unsubscribe,
)
from relayd.policy.reloaded import Reloaded
from relayd.queue.store import QueueStore
from relayd.store.models import utcnow
from relayd.store.protocols import Store

__all__ = ["MAX_BODY", "LiveConfig", "create_app", "start_web"]

log = logging.getLogger(__name__)
access_log = logging.getLogger("relayd.web.access")

#: Largest request body accepted (bytes). RFC 8058's body is 26 bytes; a multipart one a few hundred.
MAX_BODY = 8192

_ONE_CLICK = b"List-Unsubscribe=One-Click"
_UA_MAX = 256

_SECURITY_HEADERS = {
    "Content-Security-Policy": pages.CONTENT_SECURITY_POLICY,
    "Cache-Control": "no-store",
    "X-Robots-Tag": "noindex, nofollow",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}

_REASONS = {
    403: ("Forbidden", "This address is not for you."),
    404: ("Not found", "There is nothing at this address."),
    405: ("Method not allowed", "This address only answers GET and POST."),
    413: ("Request too large", "The request body is larger than this page accepts."),
    429: ("Too many requests", "Please wait a minute and try again."),
}
_UNLIMITED_PATHS = frozenset({"/healthz"})


@dataclass(slots=True)
class _Deps:
    cfg: Config  # the confirm pages read lists' ``redirect``; replaced by LiveConfig.reload()
    store: Store
    secret: bytes
    queue: QueueStore | None


_DEPS = web.AppKey("relayd_web_deps", _Deps)
_LIMITER = web.AppKey("relayd_web_limiter", RateLimiter)

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _html(status: int, text: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=text, content_type="text/html", charset="utf-8", headers=headers)


def _redact(path: str) -> str:
    """A path fit for logs: an unsubscribe token keeps its queue id and index (to trace it), not its MAC
    (which, with them, is the capability to unsubscribe that recipient). An address in an API path is
    masked (relayd.edge.web.api.redact)."""
    if path.startswith(tenant_api.PREFIX + "/"):
        return tenant_api.redact(path)[:200]
    return re.sub(r"^(/[uc]/[^/-]*-[^/-]*)-.*$", r"\1-…", path)[:200]


class _AccessLogger(AbstractAccessLogger):
    """One DEBUG line per request, tokens redacted (aiohttp's default logs the full path at INFO)."""

    def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.debug(
            '%s "%s %s" %d %.1fms',
            request.remote,
            request.method,
            _redact(request.path),
            response.status,
            time * 1000,
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.DEBUG)


@web.middleware
async def _errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Every error becomes a small HTML page with our headers; no exception text ever reaches a client."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        heading, text = _REASONS.get(exc.status, (exc.reason, "The request could not be served."))
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return _html(exc.status, pages.error_page(exc.status, heading, text), headers)
    except StorageError:
        log.error("web: store unavailable for %s %s", request.method, _redact(request.path), exc_info=True)
        body = pages.error_page(
            503, "Please try again", "Your request could not be recorded just now. Nothing was changed."
        )
        return _html(503, body, {"Retry-After": "60"})
    except Exception:
        log.exception("web: internal error on %s %s", request.method, _redact(request.path))
        return _html(500, pages.error_page(500, "Something went wrong", "Please try again later."))


@web.middleware
async def _rate_limit(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """429 for a client over ``[http] rate_per_ip`` (the outermost middleware: it costs one dict lookup)."""
    limiter = request.app[_LIMITER]
    if (
        request.path in _UNLIMITED_PATHS
        or (request.path == "/metrics" and _metrics_allowed(request))
        or tenant_api.limits_itself(request)  # per key, and per client only without a valid key
        or limiter.allow(source_key(request.remote or ""))
    ):
        return await handler(request)
    log.debug("web: %s over [http] rate_per_ip", request.remote)
    heading, text = _REASONS[429]
    return _html(429, pages.error_page(429, heading, text), {"Retry-After": str(limiter.retry_after())})


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in _SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


async def _show(request: web.Request) -> web.Response:
    """GET /u/<token>: read-only. A valid token gets the confirmation page (or 'already unsubscribed')."""
    deps = request.app[_DEPS]
    record = await resolve(deps.store, deps.secret, request.match_info["token"])
    if record is None:
        return _html(400, pages.invalid_page())
    if await is_unsubscribed(deps.store, record, utcnow()):
        return _html(200, pages.already_page(record))
    return _html(200, pages.confirm_page(record))


async def _requested(request: web.Request) -> UnsubscribeSource | None:
    """Which unsubscribe the POST body asks for, if any. Raises HTTPRequestEntityTooLarge over MAX_BODY.

    The body is read before the token is checked so the size limit holds for every POST. A body we cannot
    parse (broken multipart, odd charset) is not a request to unsubscribe: None, never an exception."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=request.content_length)
    fields: dict[str, str] = {}
    if request.content_type == "multipart/form-data":
        try:
            form = await request.post()  # enforces client_max_size on the parts
        except (ValueError, LookupError, HttpProcessingError):
            return None
        for name, value in form.items():
            if isinstance(value, str):  # file parts are not ours
                fields.setdefault(name, value)
    else:
        body = await request.read()  # enforces client_max_size
        if request.content_type != "application/x-www-form-urlencoded":
            return UnsubscribeSource.ONE_CLICK if body.strip() == _ONE_CLICK else None
        # the names and values we look for are ASCII: any charset parameter is moot
        for name, value in parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True):
            fields.setdefault(name, value)
    if fields.get("List-Unsubscribe", "").strip().lower() == "one-click":
        return UnsubscribeSource.ONE_CLICK
    if fields.get("confirm", "").strip().lower() == "yes":
        return UnsubscribeSource.WEB
    return None


async def _post(request: web.Request) -> web.Response:
    """POST /u/<token>: unsubscribe now (RFC 8058 §3.2), answer the done page (200, no redirect)."""
    deps = request.app[_DEPS]
    source = await _requested(request)
    token = request.match_info["token"]
    if source is None:
        # a bad token is reported as a bad link whatever the body asked
        if await resolve(deps.store, deps.secret, token) is None:
            return _html(400, pages.invalid_page())
        return _html(400, pages.not_asked_page())
    evidence = {
        "ip": request.remote or "",
        "user_agent": request.headers.get("User-Agent", "")[:_UA_MAX],
    }
    result = await unsubscribe(
        deps.store, deps.queue, deps.secret, token, source=source, now=utcnow(), evidence=evidence
    )
    if result is None:
        return _html(400, pages.invalid_page())
    return _html(200, pages.done_page(result))


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok", content_type="text/plain")


# --- consent: double opt-in confirm pages ----------------------------------------------------


def _redirect_of(cfg: Config, account: str, list_name: str) -> str | None:
    """The list's ``redirect`` URL, if the account and list are (still) configured with one."""
    acct = cfg.accounts.get(account)
    list_cfg = acct.lists.get(list_name) if acct is not None else None
    return list_cfg.redirect if list_cfg is not None else None


async def _confirm_show(request: web.Request) -> web.Response:
    """GET /c/<token>: read-only. The confirm page, or 'already confirmed'; 400 for an invalid token.

    When the list redirects after confirming, this page's CSP names that origin in ``form-action``:
    browsers check the redirect after a form POST against the page's ``form-action``."""
    deps = request.app[_DEPS]
    record = await optin.resolve(deps.store, deps.secret, request.match_info["token"])
    if record is None or record.list is None:
        return _html(400, pages.optin_invalid_page())
    if await deps.store.get_consent(record.account, record.list, record.address) is not None:
        return _html(200, pages.optin_already_page(record))
    headers = None
    target = _redirect_of(deps.cfg, record.account, record.list)
    if target is not None:
        parts = urlsplit(target)
        headers = {
            "Content-Security-Policy": pages.csp_allowing_form_target(f"{parts.scheme}://{parts.netloc}")
        }
    return _html(200, pages.optin_confirm_page(record), headers)


async def _confirm_requested(request: web.Request) -> bool:
    """Whether the POST body is our button's ``confirm=yes`` (urlencoded or multipart). Raises
    HTTPRequestEntityTooLarge over MAX_BODY; a body we cannot parse asks for nothing."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=request.content_length)
    if request.content_type == "multipart/form-data":
        try:
            form = await request.post()
        except (ValueError, LookupError, HttpProcessingError):
            return False
        value = form.get("confirm")
        return isinstance(value, str) and value.strip().lower() == "yes"
    body = await request.read()  # enforces client_max_size
    if request.content_type != "application/x-www-form-urlencoded":
        return False
    fields = dict(reversed(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)))
    return fields.get("confirm", "").strip().lower() == "yes"


async def _confirm_post(request: web.Request) -> web.StreamResponse:
    """POST /c/<token>: record the consent with time, client IP and user agent; the done page, or 303 to the
    list's ``redirect``. 400 (nothing recorded) for an invalid token or a body that does not ask."""
    deps = request.app[_DEPS]
    asked = await _confirm_requested(request)
    token = request.match_info["token"]
    if not asked:
        if await optin.resolve(deps.store, deps.secret, token) is None:
            return _html(400, pages.optin_invalid_page())
        return _html(400, pages.optin_not_asked_page())
    user_agent = request.headers.get("User-Agent")
    result = await optin.confirm(
        deps.store,
        deps.secret,
        token,
        now=utcnow(),
        ip=request.remote or "",
        user_agent=user_agent[:_UA_MAX] if user_agent is not None else None,
    )
    if result is None:
        return _html(400, pages.optin_invalid_page())
    target = _redirect_of(deps.cfg, result.account, result.list)
    if target is not None:
        # 303: the browser GETs the sender's page (a Response, not a raised HTTPSeeOther: the error
        # middleware turns raised HTTP exceptions into error pages)
        return web.Response(status=303, headers={"Location": target})
    return _html(200, pages.optin_done_page(result))


# --- end consent ---


def _add_routes(app: web.Application) -> None:
    app.router.add_get("/u/{token}", _show, allow_head=False)
    app.router.add_post("/u/{token}", _post)
    app.router.add_get("/c/{token}", _confirm_show, allow_head=False)  # double opt-in confirm page
    app.router.add_post("/c/{token}", _confirm_post)  # the button on it confirms
    app.router.add_get("/healthz", _healthz, allow_head=False)
    app.router.add_get("/metrics", _metrics, allow_head=False)


async def _metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of relayd's own registry (relayd/core/metrics.py), for clients inside
    ``[http] metrics_allow`` only: it names accounts and their volumes and complaints, and this listener
    also serves the public unsubscribe pages. 403 for everyone else."""
    if not _metrics_allowed(request):
        log.debug("web: /metrics refused to %s (not in [http] metrics_allow)", _peer_ip(request))
        raise web.HTTPForbidden()
    body, content_type = metrics.exposition()
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = content_type
    return resp


def _peer_ip(request: web.Request) -> str:
    """The address of the TCP peer itself: never ``X-Forwarded-For`` or ``Forwarded``, which the
    client writes."""
    peer = request.transport.get_extra_info("peername") if request.transport is not None else None
    return str(peer[0]) if isinstance(peer, tuple) and peer else ""


def _metrics_allowed(request: web.Request) -> bool:
    try:
        ip = ipaddress.ip_address(_peer_ip(request).partition("%")[0])  # drop an IPv6 zone ("fe80::1%eth0")
    except ValueError:
        return False  # a Unix socket or no peer at all: nobody we can check
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d
    return any(ip in net for net in request.app[_DEPS].cfg.http.metrics_allow)


class LiveConfig:
    """The web app's part in a config reload: what ``app`` serves from its next request on."""

    __slots__ = ("_app",)

    def __init__(self, app: web.Application) -> None:
        self._app = app

    def reload(self, new: Reloaded) -> None:
        """Serve ``new``'s config from now on (SIGHUP): a list's ``redirect`` changes without a restart."""
        self._app[_DEPS].cfg = new.cfg
        tenant_api.update_config(self._app, new.cfg)


def create_app(cfg: Config, store: Store, secret: bytes, queue: QueueStore | None) -> web.Application:
    """The HTTP application; the caller owns ``store`` and ``queue`` (opened before, closed after).

    ``queue`` may be None (a process without a queue): unsubscribes then rely on the dequeue check to stop
    mail already queued."""
    # the API's middleware innermost: its JSON errors are answers, never turned into HTML pages
    app = web.Application(client_max_size=MAX_BODY, middlewares=[_rate_limit, _errors, tenant_api.middleware])
    app[_DEPS] = _Deps(cfg, store, secret, queue)
    app[_LIMITER] = RateLimiter(cfg.http.rate_per_ip.events, cfg.http.rate_per_ip.per)
    app.on_response_prepare.append(_security_headers)
    _add_routes(app)
    tenant_api.setup(app, cfg, store)
    return app


async def start_web(app: web.Application, host: str, port: int, *, reuse_port: bool = False) -> web.AppRunner:
    """Bind ``host:port`` and serve ``app``; ``await runner.cleanup()`` stops it.

    The bound address (useful with port 0) is ``runner.addresses[0]``. Raises OSError when the address
    cannot be bound (in use, not ours); the runner is cleaned up first."""
    runner = web.AppRunner(
        app,
        access_log=access_log,
        access_log_class=_AccessLogger,
        handle_signals=False,
        shutdown_timeout=5.0,  # open keep-alive connections get this long to finish at cleanup()
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_port=reuse_port or None).start()
    except OSError:
        await runner.cleanup()
        raise
    log.info("http listening on %s", runner.addresses[0][:2])
    return runner
