"""Backend-neutral interfaces of the policy state store; the values that cross them are in
:mod:`relayd.store.models`.

Why a Protocol per concern: the policy rules, the DSN/ARF feedback loop, the CLI and the web pages each need
only one slice of the state (a suppression rule needs ``check``, the caps rule needs ``check_sends``), and
typing each caller against its slice keeps fakes in unit tests small. Each backend class (``SqliteStore``,
``PostgresStore``) implements all of them; :class:`Store` is the union the daemon holds.

Conventions every backend keeps (the contract suite in ``tests/test_store_contract.py`` checks them):

* Addresses are stored and compared as given: callers pass them through :func:`relayd.core.address.normalize`
  first (RCPT TO, CSV import and the CLI do). The store does not normalise on the hot path.
* Times are timezone-aware UTC ``datetime`` values with microsecond precision; a naive ``datetime`` passed
  in is taken as UTC (never as local time) and values come back aware.
* "No account" / "no list" is ``None`` in Python. (Backends store it as ``''`` so that the
  (address, scope, account, list) key is unique in SQL, where NULLs are distinct.)
* All methods are coroutines; a backend failure (I/O error, lock timeout, corrupt file) raises
  :class:`~relayd.store.models.StoreError` with the backend's exception as ``__cause__``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from datetime import date, datetime
from typing import Protocol

from .models import (
    AccountState,
    ApiKey,
    ConsentRecord,
    DmarcCount,
    Event,
    InboxItem,
    MtaStsRecord,
    Reason,
    Scope,
    SentRecord,
    SuppressionEntry,
    SuspendReason,
    TlsSessionCount,
)

__all__ = [
    "AccountStateStore",
    "ApiKeyStore",
    "ConsentStore",
    "DmarcStore",
    "EventStore",
    "InboxStore",
    "MtaStsCache",
    "SendCounterStore",
    "SentLedger",
    "Store",
    "SuppressionStore",
    "TlsReportStore",
    "WebhookCursorStore",
]


class SuppressionStore(Protocol):
    """Who must not be mailed. ``check`` is on the RCPT and dequeue hot paths; the rest is for operators."""

    async def add(self, entries: Iterable[SuppressionEntry], *, keep: frozenset[Reason] = frozenset()) -> int:
        """Insert or replace (same key) ``entries`` atomically; return how many were given.

        An entry whose key already holds an entry with a reason in ``keep`` leaves that one as it is: a
        tenant's import or API call may add or renew its own entries, never turn a complaint into an
        unsubscribe (which transactional mail passes)."""
        ...

    async def remove(
        self,
        address: str,
        scope: Scope | None = None,
        account: str | None = None,
        list_name: str | None = None,
    ) -> int:
        """Delete entries of ``address``; return how many.

        With ``scope`` the exact key (address, scope, account, list_name) is removed. Without it every
        entry of the address is removed, narrowed to ``account`` / ``list_name`` when they are given.
        """
        ...

    async def list_entries(
        self,
        *,
        address: str | None = None,
        scope: Scope | None = None,
        account: str | None = None,
        list_name: str | None = None,
        reason: Reason | None = None,
        include_expired: bool = False,
        now: datetime | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[SuppressionEntry]:
        """Entries matching all given filters, ordered by key. For the CLI, not for hot paths."""
        ...

    async def count(self, *, scope: Scope | None = None) -> int:
        """Number of entries (expired ones included until purged)."""
        ...

    async def check(
        self,
        addresses: Sequence[str],
        account: str,
        list_name: str | None,
        now: datetime | None = None,
    ) -> dict[str, SuppressionEntry]:
        """The entry blocking each suppressed recipient of one message; unsuppressed ones are absent.

        Considers global entries, entries of ``account``, and (when ``list_name`` is given) entries of that
        list of that account; expired entries never block. When several match, the broadest scope wins
        (:data:`SCOPE_PRECEDENCE`). One round trip per batch: this runs for every message.
        """
        ...

    def scan(self, *, batch_size: int = 10_000) -> AsyncIterator[list[SuppressionEntry]]:
        """Every entry, expired ones too, in key order and in batches, without loading all: for export."""
        ...

    async def purge_expired(self, now: datetime | None = None) -> int:
        """Delete entries that expired at or before ``now``; return how many."""
        ...


class SendCounterStore(Protocol):
    """Sends per (account, list, address) over rolling windows, for per-list frequency caps.

    ``list_name=None`` is the account's unnamed list. A window of ``w`` seconds ending at ``at`` holds the
    sends with ``at - w < sent_at``; so with a cap of 1 per day a recipient can be mailed again exactly
    86 400 s after the previous send.
    """

    async def record_sends(
        self, account: str, list_name: str | None, addresses: Sequence[str], at: datetime
    ) -> None:
        """Count one send to each (distinct) address at ``at``."""
        ...

    async def count_sends(
        self, account: str, list_name: str | None, addresses: Sequence[str], since: datetime
    ) -> dict[str, int]:
        """Sends to each address at or after ``since``; every requested address is a key (0 if none)."""
        ...

    async def reserve_sends(
        self,
        account: str,
        list_name: str | None,
        addresses: Sequence[str],
        at: datetime,
        caps: Mapping[int, int],
    ) -> set[str]:
        """Atomically: the addresses for which one more send at ``at`` stays within every cap, recorded.

        ``caps`` maps window length in seconds to the most sends allowed in it (``{86400: 1, 604800: 3}``).
        Check and record happen in one write transaction, so two concurrent submissions (or two processes)
        cannot both pass a cap of 1. Addresses over a cap are returned out and not recorded.
        """
        ...

    async def check_sends(
        self,
        account: str,
        list_name: str | None,
        addresses: Sequence[str],
        at: datetime,
        caps: Mapping[int, int],
    ) -> set[str]:
        """The addresses for which one more send at ``at`` stays within every cap: those a message may go
        to, counted by the sent-ledger write of that message (``record_sent(records, caps=caps)``).

        Where the count is made is the store's choice; either way no cap is passed by two messages racing
        for its last send. SQLite reads here (on the loop's thread: no turn of the loop) and counts in the
        ledger's transaction, checking again there: a send counted meanwhile by another message fails that
        write with :class:`~relayd.store.models.SendsContended`, nothing of it written. PostgreSQL reserves
        here (:meth:`reserve_sends`), and its ledger write counts nothing more."""
        ...

    async def prune(self, before: datetime) -> int:
        """Delete sends older than ``before`` (keep the longest configured window); return how many."""
        ...


class AccountStateStore(Protocol):
    """Suspension of sending accounts; the suspension rule rejects RCPT while an account is suspended."""

    async def suspend(
        self, account: str, reason: SuspendReason, details: str = "", at: datetime | None = None
    ) -> AccountState:
        """Suspend ``account``. Suspending a suspended account updates reason/details and keeps ``since``."""
        ...

    async def reinstate(self, account: str, at: datetime | None = None) -> AccountState | None:
        """Lift a suspension; returns the new state, or None when the account has no recorded state."""
        ...

    async def get_account_state(self, account: str) -> AccountState | None:
        """The account's state, or None if it was never suspended (which means: may send)."""
        ...

    async def list_account_states(self, *, suspended_only: bool = False) -> list[AccountState]:
        """All recorded states, ordered by account."""
        ...


class EventStore(Protocol):
    """Append-only log of policy decisions and feedback; written often, read by operators and rate checks."""

    async def record_event(self, event: Event) -> None:
        """Append ``event``. Returns once it is committed; concurrent callers share one commit."""
        ...

    async def record_events(self, events: Iterable[Event]) -> None:
        """Append several events in one transaction (keyed ones upserted, see :class:`Event`)."""
        ...

    async def event_by_key(self, key: str) -> Event | None:
        """The event stored under ``key`` (with its ``count`` and ``last_seen``), or None: whether a report
        was seen before, so its effects are applied once."""
        ...

    async def events(
        self,
        since: datetime,
        limit: int = 1000,
        account: str | None = None,
        kind: str | None = None,
    ) -> list[Event]:
        """Events at or after ``since``, oldest first (page on with the last ``at``), optionally filtered."""
        ...

    async def prune_events(self, before: datetime) -> int:
        """Delete events older than ``before`` (by first ``at``, whatever their ``last_seen``); return how
        many."""
        ...

    async def count_events(
        self,
        kind: str,
        since: datetime,
        *,
        account: str | None = None,
        address: str | None = None,
        reason: str | None = None,
    ) -> int:
        """Events of ``kind`` at or after ``since``, narrowed to ``account``/``address``/``reason`` if given.
        A keyed event counts once, however often it was recorded (its first ``at`` decides the window).

        For rate checks that run after every complaint or bounce, so it must not read the raw log: with
        ``account`` (and no ``address``) it sums hourly roll-ups and counts only the first partial hour
        from the log; with ``address`` it counts that address's index range. ``None`` means "any"; events
        without an account are counted only when ``account`` is not given. Pruning events older than
        ``since`` does not change the per-account counts (the roll-ups are kept).
        """
        ...


class SentLedger(Protocol):
    """(queue id, index) -> (account, list, address), for attributing bounces, complaints, unsubscribes."""

    def record_sent(
        self, records: Iterable[SentRecord], *, caps: Mapping[int, int] | None = None
    ) -> asyncio.Future[None]:
        """Write the records of one accepted message (one transaction); await the result for its commit.

        The write is queued before this returns, without a turn of the event loop: a queue commit given
        right after, ``after`` it (:meth:`relayd.queue.store.QueueStore.enqueue`), is ordered behind it and
        may share its turn. Raises StoreError at once for a store that cannot keep the ledger.

        ``caps``: the records' addresses passed :meth:`SendCounterStore.check_sends` with these caps (all
        records of one message share account, list and time); their sends are counted with them, by the
        store that counts there (SendsContended: counted meanwhile, nothing written)."""
        ...

    async def lookup_sent(self, queue_id: str, index: int) -> SentRecord | None:
        """The record behind a token, or None (never sent by us, or pruned)."""
        ...

    async def prune_sent(self, before: datetime) -> int:
        """Forget records older than ``before``; return how many."""
        ...

    def scan_sent(self, *, batch_size: int = 10_000) -> AsyncIterator[list[SentRecord]]:
        """Every record, in (queue id, index) order and in batches: for ``relayd store export``."""
        ...

    async def count_sent(self, account: str, since: datetime) -> int:
        """Recipients accepted for ``account`` at or after ``since``: the denominator of its rates.

        Served by hourly roll-ups plus the exact first partial hour, so it costs the same for an account
        sending ten messages a month or ten million. Pruning ledger rows older than ``since`` does not
        change it (whole hours come from the roll-up, which pruning keeps).
        """
        ...


class WebhookCursorStore(Protocol):
    """The events log read as an outbox: what webhook dispatchers tail, and how far each endpoint got.

    Event ids are assigned in commit order: once an event is visible, no event committed later has a lower
    id. That is what lets a dispatcher keep one integer per endpoint instead of a row per delivery (SQLite
    gets it from its single writer; a PostgreSQL backend must serialise event inserts or only read ids
    below the oldest open inserting transaction, because sequence values are not committed in order).
    """

    async def events_after(
        self, after_id: int, account: str | None, limit: int = 100
    ) -> list[tuple[int, Event]]:
        """Up to ``limit`` events with id > ``after_id``, in id order, with their ids.

        ``account=None`` means every event, account-less ones included. Cost is proportional to the events
        after ``after_id`` (a primary-key range scan), so callers keep ``after_id`` close to the end.
        """
        ...

    async def max_event_id(self) -> int:
        """The highest event id in the log, 0 when it is empty.

        A value lower than before means the log was emptied (SQLite then starts ids again at 1).
        """
        ...

    async def get_webhook_cursor(self, key: str) -> int | None:
        """The last event id that endpoint ``key`` is done with, or None for an endpoint never seen."""
        ...

    async def set_webhook_cursor(self, key: str, event_id: int) -> None:
        """Record that endpoint ``key`` is done with every event up to ``event_id`` (insert or replace).

        Committed without fsync (like events): a crash may lose the last update, which only makes the
        dispatcher send some events again, which at-least-once delivery allows.
        """
        ...


class ConsentStore(Protocol):
    """Who asked for which list, and the rate limit of confirmation mails (double opt-in).

    ``has_consent`` runs for every message of a list with ``require_consent``; ``reserve_optin`` for every
    confirmation mail (``X-Relayd-Optin``); the rest serves the confirm page and the CLI.
    """

    async def add_consent(self, records: Iterable[ConsentRecord]) -> int:
        """Insert or replace (same key) ``records`` atomically and durably; return how many were written.

        Durable like a suppression (fsync at commit): a consent the confirm page acknowledged is evidence
        an operator may have to produce later.
        """
        ...

    async def get_consent(self, account: str, list_name: str, address: str) -> ConsentRecord | None:
        """The record of one key, or None."""
        ...

    async def has_consent(self, account: str, list_name: str, addresses: Sequence[str]) -> set[str]:
        """The addresses among ``addresses`` that have a consent record for ``list_name`` of ``account``.

        One round trip per batch (the consent rule calls it once per message).
        """
        ...

    def consents(
        self,
        *,
        account: str | None = None,
        list_name: str | None = None,
        address: str | None = None,
        batch_size: int = 10_000,
    ) -> AsyncIterator[list[ConsentRecord]]:
        """Every record matching the given filters, in (account, list, address) order and in batches, without
        loading all at once: for ``relayd consent export`` and ``show``."""
        ...

    async def reserve_optin(
        self,
        account: str,
        list_name: str,
        addresses: Sequence[str],
        at: datetime,
        window: float,
    ) -> set[str]:
        """Atomically: the addresses that got no confirmation mail of this list in the ``window`` seconds
        before ``at`` (``last > at - window``), each now recorded as sent one at ``at``.

        Check and record are one write transaction, so two concurrent submissions (or two processes) can't
        both send a confirmation mail to one address. Addresses refused are returned out and not recorded.
        """
        ...

    async def prune_optin(self, before: datetime) -> int:
        """Forget confirmation mails sent before ``before`` (keep at least the window); return how many."""
        ...


class MtaStsCache(Protocol):
    """The MTA-STS policies every node shares (RFC 8461 §5.1: cached until ``max_age``)."""

    async def get_mta_sts(self, domain: str) -> MtaStsRecord | None:
        """The cached policy of ``domain``, expired or not (the caller decides), or None."""
        ...

    async def put_mta_sts(self, record: MtaStsRecord) -> None:
        """Insert or replace the policy of ``record.domain``."""
        ...

    async def prune_mta_sts(self, before: datetime) -> int:
        """Forget policies that expired before ``before``; return how many."""
        ...


class TlsReportStore(Protocol):
    """TLS reporting counts, added to by every node, read once a day for the reports."""

    async def add_tls_sessions(self, counts: Iterable[TlsSessionCount]) -> None:
        """Add each count's ``sessions`` to its row (created at 0)."""
        ...

    async def tls_sessions(self, day: date) -> list[TlsSessionCount]:
        """Every count of ``day``."""
        ...

    async def claim_tls_report(self, day: date, domain: str) -> bool:
        """Take the sending of ``domain``'s report for ``day``: True for the one caller that gets it."""
        ...

    async def prune_tls_sessions(self, before: date) -> int:
        """Forget counts and claims of days before ``before``; return the count rows removed."""
        ...


class InboxStore(Protocol):
    """The postmaster's inbox: kept, listed, shown, marked done, pruned."""

    async def add_inbox_item(self, item: InboxItem, raw: bytes) -> int:
        """Keep ``item`` (its ``id`` is ignored) with ``raw``; return the new id."""
        ...

    async def count_inbox_from(self, source: str, since: datetime) -> int:
        """How many items from ``source`` were kept since ``since`` (the per-source cap)."""
        ...

    async def inbox_items(
        self,
        *,
        since: datetime | None = None,
        kind: str | None = None,
        state: str | None = None,
        limit: int = 1000,
    ) -> list[InboxItem]:
        """Items received since ``since``, newest first, without their raw bytes."""
        ...

    async def get_inbox_item(self, item_id: int) -> InboxItem | None:
        """One item with its raw bytes, or None."""
        ...

    async def mark_inbox_done(self, item_id: int, at: datetime) -> bool:
        """Mark an item done; False when there is no such item."""
        ...

    async def count_open_inbox(self) -> int:
        """Items still open."""
        ...

    async def prune_inbox(self, before: datetime) -> int:
        """Forget items received before ``before``, open or done; return how many."""
        ...


class DmarcStore(Protocol):
    """DMARC aggregate counts: a report is stored once, whatever number of times it is mailed."""

    async def add_dmarc_report(
        self, org: str, report_id: str, domain: str, received_at: datetime, counts: Sequence[DmarcCount]
    ) -> bool:
        """Store a report's counts; False (nothing written) when this report was stored before."""
        ...

    async def dmarc_counts(self, domain: str, since: date) -> list[DmarcCount]:
        """Every count of ``domain`` from day ``since`` on."""
        ...

    async def prune_dmarc(self, before: date) -> int:
        """Forget reports and counts of days before ``before``; return the count rows removed."""
        ...


class ApiKeyStore(Protocol):
    """The tenants' API keys, shared by every node (a key created on one works on all, a revocation holds
    everywhere from the next request on: the web listener reads the key's row for each request)."""

    async def add_api_key(self, key: ApiKey) -> None:
        """Store a new key durably. Raises ValueError when ``key.key_id`` exists already."""
        ...

    async def get_api_key(self, key_id: str) -> ApiKey | None:
        """The key with this id, revoked or not, or None."""
        ...

    async def list_api_keys(self, account: str | None = None) -> list[ApiKey]:
        """Every key (of ``account``), revoked ones included, ordered by account and creation."""
        ...

    async def revoke_api_key(self, key_id: str, at: datetime | None = None) -> bool:
        """Mark a key revoked at ``at`` (durably); False when there is no such key or it was revoked
        before."""
        ...


class Store(
    SuppressionStore,
    SendCounterStore,
    AccountStateStore,
    EventStore,
    SentLedger,
    WebhookCursorStore,
    ConsentStore,
    MtaStsCache,
    TlsReportStore,
    InboxStore,
    DmarcStore,
    ApiKeyStore,
    Protocol,
):
    """Everything the daemon keeps: one object per process, opened at start, closed at shutdown."""

    async def open(self) -> None:
        """Connect and bring the schema up to date (:meth:`migrate`). Raises StoreError on failure."""
        ...

    async def close(self) -> None:
        """Flush pending writes and disconnect. Safe to call twice."""
        ...

    async def migrate(self) -> int:
        """Create or upgrade the schema; return the schema version now in force."""
        ...
