"""Request validation of the tenant API: bodies under their caps, JSON objects with known fields only,
addresses, list names, reasons, times and integer parameters, each refused with a 400 that names the field.

The functions that take values (not the request) are pure: they return the parsed value or raise
:class:`~relayd.edge.web.api.context.ApiError`."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any, Final

from aiohttp import web

from relayd.config import parse_duration
from relayd.core.address import AddressError, normalize
from relayd.edge.web.api.context import ApiError
from relayd.mail.listid import list_name as list_label
from relayd.store.models import Reason, as_utc

JSON_MAX_BODY: Final = 64 * 1024

_ADDRESS_MAX: Final = 320  # RFC 5321 path limits: 64 + 1 + 255, with room


async def read_body(request: web.Request, cap: int) -> bytes:
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


async def json_body(request: web.Request, allowed: frozenset[str]) -> dict[str, Any]:
    raw = await read_body(request, JSON_MAX_BODY)
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


def path_address(request: web.Request) -> str:
    text = request.match_info["address"]
    if len(text) > _ADDRESS_MAX:
        raise ApiError(400, "address too long")
    try:
        return normalize(text)
    except AddressError as exc:
        raise ApiError(400, f"not an address: {exc}") from None


def list_name(value: object, field: str = "list") -> str:
    if not isinstance(value, str) or list_label(value) != value.lower() or "." in value:
        raise ApiError(400, f"{field}: not a list name (letters, digits, '_', '-'; at most 63)")
    return value.lower()


#: The reasons a tenant may give. The others record what relayd saw (a complaint, a spam trap, a bounce,
#: a discard pattern): an entry of theirs is the operator's to lift or change, never the tenant's, or an
#: account could mail again a person who reported it, or turn the complaint into an unsubscribe, which
#: transactional mail passes.
TENANT_REASONS: Final = frozenset({Reason.MANUAL, Reason.UNSUBSCRIBE})
PROTECTED: Final = frozenset(Reason) - TENANT_REASONS


def tenant_reason(value: object) -> Reason:
    try:
        reason = Reason(str(value)) if isinstance(value, str) else Reason("")
    except ValueError:
        reason = None
    if reason not in TENANT_REASONS:
        raise ApiError(400, f"reason: one of {', '.join(sorted(r.value for r in TENANT_REASONS))}")
    return reason


def instant(value: object, field: str) -> datetime:
    if not isinstance(value, str):
        raise ApiError(400, f"{field}: an ISO 8601 time")
    try:
        return as_utc(datetime.fromisoformat(value.replace("Z", "+00:00")))
    except ValueError:
        raise ApiError(400, f"{field}: not an ISO 8601 time: {value[:40]!r}") from None


def expiry(value: object, now: datetime) -> datetime | None:
    """``null``, a lifetime (``"30d"``) or an ISO 8601 time in the future."""
    if value is None:
        return None
    if isinstance(value, str) and value[-1:] in ("s", "m", "h", "d"):
        try:
            return now + timedelta(seconds=parse_duration(value))
        except ValueError:
            pass
    at = instant(value, "expires")
    if at <= now:
        raise ApiError(400, "expires: in the past")
    return at


def int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
        raise ApiError(400, f"{name}: an integer from {low} to {high}")
    return int(text)
