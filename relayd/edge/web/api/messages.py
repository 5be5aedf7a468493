"""``/api/v1/messages/{queue_id}``: a queued message's recipients and their states, as the queue of this node
holds them (:func:`relayd.queue.shards.read_message`: each shard read-only, nothing created or locked)."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime
from typing import Final

from aiohttp import web

from relayd.edge.web.api.context import API, KEY, PREFIX, ApiError, Route, iso_time, json_response
from relayd.queue.shards import read_message

_QUEUE_ID: Final = re.compile(r"[A-Za-z0-9]{1,64}")


def _epoch(value: float | None) -> str | None:
    """A queue time (unix seconds) as ISO 8601 UTC."""
    return None if value is None else iso_time(datetime.fromtimestamp(float(value), UTC))


async def _message(request: web.Request) -> web.Response:
    key, api = request[KEY], request.app[API]
    queue_id = request.match_info["queue_id"]
    if not _QUEUE_ID.fullmatch(queue_id):
        raise ApiError(404, "no such message")
    msg = await asyncio.to_thread(read_message, api.cfg.queue.path, queue_id)
    if msg is None or msg.account != key.account:
        raise ApiError(404, "no such message")  # another account's message looks like none at all
    recipients = [
        {
            "address": r.address,
            "state": r.state,
            "attempts": r.attempts,
            "next_attempt": _epoch(r.next_attempt) if r.state in ("queued", "held") else None,
            "updated_at": _epoch(r.updated_at),
            "last_reply": r.last_reply,
        }
        for r in msg.recipients
    ]
    return json_response(
        {
            "queue_id": msg.queue_id,
            "list": msg.list_name,
            "class": msg.msg_class.value,
            "created_at": _epoch(msg.created_at),
            "size": msg.size,
            "recipients": recipients,
        }
    )


#: (method, path, handler) of this resource, in the order of the package docstring
ROUTES: Final[tuple[Route, ...]] = (("GET", f"{PREFIX}/messages/{{queue_id}}", _message),)
