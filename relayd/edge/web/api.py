"""The tenant API under ``/api/v1/``: an account's applications manage what relayd keeps about their mail.

Routes (the paths are a contract, DESIGN.md; the OpenAPI 3.1 document at ``/api/v1/openapi.json`` describes
each, :mod:`relayd.edge.web.openapi`)::

    GET|PUT|DELETE /api/v1/suppressions/{address}   check one address, add (account or list scope), remove
    GET            /api/v1/suppressions             the account's entries: filters, pages (cursor + limit)
    POST           /api/v1/suppressions/import      CSV (the format of relayd suppress import)
    GET            /api/v1/suppressions/export      CSV of the account's entries
    GET            /api/v1/events?after=CURSOR      the account's events, the objects webhooks POST
    GET|PUT        /api/v1/consent/{address}        consent records: show, add one with its evidence
    GET            /api/v1/stats                    sent, complaint and bounce rates, suspension
    GET            /api/v1/messages/{queue_id}      a queued message's recipients and their states
    GET            /api/v1/openapi.json             the OpenAPI document (no key needed)

Off unless ``[http] api = true``: the listener also serves the public unsubscribe pages, and an
authenticated surface nobody uses is only risk. Keys: ``relayd account api-key create ACCOUNT``
(:mod:`relayd.edge.apikeys`), sent as ``Authorization: Bearer <key>``.

Rules every handler keeps:

* **A key sees its own account only.** Another account's entry, consent or message is answered exactly as
  one that does not exist (404, same text), never 403: ids and addresses can't be probed.
* **Global entries are the operator's.** A hard bounce or spam trap suppresses an address for everyone;
  a tenant sees it as ``"suppressed (global)"`` with no reason, source, date or account (it may have been
  caused by another tenant's mail), never in listings or exports, and cannot remove it (409).
* **Every change is an event** (``api_suppress``, ``api_unsuppress``, ``api_import``, ``api_consent``; the
  evidence names the key as ``who: "api:<key id>"``), and so a webhook (``relayd.edge.webhooks.EVENT_NAMES``).
* **Errors are JSON** ``{"error": "..."}``, never exception text: 400 bad input, 401 no valid key (with
  ``WWW-Authenticate: Bearer``, RFC 6750 §3; unknown, revoked and wrong keys look the same), 404, 405,
  409 global entry, 413 body too large, 429 with ``Retry-After``, 503 store unavailable (``Retry-After``).
* **Limits.** Each key gets ``[http] api_rate`` requests (token bucket, relayd.edge.ratelimit); requests
  without a valid key count against ``[http] rate_per_ip`` per client address, and a client over that gets
  429 before its key is looked up. JSON bodies are capped at 64 KiB, CSV imports at 10 MiB; pages at 1000
  entries and 500 events.

Listing pages are offsets in key order behind an opaque ``cursor``: an entry added or removed between two
pages may shift the rest by one (the same entry seen twice or not at all); exports read everything.
Message status reads the queue shards of this node read-only, as ``relayd queue`` does: a message queued
by another node is not found there (404).
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import io
import ipaddress
import json
import logging
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from relayd.config import Config, parse_duration
from relayd.core.address import AddressError, normalize
from relayd.core.errors import StorageError
from relayd.edge import apikeys
from relayd.edge.ratelimit import RateLimiter, source_key
from relayd.edge.web.openapi import document
from relayd.edge.web.pages import mask_address
from relayd.edge.webhooks import EVENT_NAMES, render
from relayd.feedback import reputation
from relayd.mail.listid import list_name as list_label
from relayd.store import csvio
from relayd.store.base import (
    ApiKey,
    ConsentRecord,
    Event,
    Reason,
    Scope,
    Store,
    SuppressionEntry,
    as_utc,
    utcnow,
)

__all__ = ["PREFIX", "ROUTES", "limits_itself", "middleware", "redact", "setup", "update_config"]

log = logging.getLogger(__name__)

PREFIX: Final = "/api/v1"
JSON_MAX_BODY: Final = 64 * 1024
IMPORT_MAX_BODY: Final = 10 * 1024 * 1024
PAGE_MAX: Final = 1000
EVENTS_MAX: Final = 500
_IMPORT_BATCH: Final = 10_000
_ERRORS_SHOWN: Final = 100  # rejected import rows listed in the answer (all are counted)
_ADDRESS_MAX: Final = 320  # RFC 5321 path limits: 64 + 1 + 255, with room
_QUEUE_ID: Final = re.compile(r"[A-Za-z0-9]{1,64}")
_UA_MAX: Final = 256
_GLOBAL: Final = "suppressed (global)"
_BLOCKED_MAX: Final = 100_000

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Api:
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


_API = web.AppKey("relayd_api", _Api)
_KEY = web.RequestKey("relayd_api_key", ApiKey)


class ApiError(Exception):
    """An answer other than 2xx: ``status`` and the ``{"error": message}`` body, plus headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return web.Response(
        text=body, status=status, content_type="application/json", charset="utf-8", headers=headers
    )


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return _json({"error": message}, status, headers)


def _time(value: datetime | None) -> str | None:
    return None if value is None else as_utc(value).isoformat().replace("+00:00", "Z")


def _client(request: web.Request) -> str:
    """The rate-limit key of the TCP peer (never a header the client writes)."""
    peer = request.transport.get_extra_info("peername") if request.transport is not None else None
    return source_key(str(peer[0])) if isinstance(peer, tuple) and peer else ""


# --- authentication and the middleware ------------------------------------------------------------------


def _unauthorized(presented: bool) -> ApiError:
    challenge = 'Bearer realm="relayd"' + (', error="invalid_token"' if presented else "")
    message = (
        "invalid or revoked API key" if presented else "an API key is needed: Authorization: Bearer <key>"
    )
    return ApiError(401, message, {"WWW-Authenticate": challenge})


async def _authenticate(request: web.Request, api: _Api) -> ApiKey:
    client = _client(request)
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
    return _API in request.app and (request.path == PREFIX or request.path.startswith(PREFIX + "/"))


@web.middleware
async def middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Authentication, the per-key limit and JSON errors for everything under ``/api/v1``; other paths
    pass through untouched. Placed inside the page error middleware, so nothing here becomes HTML."""
    if not limits_itself(request):
        return await handler(request)
    api = request.app[_API]
    try:
        if request.path == f"{PREFIX}/openapi.json":
            if not api.keyless(_client(request)):  # no key needed: counted as a request without one
                raise ApiError(429, "too many requests", {"Retry-After": str(api.per_ip.retry_after())})
            return await handler(request)
        key = await _authenticate(request, api)
        if not api.per_key.allow(key.key_id):
            log.debug("api: key %s over [http] api_rate", key.key_id)
            raise ApiError(
                429, "rate limit of this key reached", {"Retry-After": str(api.per_key.retry_after())}
            )
        request[_KEY] = key
        return await handler(request)
    except ApiError as exc:
        return _error(exc.status, exc.message, exc.headers)
    except web.HTTPException as exc:
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        message = {404: "no such resource", 405: "method not allowed"}.get(exc.status, exc.reason)
        return _error(exc.status, message, headers)
    except StorageError:
        log.error("api: store unavailable for %s %s", request.method, redact(request.path), exc_info=True)
        return _error(503, "the store is unavailable; nothing was changed", {"Retry-After": "60"})
    except Exception:
        log.exception("api: internal error on %s %s", request.method, redact(request.path))
        return _error(500, "internal error")


# --- input --------------------------------------------------------------------------------------------


async def _body(request: web.Request, cap: int) -> bytes:
    """The request body, refused with 413 past ``cap`` bytes (read in chunks: a client that lies about its
    Content-Length, or sends chunked, is cut off at the cap as well)."""
    if request.content_length is not None and request.content_length > cap:
        raise ApiError(413, f"request body larger than {cap} bytes")
    data = bytearray()
    async for chunk in request.content.iter_chunked(65536):
        data += chunk
        if len(data) > cap:
            raise ApiError(413, f"request body larger than {cap} bytes")
    return bytes(data)


async def _json_body(request: web.Request, allowed: frozenset[str]) -> dict[str, Any]:
    raw = await _body(request, JSON_MAX_BODY)
    try:
        doc = json.loads(raw) if raw.strip() else {}
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the decoder's stack
        raise ApiError(400, "the body is not JSON") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "the body must be a JSON object")
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise ApiError(400, f"unknown field(s): {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")
    return doc


def _address(request: web.Request) -> str:
    text = request.match_info["address"]
    if len(text) > _ADDRESS_MAX:
        raise ApiError(400, "address too long")
    try:
        return normalize(text)
    except AddressError as exc:
        raise ApiError(400, f"not an address: {exc}") from None


def _list_name(value: object, field: str = "list") -> str:
    if not isinstance(value, str) or list_label(value) != value.lower() or "." in value:
        raise ApiError(400, f"{field}: not a list name (letters, digits, '_', '-'; at most 63)")
    return value.lower()


#: The reasons a tenant may give. The others record what relayd saw (a complaint, a spam trap, a bounce,
#: a discard pattern): an entry of theirs is the operator's to lift or change, never the tenant's, or an
#: account could mail again a person who reported it, or turn the complaint into an unsubscribe, which
#: transactional mail passes.
TENANT_REASONS: Final = frozenset({Reason.MANUAL, Reason.UNSUBSCRIBE})
PROTECTED: Final = frozenset(Reason) - TENANT_REASONS


def _reason(value: object) -> Reason:
    try:
        reason = Reason(str(value)) if isinstance(value, str) else Reason("")
    except ValueError:
        reason = None
    if reason not in TENANT_REASONS:
        raise ApiError(400, f"reason: one of {', '.join(sorted(r.value for r in TENANT_REASONS))}")
    return reason


def _instant(value: object, field: str) -> datetime:
    if not isinstance(value, str):
        raise ApiError(400, f"{field}: an ISO 8601 time")
    try:
        return as_utc(datetime.fromisoformat(value.replace("Z", "+00:00")))
    except ValueError:
        raise ApiError(400, f"{field}: not an ISO 8601 time: {value[:40]!r}") from None


def _expiry(value: object, now: datetime) -> datetime | None:
    """``null``, a lifetime (``"30d"``) or an ISO 8601 time in the future."""
    if value is None:
        return None
    if isinstance(value, str) and value[-1:] in ("s", "m", "h", "d"):
        try:
            return now + timedelta(seconds=parse_duration(value))
        except ValueError:
            pass
    at = _instant(value, "expires")
    if at <= now:
        raise ApiError(400, "expires: in the past")
    return at


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
        raise ApiError(400, f"{name}: an integer from {low} to {high}")
    return int(text)


def _event(key: ApiKey, kind: str, now: datetime, evidence: dict[str, Any], **fields: Any) -> Event:
    text = json.dumps({"who": f"api:{key.key_id}", **evidence}, sort_keys=True, default=str)
    return Event(now, kind, account=key.account, evidence=text, **fields)


# --- suppressions -------------------------------------------------------------------------------------


def _entry_json(e: SuppressionEntry) -> dict[str, Any]:
    """One entry as a tenant sees it: everything of its own entries, nothing but the fact of a global one."""
    if e.scope is Scope.GLOBAL:
        return {"scope": "global", "status": _GLOBAL}
    return {
        "scope": e.scope.value,
        "list": e.list,
        "reason": e.reason.value,
        "source": e.source,
        "created_at": _time(e.created_at),
        "expires_at": _time(e.expires_at),
        "status": f"suppressed ({e.reason.value})",
    }


async def _visible(store: Store, account: str, address: str) -> tuple[list[SuppressionEntry], bool]:
    """The account's own active entries of ``address``, and whether a global one is active."""
    own = await store.list(address=address, account=account, limit=PAGE_MAX)
    glob = await store.list(address=address, scope=Scope.GLOBAL, limit=1)
    return own, bool(glob)


async def _suppression_get(request: web.Request) -> web.Response:
    key, store = request[_KEY], request.app[_API].store
    address = _address(request)
    own, glob = await _visible(store, key.account, address)
    if not own and not glob:
        raise ApiError(404, "not suppressed")
    entries = ([{"scope": "global", "status": _GLOBAL}] if glob else []) + [_entry_json(e) for e in own]
    return _json({"address": address, "suppressed": True, "entries": entries})


_PUT_FIELDS = frozenset({"reason", "list", "expires"})


async def _suppression_put(request: web.Request) -> web.Response:
    key, store = request[_KEY], request.app[_API].store
    address = _address(request)
    doc = await _json_body(request, _PUT_FIELDS)
    now = utcnow()
    reason = _reason(doc.get("reason", Reason.MANUAL.value))
    lname = None if doc.get("list") is None else _list_name(doc["list"])
    entry = SuppressionEntry(
        address=address,
        scope=Scope.LIST if lname else Scope.ACCOUNT,
        account=key.account,
        list=lname,
        reason=reason,
        source=f"api:{key.key_id}",
        created_at=now,
        expires_at=_expiry(doc.get("expires"), now),
    )
    own, _glob = await _visible(store, key.account, address)
    held = [e for e in own if e.scope is entry.scope and e.list == entry.list and e.reason in PROTECTED]
    if held:
        raise ApiError(409, f"suppressed ({held[0].reason.value}): only the operator can change this entry")
    await store.add([entry], keep=PROTECTED)  # keep=: a complaint recorded meanwhile still wins
    evidence = {"scope": entry.scope.value, "expires_at": _time(entry.expires_at)}
    await store.record_event(
        _event(key, "api_suppress", now, evidence, list=lname, address=address, reason=reason.value)
    )
    log.info(
        "api: key %s suppressed %s for %s (%s, %s)",
        key.key_id,
        mask_address(address),
        key.account,
        entry.scope.value,
        reason.value,
    )
    return _json({"address": address, **_entry_json(entry)})


async def _suppression_delete(request: web.Request) -> web.Response:
    key, store = request[_KEY], request.app[_API].store
    address = _address(request)
    only_list = None if "list" not in request.query else _list_name(request.query["list"])
    own, glob = await _visible(store, key.account, address)
    matching = [e for e in own if only_list is None or (e.scope is Scope.LIST and e.list == only_list)]
    targets = [e for e in matching if e.reason not in PROTECTED]
    if not targets:
        if matching:
            reason = matching[0].reason.value
            raise ApiError(409, f"suppressed ({reason}): only the operator can remove this entry")
        if glob:
            raise ApiError(409, f"{_GLOBAL}: only the operator can remove a global suppression")
        raise ApiError(404, "not suppressed")
    removed = 0
    for e in targets:
        removed += await store.remove(address, e.scope, key.account, e.list)
    now = utcnow()
    evidence = {
        "removed": [{"scope": e.scope.value, "list": e.list, "reason": e.reason.value} for e in targets]
    }
    await store.record_event(_event(key, "api_unsuppress", now, evidence, list=only_list, address=address))
    log.info(
        "api: key %s removed %d suppression(s) of %s for %s",
        key.key_id,
        removed,
        mask_address(address),
        key.account,
    )
    return _json({"address": address, "removed": removed, "still_suppressed": _GLOBAL if glob else None})


_SCOPES: Final = {"account": Scope.ACCOUNT, "list": Scope.LIST}


async def _suppressions_list(request: web.Request) -> web.Response:
    """Filters ``scope`` (account, list), ``list``, ``reason``, ``since`` (entries created since: an ISO time
    or a lifetime like ``7d``); ``limit`` (1..1000) and ``cursor`` (from ``next_cursor``)."""
    key, store = request[_KEY], request.app[_API].store
    q = request.query
    scope = None
    if "scope" in q:
        if q["scope"] not in _SCOPES:
            raise ApiError(400, "scope: account or list (global entries are the operator's and not listed)")
        scope = _SCOPES[q["scope"]]
    lname = _list_name(q["list"]) if "list" in q else None
    reason = _reason(q["reason"]) if "reason" in q else None
    since = None
    if "since" in q:
        try:
            since = utcnow() - timedelta(seconds=parse_duration(q["since"]))
        except ValueError:
            since = _instant(q["since"], "since")
    limit = _int_param(request, "limit", 100, 1, PAGE_MAX)
    offset = 0
    if "cursor" in q:
        text = q["cursor"]
        if not (text.isascii() and text.isdigit() and len(text) < 12):
            raise ApiError(400, "cursor: use the next_cursor of the previous page")
        offset = int(text)
    out: list[SuppressionEntry] = []
    scanned, end = 0, False
    while len(out) < limit and scanned < 10 * PAGE_MAX:  # a narrow `since` pages on instead of scanning all
        want = limit if since is not None else limit - len(out)
        batch = await store.list(
            account=key.account, scope=scope, list_name=lname, reason=reason, limit=want, offset=offset
        )
        for e in batch:
            offset += 1
            scanned += 1
            if since is None or e.created_at >= since:
                out.append(e)
                if len(out) == limit:
                    break
        if len(batch) < want and len(out) < limit:
            end = True
            break
    items = [{"address": e.address, **_entry_json(e)} for e in out]
    return _json({"suppressions": items, "next_cursor": None if end else str(offset)})


def _csv_time(value: datetime | None) -> str:
    return "" if value is None else as_utc(value).isoformat().replace("+00:00", "Z")


async def _export(request: web.Request) -> web.StreamResponse:
    """The account's entries (expired ones too: an export is a backup) in the import format, streamed,
    every cell through the formula neutralising of relayd.store.csvio."""
    key, store = request[_KEY], request.app[_API].store
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/csv; charset=utf-8",
            "Content-Disposition": f'attachment; filename="suppressions-{key.account}.csv"',
        }
    )
    await resp.prepare(request)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(csvio.HEADER)
    offset = 0
    while True:
        batch = await store.list(account=key.account, include_expired=True, limit=5000, offset=offset)
        rows = [
            [
                e.address,
                e.scope.value,
                e.account or "",
                e.list or "",
                e.reason.value,
                _csv_time(e.created_at),
                _csv_time(e.expires_at),
            ]
            for e in batch
        ]
        writer.writerows(csvio.safe_rows(rows))
        await resp.write(buf.getvalue().encode())
        buf.seek(0)
        buf.truncate()
        if len(batch) < 5000:
            break
        offset += len(batch)
    await resp.write_eof()
    return resp


def _parse_import(
    text: str, account: str, source: str, now: datetime
) -> tuple[list[SuppressionEntry], list[tuple[int, str]]]:
    """Rows of a tenant's CSV as entries of its account (run in a thread). The account column may be
    empty (the key's account) or name the key's account; global rows and other accounts are rejected."""
    reader = csv.reader(io.StringIO(text, newline=""))
    errors: list[tuple[int, str]] = []
    try:
        header = next(reader)
    except StopIteration:
        raise ApiError(400, "empty file: expected the header " + ",".join(csvio.HEADER)) from None
    except csv.Error as exc:
        raise ApiError(400, f"header: {exc}") from None
    names = tuple(h.strip().lower() for h in header)
    if names not in (csvio.HEADER, (*csvio.HEADER, "source")):
        raise ApiError(400, "header must be " + ",".join(csvio.HEADER))
    has_source = len(names) > len(csvio.HEADER)

    def parse(row: list[str]) -> SuppressionEntry:
        if len(row) > 2:
            if row[1].strip().lower() == Scope.GLOBAL.value:
                raise csvio.RowError("scope: global entries are the operator's (use account or list)")
            if row[2].strip() not in ("", account):
                raise csvio.RowError("account: must be empty or this key's account")
            row = [row[0], row[1], account, *row[3:]]
        entry = csvio.parse_row(row, has_source=has_source, default_source=source, now=now)
        if entry.reason not in TENANT_REASONS:
            allowed = ", ".join(sorted(r.value for r in TENANT_REASONS))
            raise csvio.RowError(f"reason: one of {allowed} (the others are recorded by relayd)")
        return dataclasses.replace(entry, source=source)

    entries: list[SuppressionEntry] = []
    while batch := csvio.read_batch(reader, errors, _IMPORT_BATCH, parse):
        entries.extend(batch)
    return entries, errors


async def _import(request: web.Request) -> web.Response:
    key, store = request[_KEY], request.app[_API].store
    raw = await _body(request, IMPORT_MAX_BODY)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ApiError(400, "the CSV must be UTF-8") from None
    now = utcnow()
    entries, errors = await asyncio.to_thread(_parse_import, text, key.account, f"api:{key.key_id}", now)
    imported = 0
    for start in range(0, len(entries), _IMPORT_BATCH):
        # an entry relayd recorded (a complaint...) under the same key is kept as it is
        imported += await store.add(entries[start : start + _IMPORT_BATCH], keep=PROTECTED)
    evidence = {"imported": imported, "rejected": len(errors)}
    await store.record_event(_event(key, "api_import", now, evidence))
    log.info(
        "api: key %s imported %d suppression(s) for %s, %d row(s) rejected",
        key.key_id,
        imported,
        key.account,
        len(errors),
    )
    shown = [{"line": line, "error": problem} for line, problem in errors[:_ERRORS_SHOWN]]
    return _json({"imported": imported, "rejected": len(errors), "errors": shown})


# --- events, consent, stats, messages -----------------------------------------------------------------


async def _events(request: web.Request) -> web.Response:
    """Events of the key's account with ids above ``after``, the objects webhooks POST (relayd.edge.webhooks
    render). ``next`` is the cursor of the following page (the last id looked at, also past kinds that
    are not sent); ``more`` says whether to ask again now."""
    key, store = request[_KEY], request.app[_API].store
    after = _int_param(request, "after", 0, 0, 2**63 - 1)
    limit = _int_param(request, "limit", 100, 1, EVENTS_MAX)
    rows = await store.events_after(after, key.account, limit)
    docs = [render(i, e, EVENT_NAMES[e.kind]) for i, e in rows if e.kind in EVENT_NAMES]
    nxt = rows[-1][0] if rows else after
    more = "true" if len(rows) == limit else "false"
    body = (
        b'{"events":['
        + b",".join(docs)
        + b'],"next":'
        + str(nxt).encode()
        + b',"more":'
        + more.encode()
        + b"}"
    )
    return web.Response(body=body, content_type="application/json", charset="utf-8")


def _consent_json(r: ConsentRecord) -> dict[str, Any]:
    """The record as ``relayd consent list --json`` shows it, without the account (the key's own)."""
    doc = r.as_json()
    del doc["account"]
    return doc


async def _consent_get(request: web.Request) -> web.Response:
    key, store = request[_KEY], request.app[_API].store
    address = _address(request)
    records = [r async for batch in store.consents(account=key.account, address=address) for r in batch]
    if not records:
        raise ApiError(404, "no consent recorded")
    return _json({"address": address, "consents": [_consent_json(r) for r in records]})


_CONSENT_FIELDS = frozenset({"list", "confirmed_at", "ip", "user_agent", "evidence"})


async def _consent_put(request: web.Request) -> web.Response:
    """Record that the address asked for a list: when (``confirmed_at``, not in the future), from where
    (``ip``), with what (``user_agent``) and any ``evidence`` (an object). A consent without time and IP is
    no proof (seeds/003, seeds/004), so both are required; ``source`` is ``api:<key id>``."""
    key, store = request[_KEY], request.app[_API].store
    address = _address(request)
    doc = await _json_body(request, _CONSENT_FIELDS)
    now = utcnow()
    for name in ("list", "confirmed_at", "ip"):
        if doc.get(name) is None:
            raise ApiError(400, f"{name}: required")
    lname = _list_name(doc["list"])
    confirmed = _instant(doc["confirmed_at"], "confirmed_at")
    if confirmed > now:
        raise ApiError(400, "confirmed_at: in the future")
    try:
        ip = str(ipaddress.ip_address(str(doc["ip"])))
    except ValueError:
        raise ApiError(400, "ip: not an IP address") from None
    agent = doc.get("user_agent")
    if agent is not None and not isinstance(agent, str):
        raise ApiError(400, "user_agent: a string")
    evidence = doc.get("evidence", {})
    if not isinstance(evidence, dict):
        raise ApiError(400, "evidence: a JSON object")
    record = ConsentRecord(
        account=key.account,
        list=lname,
        address=address,
        confirmed_at=confirmed,
        ip=ip,
        user_agent=agent[:_UA_MAX] if agent else None,
        source=f"api:{key.key_id}",
        evidence=json.dumps(evidence, sort_keys=True),
    )
    await store.add_consent([record])
    await store.record_event(
        _event(
            key, "api_consent", now, {"confirmed_at": _time(confirmed), "ip": ip}, list=lname, address=address
        )
    )
    log.info(
        "api: key %s recorded consent of %s to %s/%s", key.key_id, mask_address(address), key.account, lname
    )
    return _json(_consent_json(record))


async def _stats(request: web.Request) -> web.Response:
    """The figures ``relayd account show`` gives, for the key's account, with the thresholds they are
    judged against."""
    key, api = request[_KEY], request.app[_API]
    t = api.cfg.policy.thresholds
    now = utcnow()
    r = await reputation.rates(api.store, key.account, now, window=t.window)
    state = await api.store.get_account_state(key.account)
    suspended = bool(state and state.suspended)
    return _json(
        {
            "account": key.account,
            "since": _time(r.since),
            "until": _time(r.until),
            "sent": r.sent,
            "complaints": r.complaints,
            "hard_bounces": r.hard_bounces,
            "spamtraps": r.spamtraps,
            "complaint_rate": round(r.complaint_rate, 6),
            "hard_bounce_rate": round(r.hard_bounce_rate, 6),
            "suspended": suspended,
            "suspension": (
                {"reason": state.reason.value if state.reason else None, "since": _time(state.since)}
                if state is not None and suspended
                else None
            ),
            "thresholds": {
                "minimum_sent": t.minimum_sent,
                "complaint_warn": t.complaint_warn,
                "complaint_suspend": t.complaint_suspend,
                "hard_bounce_suspend": t.hard_bounce_suspend,
            },
        }
    )


def _shards(queue_dir: Path) -> list[Path]:
    """The queue shard files (``queue.db``, ``queue-N.db``: the names relayd.app.supervisor gives them)."""
    return sorted(p for p in queue_dir.glob("queue*.db") if p.name == "queue.db" or p.stem[6:].isdigit())


def _read_message(queue_dir: Path, queue_id: str) -> tuple[tuple[Any, ...], list[tuple[Any, ...]]] | None:
    """The message row and its recipients from whichever shard holds it, each opened read-only for this
    lookup (SQLite WAL: readers never wait for the daemon's writers)."""
    for path in _shards(queue_dir):
        try:
            db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=5.0)
        except sqlite3.Error:
            continue
        try:
            msg = db.execute(
                "SELECT id, account, list_name, created_at, size, msg_class FROM messages WHERE id = ?",
                (queue_id,),
            ).fetchone()
            if msg is None:
                continue
            rcpts = db.execute(
                "SELECT address, state, attempts, next_attempt, updated_at, last_reply FROM recipients"
                " WHERE msg_id = ? ORDER BY idx",
                (queue_id,),
            ).fetchall()
            return tuple(msg), [tuple(r) for r in rcpts]
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read queue shard {path.name}: {exc}") from exc
        finally:
            db.close()
    return None


def _epoch(value: float | None) -> str | None:
    """A queue time (unix seconds) as ISO 8601 UTC."""
    return None if value is None else _time(datetime.fromtimestamp(float(value), UTC))


async def _message(request: web.Request) -> web.Response:
    key, api = request[_KEY], request.app[_API]
    queue_id = request.match_info["queue_id"]
    if not _QUEUE_ID.fullmatch(queue_id):
        raise ApiError(404, "no such message")
    found = await asyncio.to_thread(_read_message, api.cfg.queue.path, queue_id)
    if found is None or found[0][1] != key.account:
        raise ApiError(404, "no such message")  # another account's message looks like none at all
    (qid, _account, lname, created_at, size, msg_class), rcpts = found
    recipients = [
        {
            "address": address,
            "state": state,
            "attempts": attempts,
            "next_attempt": _epoch(next_attempt) if state in ("queued", "held") else None,
            "updated_at": _epoch(updated_at),
            "last_reply": last_reply,
        }
        for address, state, attempts, next_attempt, updated_at, last_reply in rcpts
    ]
    return _json(
        {
            "queue_id": qid,
            "list": lname,
            "class": msg_class,
            "created_at": _epoch(created_at),
            "size": size,
            "recipients": recipients,
        }
    )


async def _openapi(request: web.Request) -> web.Response:
    return _json(document(request.app[_API].cfg.http.public_url))


#: (method, path, handler): every route of the API, in the order of the module docstring.
ROUTES: Final[tuple[tuple[str, str, _Handler], ...]] = (
    ("GET", f"{PREFIX}/suppressions/{{address}}", _suppression_get),
    ("PUT", f"{PREFIX}/suppressions/{{address}}", _suppression_put),
    ("DELETE", f"{PREFIX}/suppressions/{{address}}", _suppression_delete),
    ("GET", f"{PREFIX}/suppressions", _suppressions_list),
    ("POST", f"{PREFIX}/suppressions/import", _import),
    ("GET", f"{PREFIX}/suppressions/export", _export),
    ("GET", f"{PREFIX}/events", _events),
    ("GET", f"{PREFIX}/consent/{{address}}", _consent_get),
    ("PUT", f"{PREFIX}/consent/{{address}}", _consent_put),
    ("GET", f"{PREFIX}/stats", _stats),
    ("GET", f"{PREFIX}/messages/{{queue_id}}", _message),
    ("GET", f"{PREFIX}/openapi.json", _openapi),
)


def setup(app: web.Application, cfg: Config, store: Store) -> None:
    """Add the API to ``app`` when ``[http] api`` is on (a change needs a restart: routes are fixed once
    the app runs). The fixed paths (``import``, ``export``) are added before ``{address}`` so they win."""
    if not cfg.http.api:
        return
    app[_API] = _Api(cfg, store)
    fixed = sorted(ROUTES, key=lambda r: "{" in r[1])
    for method, path, handler in fixed:
        app.router.add_route(method, path, handler)


def update_config(app: web.Application, cfg: Config) -> None:
    """SIGHUP: thresholds, accounts (a removed account's keys stop working), public_url and the limits
    change at once (a changed limit starts with full buckets); turning the API on or off needs a restart."""
    if _API not in app:
        return
    api = app[_API]
    if cfg.http.api_rate != api.cfg.http.api_rate:
        api.per_key = RateLimiter(cfg.http.api_rate.events, cfg.http.api_rate.per)
    if cfg.http.rate_per_ip != api.cfg.http.rate_per_ip:
        api.per_ip = RateLimiter(cfg.http.rate_per_ip.events, cfg.http.rate_per_ip.per)
    api.cfg = cfg
