"""Rows of the postmaster's inbox and the DMARC counts (migration 8), shared by both backends.

Why a module of its own: the columns and the conversions between rows and
:class:`~relayd.store.base.InboxItem` / :class:`~relayd.store.base.DmarcCount` are the same for SQLite and
PostgreSQL; only placeholders (``?`` against ``$1``) and the boolean column differ, and those stay in the
backends.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final

from .base import DmarcCount, InboxItem, as_utc

__all__ = [
    "DMARC_COLUMNS",
    "INBOX_COLUMNS",
    "INBOX_LIST_COLUMNS",
    "day_number",
    "dmarc_count",
    "dmarc_row",
    "inbox_item",
    "inbox_row",
    "micros",
]

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_DAY: Final = date(1970, 1, 1)
_US: Final = timedelta(microseconds=1)

#: Columns written for an item (the id is the database's).
INBOX_COLUMNS: Final = (
    "received_at, kind, source, mail_from, from_header, subject, date_header, note, size, truncated,"
    " state, done_at, raw"
)
#: Columns a listing reads: all but the raw bytes.
INBOX_LIST_COLUMNS: Final = (
    "id, received_at, kind, source, mail_from, from_header, subject, date_header, note, size, truncated,"
    " state, done_at"
)
DMARC_COLUMNS: Final = (
    "domain, day, org, report_id, source_ip, total, spf_pass, dkim_pass, spf_aligned, dkim_aligned,"
    " dmarc_pass, quarantined, rejected"
)


def micros(value: datetime) -> int:
    """Microseconds since the epoch, as every table stores times."""
    return (as_utc(value) - _EPOCH) // _US


def _time(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=int(value))


def day_number(value: date) -> int:
    """Days since the epoch, as the DMARC tables store days."""
    return (value - _EPOCH_DAY).days


def inbox_row(item: InboxItem, raw: bytes) -> tuple[Any, ...]:
    """The values of :data:`INBOX_COLUMNS` for ``item``."""
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
    """An item from the values of :data:`INBOX_LIST_COLUMNS`."""
    ident, received, kind, source, mail_from, from_header, subject, date_header, note = row[:9]
    size, truncated, state, done_at = row[9:13]
    return InboxItem(
        id=int(ident),
        received_at=_time(received),
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
        done_at=None if done_at is None else _time(done_at),
        raw=None if raw is None else bytes(raw),
    )


def dmarc_row(c: DmarcCount) -> tuple[Any, ...]:
    """The values of :data:`DMARC_COLUMNS` for ``c``."""
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
    """A count from the values of :data:`DMARC_COLUMNS`."""
    domain, day, org, report_id, source_ip, *numbers = row
    total, spf_pass, dkim_pass, spf_aligned, dkim_aligned, dmarc_pass, quarantined, rejected = (
        int(n) for n in numbers
    )
    return DmarcCount(
        str(domain),
        _EPOCH_DAY + timedelta(days=int(day)),
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
