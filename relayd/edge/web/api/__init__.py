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

The handlers live in one module per resource (:mod:`~relayd.edge.web.api.suppressions`,
:mod:`~relayd.edge.web.api.transfer` for the CSV import and export, :mod:`~relayd.edge.web.api.events`,
:mod:`~relayd.edge.web.api.consent`, :mod:`~relayd.edge.web.api.account` for the stats,
:mod:`~relayd.edge.web.api.messages`), each with its share of the route table; keys, limits and JSON errors
are :mod:`~relayd.edge.web.api.auth`, request validation :mod:`~relayd.edge.web.api.inputs`, and the wiring
into the aiohttp app :mod:`~relayd.edge.web.api.routes`.
"""

from __future__ import annotations

from relayd.edge.web.api.auth import limits_itself, middleware, redact
from relayd.edge.web.api.context import PREFIX
from relayd.edge.web.api.routes import ROUTES, setup, update_config

__all__ = ["PREFIX", "ROUTES", "limits_itself", "middleware", "redact", "setup", "update_config"]
