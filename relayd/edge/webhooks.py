"""Event webhooks: each account's events POSTed as signed JSON to its endpoints, at least once, in order.

Why the events table is the outbox: every event is committed there already, with an integer id that grows
in commit order (:class:`relayd.store.protocols.WebhookCursorStore`). So one dispatcher task per endpoint
(account, url) tails the account's events past a durable cursor, sends those of the kinds it subscribes to,
one POST per event, in id order, and moves the cursor only after a 2xx. Nothing extra is written when an
event is recorded; a restart resumes from the cursor; an outage only delays.

Delivery guarantees and their limits:

* **At least once.** The cursor is written after the receiver answered 2xx, so a crash (or a stop) between
  the answer and the write sends that event again. Receivers deduplicate on ``X-Relayd-Event-Id`` (the
  ``id`` field).
* **In order, never skipped.** A failed POST (connection refused, timeout, any non-2xx, a redirect) is
  retried with exponential backoff, 1 s, 2 s, 4 s ... capped at 5 min (or longer if ``Retry-After`` asks,
  up to that cap), forever; later events wait behind it. A receiver that is down for a week gets the week
  in order when it comes back.
* **Bounded by retention.** Events pruned from the log (``prune_events``) before an endpoint got them are
  gone. If the whole log is emptied, SQLite starts ids again at 1; the dispatcher notices the highest id
  going below its cursor at its next poll and starts over from the beginning of the (new) log. (Events
  recorded so fast after the emptying that their ids reach the old cursor before that poll would be
  missed; nothing in relayd empties the log today.)
* **A new endpoint starts now**: its cursor is set to the newest event id when :meth:`WebhookDispatcher.start`
  first sees it, so adding a webhook does not replay history. Changing an endpoint's URL makes a new
  endpoint; changing its ``events`` keeps the cursor.

Signature (Stripe-style, so receivers can use code they already have)::

    X-Relayd-Signature: t=1767261600,v1=<hex HMAC-SHA256(secret, b"1767261600." + body)>

``secret`` is the content of the endpoint's ``secret_file`` with surrounding whitespace stripped. The
timestamp is that of the attempt (a retry is signed again), so a receiver may refuse signatures older than a
few minutes (:func:`verify`'s ``tolerance``) to make replayed requests useless.

Failure: the dispatcher never raises after :meth:`~WebhookDispatcher.start`; receiver and store failures are
logged (WARNING) and retried. :meth:`~WebhookDispatcher.start` raises :class:`relayd.core.errors.ConfigError`
for an unreadable or empty secret file or a duplicate endpoint, and :class:`relayd.store.StoreError` when
the cursors cannot be read, so a broken setup fails the daemon's start instead of silently sending nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any, Final, Protocol, TypeVar
from urllib.parse import urlsplit

import aiohttp

from relayd.config import Config, WebhookEvent
from relayd.core.errors import ConfigError
from relayd.policy.reloaded import Reloaded
from relayd.store.models import Event, StoreError
from relayd.store.protocols import EventStore, WebhookCursorStore

__all__ = [
    "EVENT_ID_HEADER",
    "EVENT_NAMES",
    "SIGNATURE_HEADER",
    "WebhookDispatcher",
    "endpoint_key",
    "render",
    "sign",
    "verify",
]

log = logging.getLogger(__name__)

SIGNATURE_HEADER: Final = "X-Relayd-Signature"
EVENT_ID_HEADER: Final = "X-Relayd-Event-Id"
EVENT_NAME_HEADER: Final = "X-Relayd-Event"


class WebhookStore(EventStore, WebhookCursorStore, Protocol):
    """What the dispatcher reads and writes: the event log, and each endpoint's position in it."""


#: Store event kind -> webhook event name. The one place that decides what a receiver sees; a kind not
#: listed here (``feedback``, ``autoreply``, ``complaint_duplicate``, ``unattributed`` ...) is never sent.
#: ``delayed`` and ``bounce`` are what ``relayd.feedback.bounces`` records for a remote "delayed" DSN and
#: for a
#: bounce that suppresses nobody (a sender-side reason such as ``blocked``); ``deferred`` and ``bounced``
#: are our own delivery attempts (``relayd.feedback.delivery``).
EVENT_NAMES: Final[Mapping[str, WebhookEvent]] = {
    "delivered": "delivered",
    "deferred": "deferred",
    "delayed": "deferred",
    "bounced": "bounced",
    "bounce": "bounced",
    "hard_bounce": "bounced",
    "soft_bounce": "bounced",
    "expired": "expired",
    "complaint": "complained",
    "unsubscribed": "unsubscribed",
    "suppressed": "suppressed",
    "dropped": "dropped",
    "suspended": "suspended",
    # an operator's ``relayd queue hold|release|retry|drop`` (relayd.cli.queue): one event per account
    # touched, ``evidence`` naming who, how many recipients and which queue ids
    "queue_hold": "held",
    "queue_release": "released",
    "queue_retry": "retried",
    "queue_drop": "dropped",
    # a tenant's change through the API (relayd.edge.web.api), ``evidence`` naming the key (``who``)
    "api_suppress": "suppressed",
    "api_unsuppress": "unsuppressed",
    "api_import": "imported",
    "api_consent": "consented",
}

_USER_AGENT: Final = "relayd-webhooks/1"
_STOP_GRACE: Final = 10.0  # seconds stop() waits for the endpoint tasks before cancelling them
_SAVE_SCAN_EVERY: Final = 60.0  # seconds between cursor writes that only record "scanned past"

_T = TypeVar("_T")


# -- signing ----------------------------------------------------------------------------------------------


def sign(secret: bytes, body: bytes, ts: int) -> str:
    """The ``X-Relayd-Signature`` value for ``body`` sent at unix time ``ts``."""
    mac = hmac.new(secret, f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={ts},v1={mac}"


def verify(
    secret: bytes, body: bytes, header: str, *, tolerance: float = 300, now: float | None = None
) -> bool:
    """True when ``header`` is a valid signature of ``body`` made within ``tolerance`` seconds of ``now``.

    For receivers (and our tests). Several ``v1=`` values are accepted, any one matching (room for a secret
    rotation that signs with old and new key). Malformed headers are simply invalid, never an exception.
    """
    ts: int | None = None
    macs: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            continue
        if key == "t":
            if ts is not None or not (value.isascii() and value.isdigit()):
                return False  # a second or non-numeric timestamp: ambiguous, refuse
            ts = int(value)
        elif key == "v1":
            macs.append(value)
    if ts is None or not macs:
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance:
        return False
    expected = sign(secret, body, ts).rpartition("v1=")[2].encode()
    return any(hmac.compare_digest(expected, m.encode("utf-8", "replace")) for m in macs)


# -- payload ----------------------------------------------------------------------------------------------


def render(event_id: int, event: Event, name: WebhookEvent) -> bytes:
    """The JSON body for one event: compact, UTF-8, the same bytes on every retry.

    ``kind`` carries the store's own kind next to the webhook ``event`` name, because the mapping folds
    several kinds together (``hard_bounce`` and ``soft_bounce`` are both ``bounced``).
    """
    doc = {
        "id": event_id,
        "event": name,
        "kind": event.kind,
        "at": event.at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "account": event.account,
        "list": event.list,
        "recipient": event.address,
        "reason": event.reason,
        "queue_id": event.queue_id,
        "evidence": _evidence(event.evidence),
    }
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def _evidence(text: str) -> dict[str, Any]:
    """The event's evidence as an object, whatever was stored (it is free JSON text in the store)."""
    try:
        value = json.loads(text)
    except ValueError:
        return {"raw": text}
    return value if isinstance(value, dict) else {"value": value}


# -- dispatcher -------------------------------------------------------------------------------------------


def endpoint_key(account: str, url: str) -> str:
    """The durable name of an endpoint's cursor: one per (account, url)."""
    return f"{account} {url}"


def _redact(url: str) -> str:
    """The URL without credentials and query, for logs (tokens often travel in either)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host += f":{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


@dataclass(slots=True)
class _Endpoint:
    """One (account, url) and its progress. ``position``: every event id <= it is done with (sent, or not
    for this endpoint); ``saved``: the position last written to the store."""

    account: str
    url: str
    secret: bytes = field(repr=False)
    events: frozenset[str]
    position: int = 0
    saved: int = 0
    saved_at: float = 0.0

    @property
    def key(self) -> str:
        return endpoint_key(self.account, self.url)

    @property
    def label(self) -> str:
        return f"{self.account} -> {_redact(self.url)}"


@dataclass(frozen=True, slots=True)
class _Attempt:
    ok: bool
    problem: str = ""
    retry_after: float | None = None


class WebhookDispatcher:
    """Sends every account's events to its configured webhooks; one task per endpoint.

    Start after the store is open, stop before it is closed. Run one per store: with several worker
    processes (or nodes sharing a database) only one may run it, or every event is sent once per
    dispatcher and their cursor writes race.

    ``poll_interval`` is how often an idle endpoint looks for new events (the latency of a webhook);
    ``retry_initial``/``retry_max`` the backoff; ``timeout`` the total time of one POST; ``batch_size``
    how many events are read per query. A config reload restarts it (:meth:`reload`).
    """

    def __init__(
        self,
        cfg: Config,
        store: WebhookStore,
        *,
        poll_interval: float = 0.5,
        retry_initial: float = 1.0,
        retry_max: float = 300.0,
        timeout: float = 10.0,
        batch_size: int = 100,
    ) -> None:
        self._cfg = cfg
        self._store = store
        self._poll = poll_interval
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._timeout = timeout
        self._batch = max(1, batch_size)
        self._endpoints: list[_Endpoint] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._stopping = asyncio.Event()
        #: the restart after the last reload, until it is done (:meth:`reload`)
        self._restarting: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Read the secrets, load or create each endpoint's cursor, start the tasks.

        The cursors are settled before this returns, so every event recorded afterwards reaches a new
        endpoint. Raises ConfigError (secret file unreadable or empty, endpoint configured twice) or
        StoreError; nothing is started then.
        """
        if self._tasks:
            return
        endpoints = self._load_endpoints()
        for ep in endpoints:
            cursor = await self._store.get_webhook_cursor(ep.key)
            if cursor is None:
                cursor = await self._store.max_event_id()
                await self._store.set_webhook_cursor(ep.key, cursor)
                log.info("webhook %s: new endpoint, starting after event %d", ep.label, cursor)
            ep.position = ep.saved = cursor
            ep.saved_at = time.monotonic()
        self._endpoints = endpoints
        if not endpoints:
            return
        self._stopping.clear()
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout, connect=min(self._timeout, 10.0)),
            headers={"User-Agent": _USER_AGENT},
        )
        self._tasks = [
            asyncio.create_task(self._run(ep), name=f"webhook {ep.label}") for ep in self._endpoints
        ]
        log.info("webhooks: %d endpoint(s) started", len(self._tasks))

    async def stop(self) -> None:
        """Stop sending and record how far each endpoint got. Safe to call twice.

        A POST in flight is abandoned; its event is sent again after the next start (at least once).
        Tasks get ``_STOP_GRACE`` seconds to reach a safe point (never inside a store write) before they
        are cancelled. A restart after a reload that has not finished is cancelled first.
        """
        restarting, self._restarting = self._restarting, None
        if restarting is not None:
            restarting.cancel()  # and the restarts it waits for: each one awaits the one before
            await asyncio.gather(restarting, return_exceptions=True)
        await self._stop_endpoints()

    def reload(self, new: Reloaded) -> None:
        """New endpoints or secrets (SIGHUP): stop, saving how far each endpoint got, and start again with
        ``new``'s webhooks, in a task (a reload does not wait for the POSTs in flight). Reloads in a row
        restart in turn. A secret that cannot be read leaves the webhooks stopped, logged."""
        self._restarting = asyncio.create_task(
            self._restart(new.cfg, self._restarting), name="webhooks restart"
        )

    async def _restart(self, cfg: Config, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await previous
        await self._stop_endpoints()
        self._cfg = cfg
        try:
            await self.start()
        except (ConfigError, StoreError) as exc:
            log.error("webhooks not restarted after reload: %s", exc)

    async def _stop_endpoints(self) -> None:
        self._stopping.set()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=_STOP_GRACE)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks = []
            for ep in self._endpoints:
                with contextlib.suppress(StoreError):
                    await self._save(ep, force=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- per endpoint ---------------------------------------------------------------------------------

    def _load_endpoints(self) -> list[_Endpoint]:
        where = self._cfg.source or "(config)"
        problems: list[str] = []
        endpoints: dict[str, _Endpoint] = {}
        for account, acct in self._cfg.accounts.items():
            for i, hook in enumerate(acct.webhooks):
                path = f"{where}: accounts.{account}.webhooks[{i}]"
                try:
                    secret = hook.secret_file.read_bytes().strip()
                except OSError as exc:
                    problems.append(f"{path}.secret_file: cannot read {hook.secret_file}: {exc.strerror}")
                    continue
                if not secret:
                    problems.append(f"{path}.secret_file: {hook.secret_file} is empty")
                    continue
                ep = _Endpoint(account, hook.url, secret, frozenset(hook.events))
                if ep.key in endpoints:
                    problems.append(f"{path}.url: {_redact(hook.url)} is configured twice for this account")
                    continue
                endpoints[ep.key] = ep
        if problems:
            raise ConfigError(problems)
        return list(endpoints.values())

    async def _run(self, ep: _Endpoint) -> None:
        """Send, wait, repeat until stopped. Store trouble is logged and retried with the same backoff."""
        delay = self._retry_initial
        while not self._stopping.is_set():
            try:
                busy = await self._step(ep)
            except StoreError as exc:
                log.warning("webhook %s: store error, retrying in %gs: %s", ep.label, delay, exc)
                if await self._sleep(delay):
                    return
                delay = min(delay * 2, self._retry_max)
                continue
            except Exception:  # a bug here must not end delivery for good
                log.exception("webhook %s: unexpected error, retrying in %gs", ep.label, delay)
                if await self._sleep(delay):
                    return
                delay = min(delay * 2, self._retry_max)
                continue
            delay = self._retry_initial
            if not busy and await self._sleep(self._poll):
                return

    async def _step(self, ep: _Endpoint) -> bool:
        """One read of the log and the POSTs it calls for; False when there was nothing new."""
        newest = await self._store.max_event_id()
        if newest < ep.position:
            log.warning(
                "webhook %s: newest event id %d is below the cursor %d (event log emptied?); "
                "starting over from the beginning of the log",
                ep.label,
                newest,
                ep.position,
            )
            ep.position = 0
            await self._save(ep, force=True)
        if newest == ep.position:
            await self._save(ep, force=False)
            return False
        rows = await self._store.events_after(ep.position, ep.account, self._batch)
        for event_id, event in rows:
            name = EVENT_NAMES.get(event.kind)
            if name is not None and name in ep.events:
                if not await self._deliver(ep, event_id, event, name):
                    return True  # stopping; this event is sent again after the next start
                ep.position = event_id
                await self._save(ep, force=True)
            else:
                ep.position = event_id
        if len(rows) < self._batch:
            # Ids up to `newest` were committed before the read above, so it saw all of them.
            ep.position = max(ep.position, newest)
        return True

    async def _save(self, ep: _Endpoint, *, force: bool) -> None:
        """Write the cursor: always after a delivery, at most every minute when only skipping events."""
        if ep.position == ep.saved:
            return
        if not force and time.monotonic() - ep.saved_at < _SAVE_SCAN_EVERY:
            return
        await self._store.set_webhook_cursor(ep.key, ep.position)
        ep.saved = ep.position
        ep.saved_at = time.monotonic()

    async def _deliver(self, ep: _Endpoint, event_id: int, event: Event, name: WebhookEvent) -> bool:
        """POST one event until a 2xx; False if stopped first. Never gives up: skipping breaks the order."""
        body = render(event_id, event, name)
        delay = self._retry_initial
        attempt = 0
        while True:
            attempt += 1
            result = await self._unless_stopped(self._post(ep, event_id, name, body))
            if result is None:
                return False
            if result.ok:
                if attempt > 1:
                    log.info("webhook %s: event %d delivered after %d attempts", ep.label, event_id, attempt)
                else:
                    log.debug("webhook %s: event %d (%s) delivered", ep.label, event_id, name)
                return True
            wait = min(max(delay, result.retry_after or 0.0), self._retry_max)
            log.warning(
                "webhook %s: event %d (%s) not delivered (attempt %d): %s; retrying in %gs",
                ep.label,
                event_id,
                name,
                attempt,
                result.problem,
                wait,
            )
            if await self._sleep(wait):
                return False
            delay = min(delay * 2, self._retry_max)

    async def _post(self, ep: _Endpoint, event_id: int, name: str, body: bytes) -> _Attempt:
        """One signed POST. Redirects are not followed: the signed request goes where it was configured."""
        assert self._session is not None
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(ep.secret, body, int(time.time())),
            EVENT_ID_HEADER: str(event_id),
            EVENT_NAME_HEADER: name,
        }
        try:
            async with self._session.post(ep.url, data=body, headers=headers, allow_redirects=False) as resp:
                if 200 <= resp.status < 300:
                    return _Attempt(ok=True)
                return _Attempt(
                    ok=False,
                    problem=f"HTTP {resp.status} {resp.reason or ''}".rstrip(),
                    retry_after=_retry_after(resp.headers.get("Retry-After")),
                )
        except TimeoutError:
            return _Attempt(ok=False, problem=f"no answer within {self._timeout:g}s")
        except (aiohttp.ClientError, OSError) as exc:
            return _Attempt(ok=False, problem=f"{type(exc).__name__}: {exc}")

    async def _sleep(self, seconds: float) -> bool:
        """Wait ``seconds`` or until stop(); True if stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        return self._stopping.is_set()

    async def _unless_stopped(self, coro: Coroutine[Any, Any, _T]) -> _T | None:
        """Run ``coro`` (a POST), cancelling it when stop() is called; None then."""
        work = asyncio.create_task(coro)
        stopper = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stopper, work):
                task.cancel()  # no-op on a finished task
            await asyncio.gather(stopper, work, return_exceptions=True)
        if work.cancelled():
            return None
        return work.result()


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (RFC 9110 10.2.3); the HTTP-date form is ignored."""
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())
