"""``/api/v1/consent/{address}``: the consent records of an address, and a new one with its evidence."""

from __future__ import annotations

import ipaddress
import json
import logging
from typing import Any, Final

from aiohttp import web

from relayd.edge.web.api.context import API, KEY, PREFIX, ApiError, Route, api_event, iso_time, json_response
from relayd.edge.web.api.inputs import instant, json_body, list_name, path_address
from relayd.edge.web.pages import mask_address
from relayd.store.models import ConsentRecord, utcnow

log = logging.getLogger(__name__)

_UA_MAX: Final = 256


def consent_json(r: ConsentRecord) -> dict[str, Any]:
    """The record as ``relayd consent list --json`` shows it, without the account (the key's own)."""
    doc = r.as_json()
    del doc["account"]
    return doc


async def _consent_get(request: web.Request) -> web.Response:
    key, store = request[KEY], request.app[API].store
    address = path_address(request)
    records = [r async for batch in store.consents(account=key.account, address=address) for r in batch]
    if not records:
        raise ApiError(404, "no consent recorded")
    return json_response({"address": address, "consents": [consent_json(r) for r in records]})


_CONSENT_FIELDS = frozenset({"list", "confirmed_at", "ip", "user_agent", "evidence"})


async def _consent_put(request: web.Request) -> web.Response:
    """Record that the address asked for a list: when (``confirmed_at``, not in the future), from where
    (``ip``), with what (``user_agent``) and any ``evidence`` (an object). A consent without time and IP is
    no proof (seeds/003, seeds/004), so both are required; ``source`` is ``api:<key id>``."""
    key, store = request[KEY], request.app[API].store
    address = path_address(request)
    doc = await json_body(request, _CONSENT_FIELDS)
    now = utcnow()
    for name in ("list", "confirmed_at", "ip"):
        if doc.get(name) is None:
            raise ApiError(400, f"{name}: required")
    lname = list_name(doc["list"])
    confirmed = instant(doc["confirmed_at"], "confirmed_at")
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
        api_event(
            key,
            "api_consent",
            now,
            {"confirmed_at": iso_time(confirmed), "ip": ip},
            list=lname,
            address=address,
        )
    )
    log.info(
        "api: key %s recorded consent of %s to %s/%s", key.key_id, mask_address(address), key.account, lname
    )
    return json_response(consent_json(record))


#: (method, path, handler) of this resource, in the order of the package docstring
ROUTES: Final[tuple[Route, ...]] = (
    ("GET", f"{PREFIX}/consent/{{address}}", _consent_get),
    ("PUT", f"{PREFIX}/consent/{{address}}", _consent_put),
)
