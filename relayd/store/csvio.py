"""CSV import and export of suppression entries (``relayd suppress import|export``).

Format, one entry per row, with this header (RFC 4180 quoting; UTF-8, a BOM is tolerated)::

    address,scope,account,list,reason,created_at,expires_at

Times are ISO 8601 (``2025-03-01T12:00:00Z``, ``2025-03-01 12:00:00+02:00``, ``2025-03-01``); a time
without an offset is UTC; an empty cell is null (``created_at`` then means "now", ``expires_at`` "never").
An optional eighth column ``source`` is accepted on import and written by ``export_csv(include_source=True)``;
without it imported entries get the source ``csv:<file name>``.

Why it is built this way: ESPs move suppression lists of millions of rows between systems, so

* a bad row never spoils the file: it is reported as ``(line number, message)`` and skipped; good rows are
  kept. Line numbers are physical lines (header = line 1), what an editor shows;
* addresses go through :func:`relayd.core.address.normalize`, so an imported ``Bob@Example.TEST`` blocks mail
  to ``bob@example.test``;
* rows are written in batches of ``batch_size`` per transaction through :meth:`SuppressionStore.add` (one
  sorted ``executemany`` each); parsing runs in a worker thread so the event loop stays responsive when the
  daemon itself imports. (Parsing the next batch while the store writes the last one was tried and gained
  nothing measurable: both halves are GIL-bound Python.) Measured by ``bench/suppression.py``.
* so the import is not atomic: a failure midway leaves the earlier batches imported; because ``add``
  upserts, running the same file again is harmless.

Formula injection (OWASP "CSV Injection"): exports are opened in spreadsheets, and a cell starting with
``=``, ``+``, ``-``, ``@``, tab or CR is read there as a formula; addresses, user agents and sources come
from outsiders (``=cmd|' /C calc'!A0@example.test`` is a valid address). Every exported cell that starts
with one of those (after any leading ``'``) gets one more leading ``'``, which spreadsheets show as text
(:func:`neutralize`). Every import takes one leading ``'`` off such a cell again (:func:`restore`), so an
export imports back exactly, ``-foo@example.test`` included. The price: a hand-written file whose cell
really starts with ``'=`` (or ``'-`` ...) must write ``''=``.
"""

from __future__ import annotations

import asyncio
import csv
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO, TypeVar

from relayd.core.address import AddressError, normalize

from .models import Reason, Scope, SuppressionEntry, as_utc, utcnow
from .protocols import SuppressionStore

__all__ = [
    "HEADER",
    "ImportResult",
    "RowError",
    "export_csv",
    "import_csv",
    "neutralize",
    "parse_row",
    "read_batch",
    "restore",
    "safe_rows",
]

HEADER: tuple[str, ...] = ("address", "scope", "account", "list", "reason", "created_at", "expires_at")
_HEADER_WITH_SOURCE = (*HEADER, "source")
_SCOPES = {s.value: s for s in Scope}
_REASONS = {r.value: r for r in Reason}
#: what makes a spreadsheet read a cell as a formula (OWASP CSV Injection)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def neutralize(cell: str) -> str:
    """The cell as exported: with one more leading ``'`` when it would start a formula (see the module
    docstring); :func:`restore` undoes it."""
    return "'" + cell if cell.lstrip("'").startswith(_FORMULA_START) else cell


def restore(cell: str) -> str:
    """An imported cell with the ``'`` that :func:`neutralize` added taken off again."""
    return cell[1:] if cell.startswith("'") and cell.lstrip("'").startswith(_FORMULA_START) else cell


def safe_rows(rows: Iterable[Iterable[str]]) -> list[list[str]]:
    """Rows ready for ``csv.writer``, every cell through :func:`neutralize`. Every CSV export uses this."""
    return [[neutralize(cell) for cell in row] for row in rows]


@dataclass(frozen=True, slots=True)
class ImportResult:
    """How many rows were imported, and each rejected row as (line number, what is wrong)."""

    imported: int
    errors: list[tuple[int, str]] = field(default_factory=list)


T = TypeVar("T")


class RowError(ValueError):
    """One CSV row is unusable; the message is reported with its line number and the row is skipped."""


def read_batch(
    reader: Any, errors: list[tuple[int, str]], size: int, parse: Callable[[list[str]], T]
) -> list[T]:
    """Up to ``size`` parsed rows from a ``csv.reader``. Malformed CSV and rows ``parse`` rejects with
    :class:`RowError` are recorded in ``errors`` as (line number, problem) and skipped; blank lines are
    skipped silently. Cells come through :func:`restore`. Shared by every CSV import (suppressions,
    consent) so they report and read alike."""
    batch: list[T] = []
    while len(batch) < size:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            errors.append((reader.line_num, f"malformed CSV: {exc}"))
            continue
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # blank line
        try:
            batch.append(parse([restore(cell) for cell in row]))
        except RowError as exc:
            errors.append((reader.line_num, str(exc)))
    return batch


def _parse_time(text: str, column: str) -> datetime:
    try:
        return as_utc(datetime.fromisoformat(text))
    except ValueError:
        raise RowError(f"{column}: not an ISO 8601 time: {text!r}") from None


def _parse_row(row: list[str], has_source: bool, default_source: str, now: datetime) -> SuppressionEntry:
    width = len(_HEADER_WITH_SOURCE) if has_source else len(HEADER)
    if len(row) != width:
        raise RowError(f"expected {width} fields, got {len(row)}")
    try:
        address = normalize(row[0])
    except AddressError as exc:
        raise RowError(f"address: {exc}") from None
    scope = _SCOPES.get(row[1].strip().lower())
    if scope is None:
        raise RowError(f"scope: {row[1]!r} is not one of {', '.join(_SCOPES)}")
    reason = _REASONS.get(row[4].strip().lower())
    if reason is None:
        raise RowError(f"reason: {row[4]!r} is not one of {', '.join(_REASONS)}")
    created = row[5].strip()
    expires = row[6].strip()
    source = (row[7].strip() if has_source else "") or default_source
    try:
        return SuppressionEntry(
            address=address,
            scope=scope,
            account=row[2].strip() or None,
            list=row[3].strip() or None,
            reason=reason,
            source=source,
            created_at=_parse_time(created, "created_at") if created else now,
            expires_at=_parse_time(expires, "expires_at") if expires else None,
        )
    except RowError:
        raise
    except ValueError as exc:  # scope/account/list inconsistency
        raise RowError(str(exc)) from None


def parse_row(row: list[str], *, has_source: bool, default_source: str, now: datetime) -> SuppressionEntry:
    """One data row (cells already through :func:`restore`) as an entry, or :class:`RowError`: for importers
    that read the rows themselves and check more (the tenant API keeps each row to the key's account)."""
    return _parse_row(row, has_source, default_source, now)


class _BatchParser:
    """Reads the next ``batch_size`` good rows; collects errors. Used from one thread at a time."""

    def __init__(self, stream: TextIO, default_source: str, now: datetime) -> None:
        self._reader = csv.reader(stream)
        self._default_source = default_source
        self._now = now
        self.errors: list[tuple[int, str]] = []
        self.has_source = False
        self.header_ok = self._read_header()

    def _read_header(self) -> bool:
        try:
            header = next(self._reader)
        except StopIteration:
            self.errors.append((1, "empty file: expected header " + ",".join(HEADER)))
            return False
        except csv.Error as exc:
            self.errors.append((1, f"header: {exc}"))
            return False
        names = tuple(h.strip().lower() for h in header)
        if names == HEADER:
            return True
        if names == _HEADER_WITH_SOURCE:
            self.has_source = True
            return True
        self.errors.append((1, "header must be " + ",".join(HEADER) + f" (optionally ,source); got {header}"))
        return False

    def next_batch(self, batch_size: int) -> list[SuppressionEntry]:
        return read_batch(
            self._reader,
            self.errors,
            batch_size,
            lambda row: _parse_row(row, self.has_source, self._default_source, self._now),
        )


async def import_csv(
    store: SuppressionStore,
    path: Path,
    *,
    source: str | None = None,
    batch_size: int = 100_000,
    now: datetime | None = None,
) -> ImportResult:
    """Import suppression entries from the CSV file at ``path``; see the module docstring.

    A wrong header imports nothing and is reported as an error on line 1. ``OSError`` (missing file) and
    ``UnicodeDecodeError`` (not UTF-8) propagate: they concern the whole file, not a row.
    :class:`relayd.store.StoreError` from the store propagates too, after the batches before it were kept.
    """
    default_source = source or f"csv:{Path(path).name}"
    imported = 0
    with open(path, encoding="utf-8-sig", newline="") as stream:
        parser = await asyncio.to_thread(_BatchParser, stream, default_source, as_utc(now or utcnow()))
        if not parser.header_ok:
            return ImportResult(0, parser.errors)
        while batch := await asyncio.to_thread(parser.next_batch, batch_size):
            imported += await store.add(batch)
    return ImportResult(imported, parser.errors)


def _format_time(value: datetime | None) -> str:
    return "" if value is None else value.isoformat().replace("+00:00", "Z")


async def export_csv(
    store: SuppressionStore,
    out: TextIO,
    *,
    include_source: bool = False,
    include_expired: bool = True,
    now: datetime | None = None,
    batch_size: int = 10_000,
) -> int:
    """Write every entry to ``out`` in the import format, streaming in key order; return the row count.

    Expired entries are written too unless ``include_expired=False`` (an export is a backup). ``out``
    should be opened with ``newline=""`` (the csv module writes ``\\r\\n`` itself).
    """
    writer = csv.writer(out)
    writer.writerow(_HEADER_WITH_SOURCE if include_source else HEADER)
    cutoff = as_utc(now or utcnow())
    written = 0
    async for batch in store.scan(batch_size=batch_size):
        rows = []
        for e in batch:
            if not include_expired and not e.is_active(cutoff):
                continue
            row = [
                e.address,
                e.scope.value,
                e.account or "",
                e.list or "",
                e.reason.value,
                _format_time(e.created_at),
                _format_time(e.expires_at),
            ]
            if include_source:
                row.append(e.source)
            rows.append(row)
        writer.writerows(safe_rows(rows))
        written += len(rows)
    return written
