"""``/api/v1/suppressions``: check, add, remove and list the suppressions of the key's account."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any, Final

from aiohttp import web

from relayd.config import parse_duration
from relayd.edge.web.api.context import API, KEY, PREFIX, ApiError, Route, api_event, iso_time, json_response
from relayd.edge.web.api.inputs import (
    PROTECTED,
    expiry,
    instant,
    int_param,
    json_body,
    list_name,
    path_address,
    tenant_reason,
)
from relayd.edge.web.pages import mask_address
from relayd.store.models import Reason, Scope, SuppressionEntry, utcnow
from relayd.store.protocols import Store

log = logging.getLogger(__name__)

PAGE_MAX: Final = 1000

_GLOBAL: Final = "suppressed (global)"


def entry_json(e: SuppressionEntry) -> dict[str, Any]:
    """One entry as a tenant sees it: everything of its own entries, nothing but the fact of a global one."""
    if e.scope is Scope.GLOBAL:
        return {"scope": "global", "status": _GLOBAL}
    return {
        "scope": e.scope.value,
        "list": e.list,
        "reason": e.reason.value,
        "source": e.source,
        "created_at": iso_time(e.created_at),
        "expires_at": iso_time(e.expires_at),
        "status": f"suppressed ({e.reason.value})",
    }


async def _visible(store: Store, account: str, address: str) -> tuple[list[SuppressionEntry], bool]:
    """The account's own active entries of ``address``, and whether a global one is active."""
    own = await store.list_entries(address=address, account=account, limit=PAGE_MAX)
    glob = await store.list_entries(address=address, scope=Scope.GLOBAL, limit=1)
    return own, bool(glob)


async def _suppression_get(request: web.Request) -> web.Response:
    key, store = request[KEY], request.app[API].store
    address = path_address(request)
    own, glob = await _visible(store, key.account, address)
    if not own and not glob:
        raise ApiError(404, "not suppressed")
    entries = ([{"scope": "global", "status": _GLOBAL}] if glob else []) + [entry_json(e) for e in own]
    return json_response({"address": address, "suppressed": True, "entries": entries})


_PUT_FIELDS = frozenset({"reason", "list", "expires"})


async def _suppression_put(request: web.Request) -> web.Response:
    key, store = request[KEY], request.app[API].store
    address = path_address(request)
    doc = await json_body(request, _PUT_FIELDS)
    now = utcnow()
    reason = tenant_reason(doc.get("reason", Reason.MANUAL.value))
    lname = None if doc.get("list") is None else list_name(doc["list"])
    entry = SuppressionEntry(
        address=address,
        scope=Scope.LIST if lname else Scope.ACCOUNT,
        account=key.account,
        list=lname,
        reason=reason,
        source=f"api:{key.key_id}",
        created_at=now,
        expires_at=expiry(doc.get("expires"), now),
    )
    own, _glob = await _visible(store, key.account, address)
    held = [e for e in own if e.scope is entry.scope and e.list == entry.list and e.reason in PROTECTED]
    if held:
        raise ApiError(409, f"suppressed ({held[0].reason.value}): only the operator can change this entry")
    await store.add([entry], keep=PROTECTED)  # keep=: a complaint recorded meanwhile still wins
    evidence = {"scope": entry.scope.value, "expires_at": iso_time(entry.expires_at)}
    await store.record_event(
        api_event(key, "api_suppress", now, evidence, list=lname, address=address, reason=reason.value)
    )
    log.info(
        "api: key %s suppressed %s for %s (%s, %s)",
        key.key_id,
        mask_address(address),
        key.account,
        entry.scope.value,
        reason.value,
    )
    return json_response({"address": address, **entry_json(entry)})


async def _suppression_delete(request: web.Request) -> web.Response:
    key, store = request[KEY], request.app[API].store
    address = path_address(request)
    only_list = None if "list" not in request.query else list_name(request.query["list"])
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
    await store.record_event(api_event(key, "api_unsuppress", now, evidence, list=only_list, address=address))
    log.info(
        "api: key %s removed %d suppression(s) of %s for %s",
        key.key_id,
        removed,
        mask_address(address),
        key.account,
    )
    return json_response(
        {"address": address, "removed": removed, "still_suppressed": _GLOBAL if glob else None}
    )


_SCOPES: Final = {"account": Scope.ACCOUNT, "list": Scope.LIST}


async def _suppressions_list(request: web.Request) -> web.Response:
    """Filters ``scope`` (account, list), ``list``, ``reason``, ``since`` (entries created since: an ISO time
    or a lifetime like ``7d``); ``limit`` (1..1000) and ``cursor`` (from ``next_cursor``)."""
    key, store = request[KEY], request.app[API].store
    q = request.query
    scope = None
    if "scope" in q:
        if q["scope"] not in _SCOPES:
            raise ApiError(400, "scope: account or list (global entries are the operator's and not listed)")
        scope = _SCOPES[q["scope"]]
    lname = list_name(q["list"]) if "list" in q else None
    reason = tenant_reason(q["reason"]) if "reason" in q else None
    since = None
    if "since" in q:
        try:
            since = utcnow() - timedelta(seconds=parse_duration(q["since"]))
        except ValueError:
            since = instant(q["since"], "since")
    limit = int_param(request, "limit", 100, 1, PAGE_MAX)
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
        batch = await store.list_entries(
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
    items = [{"address": e.address, **entry_json(e)} for e in out]
    return json_response({"suppressions": items, "next_cursor": None if end else str(offset)})


#: (method, path, handler) of this resource, in the order of the package docstring
ROUTES: Final[tuple[Route, ...]] = (
    ("GET", f"{PREFIX}/suppressions/{{address}}", _suppression_get),
    ("PUT", f"{PREFIX}/suppressions/{{address}}", _suppression_put),
    ("DELETE", f"{PREFIX}/suppressions/{{address}}", _suppression_delete),
    ("GET", f"{PREFIX}/suppressions", _suppressions_list),
)
