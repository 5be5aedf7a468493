"""Rows of the store's tables to values and back, and the argument checks, as both backends do them.

Why one module: SQLite and PostgreSQL keep the same tables with the same column types (times as BIGINT
microseconds since the epoch, days as days since the epoch, "no account" / "no list" as ``''``; see
:mod:`relayd.store.migrations`), so a row converts to a value the same way whatever driver read it. The
backends differ in placeholders and in how a batch reaches the server (``executemany`` against arrays to
``unnest``); that stays in :mod:`relayd.store.sqlite` and :mod:`relayd.store.postgresql`.

A row here is any sequence of column values: an aiosqlite tuple or an ``asyncpg.Record``. Each reader names
the columns it expects (``*_COLUMNS`` in :mod:`relayd.store.sql`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final, Protocol

from .models import (
    SCOPE_PRECEDENCE,
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
    as_utc,
)

__all__ = [
    "HOUR_US",
    "account_state",
    "api_key",
    "api_key_row",
    "cap_windows",
    "consent",
    "consent_row",
    "day_number",
    "distinct",
    "dmarc_count",
    "dmarc_row",
    "entry_row",
    "event",
    "event_row",
    "from_micros",
    "inbox_item",
    "inbox_row",
    "keep_broadest",
    "micros",
    "mta_sts_record",
    "mta_sts_row",
    "sent_record",
    "sent_row",
    "suppression_entry",
    "tls_count",
    "tls_row",
]

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_DAY: Final = date(1970, 1, 1)
_US: Final = timedelta(microseconds=1)
#: The roll-up granularity of sent_hourly / event_hourly (migration 3), in microseconds.
HOUR_US: Final = 3_600_000_000


class Row(Protocol):
    """A row as a driver returns it (an aiosqlite tuple, an ``asyncpg.Record``): columns by position."""

    def __getitem__(self, index: int, /) -> Any: ...

    def __iter__(self) -> Iterator[Any]: ...

    def __len__(self) -> int: ...


# --- times and days ------------------------------------------------------------------------------------


def micros(value: datetime) -> int:
    """Microseconds since the epoch, exactly (no float rounding), as every table stores times."""
    return (as_utc(value) - _EPOCH) // _US


def from_micros(value: int) -> datetime:
    """The aware UTC time of a stored microsecond count."""
    return _EPOCH + timedelta(microseconds=value)


def _opt_time(value: int | None) -> datetime | None:
    return None if value is None else from_micros(value)


def day_number(value: date) -> int:
    """Days since the epoch, as the TLS report and DMARC tables store days."""
    return (value - _EPOCH_DAY).days


def _day(value: int) -> date:
    return _EPOCH_DAY + timedelta(days=int(value))


# --- argument checks -----------------------------------------------------------------------------------


def distinct(addresses: Iterable[str]) -> list[str]:
    """``addresses`` without repeats, in the order given: one row (and one answer) per address."""
    return list(dict.fromkeys(addresses))


def cap_windows(caps: Mapping[int, int]) -> list[int]:
    """The window lengths of ``caps`` (seconds), shortest first; ValueError when one is not positive."""
    windows = sorted(caps)
    if any(w <= 0 for w in windows):
        raise ValueError(f"cap windows must be positive seconds, got {windows}")
    return windows


# --- suppression, account state, events, the sent ledger ----------------------------------------------


def entry_row(e: SuppressionEntry) -> tuple[Any, ...]:
    """The values of ``ENTRY_COLUMNS`` for ``e``; the first four are its key."""
    return (
        e.address,
        e.scope.value,
        e.account or "",
        e.list or "",
        e.reason.value,
        e.source,
        micros(e.created_at),
        None if e.expires_at is None else micros(e.expires_at),
    )


def suppression_entry(row: Row) -> SuppressionEntry:
    """A suppression entry from a row of ``ENTRY_COLUMNS``."""
    return SuppressionEntry(
        address=row[0],
        scope=Scope(row[1]),
        account=row[2] or None,
        list=row[3] or None,
        reason=Reason(row[4]),
        source=row[5],
        created_at=from_micros(row[6]),
        expires_at=_opt_time(row[7]),
    )


def account_state(row: Row) -> AccountState:
    """An account state from a row of ``ACCOUNT_COLUMNS``."""
    return AccountState(
        account=row[0],
        suspended=bool(row[1]),
        reason=None if row[2] is None else SuspendReason(row[2]),
        details=row[3],
        since=from_micros(row[4]),
    )


def event_row(e: Event) -> tuple[Any, ...]:
    """The values of ``EVENT_COLUMNS`` for ``e``."""
    last_seen = None if e.last_seen is None else micros(e.last_seen)
    return (
        *(micros(e.at), e.kind, e.account, e.list, e.address, e.reason, e.queue_id, e.evidence),
        *(e.key, e.count, last_seen),
    )


def event(row: Row, first: int = 0) -> Event:
    """The event in ``row``'s columns ``first`` .. ``first + 10`` (``EVENT_COLUMNS`` order)."""
    return Event(
        at=from_micros(row[first]),
        kind=row[first + 1],
        account=row[first + 2],
        list=row[first + 3],
        address=row[first + 4],
        reason=row[first + 5],
        queue_id=row[first + 6],
        evidence=row[first + 7],
        key=row[first + 8],
        count=row[first + 9],
        last_seen=_opt_time(row[first + 10]),
    )


def sent_row(r: SentRecord) -> tuple[Any, ...]:
    """The values of ``SENT_COLUMNS`` for ``r``; the first two are its key."""
    return (r.queue_id, r.index, r.account, r.list or "", r.address, micros(r.sent_at))


def sent_record(row: Row) -> SentRecord:
    """A ledger record from a row of ``SENT_COLUMNS``."""
    qid, idx, account, lname, address, at = row
    return SentRecord(qid, idx, account, lname or None, address, from_micros(at))


# --- consent -------------------------------------------------------------------------------------------


def consent_row(r: ConsentRecord) -> tuple[Any, ...]:
    """The values of ``CONSENT_COLUMNS`` for ``r``; the first three are its key."""
    return (r.account, r.list, r.address, micros(r.confirmed_at), r.ip, r.user_agent, r.source, r.evidence)


def consent(row: Row) -> ConsentRecord:
    """A consent record from a row of ``CONSENT_COLUMNS``."""
    return ConsentRecord(
        account=row[0],
        list=row[1],
        address=row[2],
        confirmed_at=from_micros(row[3]),
        ip=row[4],
        user_agent=row[5],
        source=row[6],
        evidence=row[7],
    )


# --- MTA-STS policies, TLS report counts ---------------------------------------------------------------


def mta_sts_row(r: MtaStsRecord) -> tuple[Any, ...]:
    """The values of ``MTA_STS_COLUMNS`` for ``r`` (the MX patterns one per line)."""
    return (
        r.domain,
        r.policy_id,
        r.mode,
        "\n".join(r.mx),
        r.max_age,
        micros(r.fetched_at),
        micros(r.expires_at),
    )


def mta_sts_record(domain: str, row: Sequence[Any]) -> MtaStsRecord:
    """The policy of ``domain`` from a row of ``policy_id, mode, mx, max_age, fetched_at``."""
    policy_id, mode, mx, max_age, fetched_at = row
    patterns = tuple(str(mx).split("\n")) if mx else ()
    return MtaStsRecord(
        domain, str(policy_id), str(mode), patterns, int(max_age), from_micros(int(fetched_at))
    )


def tls_row(c: TlsSessionCount) -> tuple[Any, ...]:
    """The values of ``TLS_COLUMNS`` for ``c``; all but the last (``sessions``) are its key."""
    key = (c.domain, c.policy_type, c.policy, c.result_type, c.receiving_mx, c.receiving_ip)
    return (day_number(c.day), *key, c.sessions)


def tls_count(row: Sequence[Any]) -> TlsSessionCount:
    """A count from a row of ``TLS_COLUMNS``."""
    day, *text, sessions = row
    domain, ptype, policy, result, mx, ip = (str(t) for t in text)
    return TlsSessionCount(_day(day), domain, ptype, policy, result, mx, ip, int(sessions))


# --- the postmaster's inbox, DMARC counts --------------------------------------------------------------


def inbox_row(item: InboxItem, raw: bytes) -> tuple[Any, ...]:
    """The values of ``INBOX_COLUMNS`` for ``item``."""
    return (
        micros(item.received_at),
        item.kind,
        item.source,
        item.mail_from,
        item.from_header,
        item.subject,
        item.date_header,
        item.note,
        item.size,
        item.truncated,
        item.state,
        None if item.done_at is None else micros(item.done_at),
        raw,
    )


def inbox_item(row: Sequence[Any], raw: bytes | None = None) -> InboxItem:
    """An item from the values of ``INBOX_LIST_COLUMNS``."""
    ident, received, kind, source, mail_from, from_header, subject, date_header, note = row[:9]
    size, truncated, state, done_at = row[9:13]
    return InboxItem(
        id=int(ident),
        received_at=from_micros(int(received)),
        kind=str(kind),
        source=str(source),
        mail_from=str(mail_from),
        from_header=str(from_header),
        subject=str(subject),
        date_header=str(date_header),
        note=str(note),
        size=int(size),
        truncated=bool(truncated),
        state=str(state),
        done_at=None if done_at is None else from_micros(int(done_at)),
        raw=None if raw is None else bytes(raw),
    )


def dmarc_row(c: DmarcCount) -> tuple[Any, ...]:
    """The values of ``DMARC_COLUMNS`` for ``c``; the first five are its key, the rest are counts."""
    return (
        c.domain,
        day_number(c.day),
        c.org,
        c.report_id,
        c.source_ip,
        c.total,
        c.spf_pass,
        c.dkim_pass,
        c.spf_aligned,
        c.dkim_aligned,
        c.dmarc_pass,
        c.quarantined,
        c.rejected,
    )


def dmarc_count(row: Sequence[Any]) -> DmarcCount:
    """A count from the values of ``DMARC_COLUMNS``."""
    domain, day, org, report_id, source_ip, *numbers = row
    total, spf_pass, dkim_pass, spf_aligned, dkim_aligned, dmarc_pass, quarantined, rejected = (
        int(n) for n in numbers
    )
    return DmarcCount(
        str(domain),
        _day(day),
        str(org),
        str(report_id),
        str(source_ip),
        total,
        spf_pass,
        dkim_pass,
        spf_aligned,
        dkim_aligned,
        dmarc_pass,
        quarantined,
        rejected,
    )


# --- tenant API keys -----------------------------------------------------------------------------------


def api_key_row(key: ApiKey) -> tuple[Any, ...]:
    """The values of ``API_KEY_COLUMNS`` for ``key``."""
    revoked = None if key.revoked_at is None else micros(key.revoked_at)
    return (key.key_id, key.account, key.key_hash, key.name, micros(key.created_at), revoked)


def api_key(row: Sequence[Any]) -> ApiKey:
    """An :class:`ApiKey` from a row of ``API_KEY_COLUMNS``."""
    key_id, account, key_hash, name, created_at, revoked_at = row
    return ApiKey(
        key_id=str(key_id),
        account=str(account),
        key_hash=str(key_hash),
        name=str(name),
        created_at=from_micros(int(created_at)),
        revoked_at=None if revoked_at is None else from_micros(int(revoked_at)),
    )


def keep_broadest(found: dict[str, SuppressionEntry], rows: Iterable[Row]) -> None:
    """Add the entry of each row of ``ENTRY_COLUMNS`` to ``found`` (address to entry) unless an entry of a
    broader scope (:data:`~relayd.store.models.SCOPE_PRECEDENCE`) of its address is there already."""
    for row in rows:
        entry = suppression_entry(row)
        best = found.get(entry.address)
        if best is None or SCOPE_PRECEDENCE[entry.scope] < SCOPE_PRECEDENCE[best.scope]:
            found[entry.address] = entry
