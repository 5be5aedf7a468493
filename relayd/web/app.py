"""The aiohttp application: ``/u/<token>`` (unsubscribe page and RFC 8058 one-click) and ``/healthz``.

Routes::

    GET  /u/<token>   the confirmation page with one button; reads only (link scanners prefetch)
    POST /u/<token>   unsubscribe at once when the body is ``List-Unsubscribe=One-Click`` (RFC 8058 §3.2)
                      or our button's ``confirm=yes``; 200 with the done page
    GET  /healthz     200 ``ok``: the process serves HTTP (liveness, not a store check)
    (/metrics: Prometheus, see _add_routes)

Status codes: 200 done or page shown; 400 invalid token (malformed, tampered, for another address, not in
the ledger) or a POST that does not ask to unsubscribe, and then nothing changed; 405 any other method
(HEAD too: the unsubscribe URL has no business being probed); 413 a body over 8 KB (the one-click body is
26 bytes); 503 when the store cannot record the unsubscribe (the client retries; nothing changed); 500 on
our bug, logged, never with exception text.

RFC 8058 obligations kept here:

* §3.1: the sender MUST NOT answer the POST with a redirect (redirected POSTs become GETs): we answer 200
  with the page itself, from the same URL. There are no redirects anywhere.
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

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_request import BaseRequest

from relayd import metrics
from relayd.config import Config
from relayd.errors import StorageError
from relayd.queue.store import QueueStore
from relayd.store.base import Store, utcnow
from relayd.web import pages
from relayd.web.unsubscribe import (
    UnsubscribeSource,
    is_unsubscribed,
    resolve,
    unsubscribe,
)

__all__ = ["MAX_BODY", "create_app", "start_web"]

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
    404: ("Not found", "There is nothing at this address."),
    405: ("Method not allowed", "This address only answers GET and POST."),
    413: ("Request too large", "The request body is larger than this page accepts."),
}


@dataclass(frozen=True, slots=True)
class _Deps:
    cfg: Config  # not needed by the unsubscribe pages; here for /metrics and later per-account pages
    store: Store
    secret: bytes
    queue: QueueStore | None


_DEPS = web.AppKey("relayd_web_deps", _Deps)

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _html(status: int, text: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=text, content_type="text/html", charset="utf-8", headers=headers)


def _redact(path: str) -> str:
    """A path fit for logs: an unsubscribe token keeps its queue id and index (to trace it), not its MAC
    (which, with them, is the capability to unsubscribe that recipient)."""
    return re.sub(r"^(/u/[^/-]*-[^/-]*)-.*$", r"\1-…", path)[:200]


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


def _add_routes(app: web.Application) -> None:
    app.router.add_get("/u/{token}", _show, allow_head=False)
    app.router.add_post("/u/{token}", _post)
    app.router.add_get("/healthz", _healthz, allow_head=False)
    app.router.add_get("/metrics", _metrics, allow_head=False)


async def _metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of relayd's own registry (relayd/metrics.py)."""
    body, content_type = metrics.exposition()
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = content_type
    return resp


def create_app(cfg: Config, store: Store, secret: bytes, queue: QueueStore | None) -> web.Application:
    """The HTTP application; the caller owns ``store`` and ``queue`` (opened before, closed after).

    ``queue`` may be None (a process without a queue): unsubscribes then rely on the dequeue check to stop
    mail already queued."""
    app = web.Application(client_max_size=MAX_BODY, middlewares=[_errors])
    app[_DEPS] = _Deps(cfg, store, secret, queue)
    app.on_response_prepare.append(_security_headers)
    _add_routes(app)
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
