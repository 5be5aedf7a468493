"""The OpenAPI 3.1 document of the tenant API (relayd.edge.web.api), served at ``/api/v1/openapi.json``.

Written by hand as data, next to nothing else: the paths are a contract (DESIGN.md), and a test checks that
every route the app serves under ``/api/v1`` is here with its method and that the document validates
(openapi-spec-validator), so the two cannot drift apart unnoticed.
"""

from __future__ import annotations

from typing import Any

__all__ = ["document"]

_JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _ok(description: str, schema: dict[str, Any], media: str = _JSON) -> dict[str, Any]:
    return {"description": description, "content": {media: {"schema": schema}}}


def _errors(*codes: str) -> dict[str, Any]:
    """The error answers of an operation (``codes`` beyond those every one can give), each a
    ``{"error": ...}`` object described once under ``components.responses``."""
    out: dict[str, Any] = {
        code: {"$ref": f"#/components/responses/E{code}"} for code in sorted({"401", "429", "503", *codes})
    }
    out["default"] = {"description": "Unexpected error", "content": {_JSON: {"schema": _ref("Error")}}}
    return out


def _param(name: str, where: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": where == "path",
        "description": description,
        "schema": schema or {"type": "string"},
    }


_ADDRESS = _param("address", "path", "The recipient address (normalised: lower-case domain, IDNA)")

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}},
    },
    "Entry": {
        "type": "object",
        "description": "One suppression as the account sees it; a global entry has only scope and status.",
        "required": ["scope", "status"],
        "properties": {
            "scope": {"type": "string", "enum": ["global", "account", "list"]},
            "status": {"type": "string", "examples": ["suppressed (global)", "suppressed (unsubscribe)"]},
            "list": {"type": ["string", "null"]},
            "reason": {
                "type": "string",
                "enum": [
                    "hard_bounce",
                    "soft_bounce_limit",
                    "complaint",
                    "unsubscribe",
                    "spamtrap",
                    "manual",
                    "discard",
                ],
            },
            "source": {"type": "string"},
            "created_at": {"type": "string", "format": "date-time"},
            "expires_at": {"type": ["string", "null"], "format": "date-time"},
        },
    },
    "AddressEntries": {
        "type": "object",
        "required": ["address", "suppressed", "entries"],
        "properties": {
            "address": {"type": "string"},
            "suppressed": {"type": "boolean"},
            "entries": {"type": "array", "items": _ref("Entry")},
        },
    },
    "ListedEntry": {
        "allOf": [_ref("Entry"), {"type": "object", "properties": {"address": {"type": "string"}}}]
    },
    "SuppressionPut": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "reason": {
                "type": "string",
                "enum": ["manual", "unsubscribe"],
                "default": "manual",
                "description": "complaint, spamtrap, bounce and discard entries are recorded by relayd",
            },
            "list": {
                "type": ["string", "null"],
                "description": "List scope for this list; absent: account scope",
            },
            "expires": {
                "type": ["string", "null"],
                "description": "A lifetime (30d, 12h) or an ISO 8601 time; null: never",
            },
        },
    },
    "Removed": {
        "type": "object",
        "required": ["address", "removed"],
        "properties": {
            "address": {"type": "string"},
            "removed": {"type": "integer"},
            "still_suppressed": {"type": ["string", "null"]},
        },
    },
    "Page": {
        "type": "object",
        "required": ["suppressions", "next_cursor"],
        "properties": {
            "suppressions": {"type": "array", "items": _ref("ListedEntry")},
            "next_cursor": {"type": ["string", "null"], "description": "Pass as cursor for the next page"},
        },
    },
    "ImportResult": {
        "type": "object",
        "required": ["imported", "rejected", "errors"],
        "properties": {
            "imported": {"type": "integer"},
            "rejected": {"type": "integer"},
            "errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"line": {"type": "integer"}, "error": {"type": "string"}},
                },
            },
        },
    },
    "Event": {
        "type": "object",
        "description": "The object a webhook POSTs for this event",
        "required": ["id", "event", "kind", "at"],
        "properties": {
            "id": {"type": "integer"},
            "event": {"type": "string"},
            "kind": {"type": "string"},
            "at": {"type": "string", "format": "date-time"},
            "account": {"type": ["string", "null"]},
            "list": {"type": ["string", "null"]},
            "recipient": {"type": ["string", "null"]},
            "reason": {"type": ["string", "null"]},
            "queue_id": {"type": ["string", "null"]},
            "evidence": {"type": "object"},
        },
    },
    "Events": {
        "type": "object",
        "required": ["events", "next", "more"],
        "properties": {
            "events": {"type": "array", "items": _ref("Event")},
            "next": {"type": "integer", "description": "Pass as after for the next page"},
            "more": {"type": "boolean"},
        },
    },
    "Consent": {
        "type": "object",
        "properties": {
            "list": {"type": "string"},
            "address": {"type": "string"},
            "confirmed_at": {"type": "string", "format": "date-time"},
            "ip": {"type": "string"},
            "user_agent": {"type": ["string", "null"]},
            "source": {"type": "string"},
            "evidence": {"type": "object"},
        },
    },
    "ConsentPut": {
        "type": "object",
        "additionalProperties": False,
        "required": ["list", "confirmed_at", "ip"],
        "properties": {
            "list": {"type": "string"},
            "confirmed_at": {"type": "string", "format": "date-time"},
            "ip": {"type": "string"},
            "user_agent": {"type": ["string", "null"]},
            "evidence": {"type": "object"},
        },
    },
    "Consents": {
        "type": "object",
        "properties": {
            "address": {"type": "string"},
            "consents": {"type": "array", "items": _ref("Consent")},
        },
    },
    "Stats": {
        "type": "object",
        "properties": {
            "account": {"type": "string"},
            "since": {"type": "string", "format": "date-time"},
            "until": {"type": "string", "format": "date-time"},
            "sent": {"type": "integer"},
            "complaints": {"type": "integer"},
            "hard_bounces": {"type": "integer"},
            "spamtraps": {"type": "integer"},
            "complaint_rate": {"type": "number"},
            "hard_bounce_rate": {"type": "number"},
            "suspended": {"type": "boolean"},
            "suspension": {"type": ["object", "null"]},
            "thresholds": {"type": "object"},
        },
    },
    "Message": {
        "type": "object",
        "properties": {
            "queue_id": {"type": "string"},
            "list": {"type": ["string", "null"]},
            "class": {"type": "string"},
            "created_at": {"type": "string", "format": "date-time"},
            "size": {"type": "integer"},
            "recipients": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "address": {"type": "string"},
                        "state": {
                            "type": "string",
                            "enum": ["queued", "held", "delivered", "failed", "expired", "dropped"],
                        },
                        "attempts": {"type": "integer"},
                        "next_attempt": {"type": ["string", "null"], "format": "date-time"},
                        "updated_at": {"type": ["string", "null"], "format": "date-time"},
                        "last_reply": {"type": ["string", "null"]},
                    },
                },
            },
        },
    },
}


def _responses() -> dict[str, Any]:
    text = {
        "400": "Bad input (the message says which field)",
        "401": "No valid API key (missing, unknown or revoked)",
        "404": "Not found, or not this account's (the two are not told apart)",
        "409": "A global suppression: only the operator can remove it",
        "413": "Request body too large",
        "429": "Rate limit reached",
        "503": "The store is unavailable; nothing was changed",
    }
    out: dict[str, Any] = {}
    for code, description in text.items():
        response: dict[str, Any] = {"description": description, "content": {_JSON: {"schema": _ref("Error")}}}
        if code == "401":
            response["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
        if code in ("429", "503"):
            response["headers"] = {"Retry-After": {"schema": {"type": "integer"}}}
        out[f"E{code}"] = response
    return out


def _paths() -> dict[str, Any]:
    suppression = {
        "parameters": [_ADDRESS],
        "get": {
            "operationId": "getSuppression",
            "summary": "Whether the address is suppressed for this account",
            "responses": {"200": _ok("Suppressed", _ref("AddressEntries")), **_errors("400", "404")},
        },
        "put": {
            "operationId": "putSuppression",
            "summary": "Suppress the address for this account (or one of its lists)",
            "requestBody": {"required": True, "content": {_JSON: {"schema": _ref("SuppressionPut")}}},
            "responses": {"200": _ok("Stored", _ref("ListedEntry")), **_errors("400", "413")},
        },
        "delete": {
            "operationId": "deleteSuppression",
            "summary": "Remove this account's entries of the address (one list's with ?list=)",
            "parameters": [_param("list", "query", "Remove only this list's entry")],
            "responses": {"200": _ok("Removed", _ref("Removed")), **_errors("400", "404", "409")},
        },
    }
    return {
        "/api/v1/suppressions/{address}": suppression,
        "/api/v1/suppressions": {
            "get": {
                "operationId": "listSuppressions",
                "summary": "This account's entries (account and list scope), one page",
                "parameters": [
                    _param(
                        "scope", "query", "account or list", {"type": "string", "enum": ["account", "list"]}
                    ),
                    _param("list", "query", "Only this list"),
                    _param("reason", "query", "Only this reason"),
                    _param("since", "query", "Created since: an ISO 8601 time or a lifetime (7d)"),
                    _param("limit", "query", "Page size", {"type": "integer", "minimum": 1, "maximum": 1000}),
                    _param("cursor", "query", "next_cursor of the previous page"),
                ],
                "responses": {"200": _ok("A page", _ref("Page")), **_errors("400")},
            }
        },
        "/api/v1/suppressions/import": {
            "post": {
                "operationId": "importSuppressions",
                "summary": "Add entries from CSV (address,scope,account,list,reason,created_at,expires_at)",
                "requestBody": {"required": True, "content": {"text/csv": {"schema": {"type": "string"}}}},
                "responses": {"200": _ok("Imported", _ref("ImportResult")), **_errors("400", "413")},
            }
        },
        "/api/v1/suppressions/export": {
            "get": {
                "operationId": "exportSuppressions",
                "summary": "This account's entries as CSV, in the import format",
                "responses": {"200": _ok("CSV", {"type": "string"}, "text/csv"), **_errors()},
            }
        },
        "/api/v1/events": {
            "get": {
                "operationId": "listEvents",
                "summary": "This account's events after a cursor, as webhooks send them",
                "parameters": [
                    _param(
                        "after",
                        "query",
                        "The next of the previous page (0: from the start)",
                        {"type": "integer"},
                    ),
                    _param(
                        "limit",
                        "query",
                        "Events looked at",
                        {"type": "integer", "minimum": 1, "maximum": 500},
                    ),
                ],
                "responses": {"200": _ok("Events", _ref("Events")), **_errors("400")},
            }
        },
        "/api/v1/consent/{address}": {
            "parameters": [_ADDRESS],
            "get": {
                "operationId": "getConsent",
                "summary": "The consent records of the address for this account's lists",
                "responses": {"200": _ok("Records", _ref("Consents")), **_errors("400", "404")},
            },
            "put": {
                "operationId": "putConsent",
                "summary": "Record a consent with its evidence (time, IP, user agent)",
                "requestBody": {"required": True, "content": {_JSON: {"schema": _ref("ConsentPut")}}},
                "responses": {"200": _ok("Recorded", _ref("Consent")), **_errors("400", "413")},
            },
        },
        "/api/v1/stats": {
            "get": {
                "operationId": "getStats",
                "summary": "Sent, complaint and hard-bounce rates over the window, suspension state",
                "responses": {"200": _ok("Figures", _ref("Stats")), **_errors()},
            }
        },
        "/api/v1/messages/{queue_id}": {
            "parameters": [_param("queue_id", "path", "The id of the 250 reply to DATA")],
            "get": {
                "operationId": "getMessage",
                "summary": "A queued message's recipients and their delivery states",
                "responses": {"200": _ok("Status", _ref("Message")), **_errors("404")},
            },
        },
        "/api/v1/openapi.json": {
            "get": {
                "operationId": "getOpenApi",
                "summary": "This document",
                "security": [],
                "responses": {"200": _ok("OpenAPI 3.1", {"type": "object"}), **_errors()},
            }
        },
    }


def document(server_url: str) -> dict[str, Any]:
    """The OpenAPI document, with ``server_url`` (``[http] public_url``) as its server."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "relayd tenant API",
            "version": "1",
            "description": (
                "Suppressions, events, consent records, account figures and message status of the "
                "account an API key belongs to. Another account's data answers 404."
            ),
        },
        "servers": [{"url": server_url.rstrip("/")}],
        "security": [{"bearer": []}],
        "paths": _paths(),
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": _SCHEMAS,
            "responses": _responses(),
        },
    }
