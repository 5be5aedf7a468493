"""Keys and limits of the tenant API: the middleware authenticates every request under ``/api/v1`` with
its bearer key, applies the per-key and per-client limits and turns every failure into a JSON error."""

from __future__ import annotations

import logging

from aiohttp import web

from relayd.core.errors import StorageError
from relayd.edge import apikeys
from relayd.edge.web.api.context import (
    API,
    KEY,
    PREFIX,
    ApiError,
    ApiState,
    Handler,
    client_key,
    error_response,
)
from relayd.edge.web.pages import mask_address
from relayd.store.models import ApiKey

log = logging.getLogger(__name__)


def _unauthorized(presented: bool) -> ApiError:
    challenge = 'Bearer realm="relayd"' + (', error="invalid_token"' if presented else "")
    message = (
        "invalid or revoked API key" if presented else "an API key is needed: Authorization: Bearer <key>"
    )
    return ApiError(401, message, {"WWW-Authenticate": challenge})


async def _authenticate(request: web.Request, api: ApiState) -> ApiKey:
    client = client_key(request)
    too_many = ApiError(429, "too many requests without a valid key", {"Retry-After": "60"})
    if api.is_blocked(client):
        too_many.headers["Retry-After"] = str(api.per_ip.retry_after())
        raise too_many
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    key = None
    if scheme.lower() == "bearer" and token and len(token) <= apikeys.MAX_KEY_LEN:
        key = await apikeys.authenticate(api.store, token)
        if key is not None and key.account not in api.cfg.accounts:
            key = None  # the account was removed from the config: its keys act for nobody
    if key is None:
        if not api.keyless(client):
            too_many.headers["Retry-After"] = str(api.per_ip.retry_after())
            raise too_many
        raise _unauthorized(bool(header))
    return key


def redact(path: str) -> str:
    """An API path fit for logs: an address in it masked as the unsubscribe pages' logs mask them
    (``/api/v1/suppressions/j***@example.test``)."""
    head, sep, last = path[:400].rpartition("/")
    return f"{head}{sep}{mask_address(last)}" if "@" in last else head + sep + last


def limits_itself(request: web.Request) -> bool:
    """Whether the API serves this request and applies its own limits (the page limit then skips it)."""
    return API in request.app and (request.path == PREFIX or request.path.startswith(PREFIX + "/"))


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authentication, the per-key limit and JSON errors for everything under ``/api/v1``; other paths
    pass through untouched. Placed inside the page error middleware, so nothing here becomes HTML."""
    if not limits_itself(request):
        return await handler(request)
    api = request.app[API]
    try:
        if request.path == f"{PREFIX}/openapi.json":
            if not api.keyless(client_key(request)):  # no key needed: counted as a request without one
                raise ApiError(429, "too many requests", {"Retry-After": str(api.per_ip.retry_after())})
            return await handler(request)
        key = await _authenticate(request, api)
        if not api.per_key.allow(key.key_id):
            log.debug("api: key %s over [http] api_rate", key.key_id)
            raise ApiError(
                429, "rate limit of this key reached", {"Retry-After": str(api.per_key.retry_after())}
            )
        request[KEY] = key
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.message, exc.headers)
    except web.HTTPException as exc:
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        message = {404: "no such resource", 405: "method not allowed"}.get(exc.status, exc.reason)
        return error_response(exc.status, message, headers)
    except StorageError:
        log.error("api: store unavailable for %s %s", request.method, redact(request.path), exc_info=True)
        return error_response(503, "the store is unavailable; nothing was changed", {"Retry-After": "60"})
    except Exception:
        log.exception("api: internal error on %s %s", request.method, redact(request.path))
        return error_response(500, "internal error")
