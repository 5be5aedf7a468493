"""``/api/v1/events``: the account's events, the objects webhooks POST, paged by event id."""

from __future__ import annotations

from typing import Final

from aiohttp import web

from relayd.edge.web.api.context import API, KEY, PREFIX, Route
from relayd.edge.web.api.inputs import int_param
from relayd.edge.webhooks import EVENT_NAMES, render

EVENTS_MAX: Final = 500


async def _events(request: web.Request) -> web.Response:
    """Events of the key's account with ids above ``after``, the objects webhooks POST (relayd.edge.webhooks
    render). ``next`` is the cursor of the following page (the last id looked at, also past kinds that
    are not sent); ``more`` says whether to ask again now."""
    key, store = request[KEY], request.app[API].store
    after = int_param(request, "after", 0, 0, 2**63 - 1)
    limit = int_param(request, "limit", 100, 1, EVENTS_MAX)
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


#: (method, path, handler) of this resource, in the order of the package docstring
ROUTES: Final[tuple[Route, ...]] = (("GET", f"{PREFIX}/events", _events),)
