"""``relayd consent import FILE.csv | export [FILE.csv] | show ADDRESS``: consent records for operators.

Why these three: an ESP moving to relayd brings the consents its old system collected (import), has to hand
them over when asked (export, a backup too), and must be able to prove, for one address, when and from where
it asked for mail (show; ``--json`` is the evidence to send to a mailbox provider or a data-protection
authority, seeds/004).

CSV format, one record per row, RFC 4180 quoting, UTF-8 (a BOM is tolerated), a header naming the columns in
any order::

    account,list,address,confirmed_at,ip,user_agent,source,evidence

``account``, ``list``, ``address``, ``confirmed_at`` and ``ip`` are required: a consent without the date, time
and IP of the sign-up is no proof (seeds/003, seeds/004). ``confirmed_at`` is ISO 8601 (no offset: UTC) and
not in the future; ``ip`` an IPv4 or IPv6 address; ``user_agent`` may be empty; ``source`` defaults to
``csv:<file name>``; ``evidence`` is a JSON object, and any other text is kept as ``{"text": ...}``.
Export writes every column, so export then import gives the same records (cells that a spreadsheet would
read as a formula are exported with a leading ``'`` that import takes off again: relayd.store.csvio).

Like ``relayd suppress import``: a bad row never spoils the file; it is reported as ``FILE:LINE: problem``
(physical lines, header = line 1) and skipped, good rows are kept (exit 1 when any row was rejected). Rows are
written in batches (one transaction each) and upserted, so running the same file again is harmless.

Wiring: relayd.cli.main calls :func:`register` with its sub-parsers; :func:`run` is the command.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import ipaddress
import json
import sys
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TextIO

from relayd import config as config_mod
from relayd.cli.common import command, group, load_config, report_import, run_on_store, write_export
from relayd.core.address import AddressError, normalize
from relayd.mail.listid import list_name
from relayd.store.csvio import RowError, read_batch, safe_rows
from relayd.store.models import ConsentRecord, as_utc, utcnow
from relayd.store.protocols import ConsentStore, Store

__all__ = [
    "COLUMNS",
    "ImportResult",
    "export_consents",
    "import_consents",
    "register",
    "run",
]

#: Every column, in the order export writes them.
COLUMNS: tuple[str, ...] = (
    "account",
    "list",
    "address",
    "confirmed_at",
    "ip",
    "user_agent",
    "source",
    "evidence",
)
_REQUIRED = frozenset({"account", "list", "address", "confirmed_at", "ip"})
_UA_MAX = 256


@dataclass(frozen=True, slots=True)
class ImportResult:
    """How many rows were imported, and each rejected row as (line number, what is wrong)."""

    imported: int
    errors: list[tuple[int, str]] = field(default_factory=list)


def _evidence(text: str) -> str:
    """A JSON object text: the cell itself when it is one, else ``{"text": cell}``; empty -> ``{}``."""
    text = text.strip()
    if not text:
        return "{}"
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return json.dumps({"text": text})


class _Parser:
    """Reads good rows in batches and collects the errors of bad ones (one thread at a time)."""

    def __init__(
        self, stream: TextIO, default_source: str, now: datetime, accounts: Collection[str] | None
    ) -> None:
        self._reader = csv.reader(stream)
        self._default_source = default_source
        self._now = now
        self._accounts = accounts
        self.errors: list[tuple[int, str]] = []
        self._index: dict[str, int] = {}
        self.header_ok = self._read_header()

    def _read_header(self) -> bool:
        try:
            header = next(self._reader)
        except StopIteration:
            self.errors.append((1, "empty file: expected a header with " + ",".join(COLUMNS)))
            return False
        except csv.Error as exc:
            self.errors.append((1, f"header: {exc}"))
            return False
        names = [h.strip().lower() for h in header]
        unknown = [n for n in names if n not in COLUMNS]
        missing = sorted(_REQUIRED - set(names))
        twice = sorted({n for n in names if names.count(n) > 1})
        if unknown or missing or twice:
            problems = []
            if unknown:
                problems.append(f"unknown column(s) {', '.join(unknown)}")
            if missing:
                problems.append(f"missing column(s) {', '.join(missing)}")
            if twice:
                problems.append(f"repeated column(s) {', '.join(twice)}")
            self.errors.append((1, "header: " + "; ".join(problems) + f" (columns: {','.join(COLUMNS)})"))
            return False
        self._index = {n: i for i, n in enumerate(names)}
        return True

    def _cell(self, row: list[str], name: str) -> str:
        i = self._index.get(name)
        return row[i].strip() if i is not None else ""

    def _record(self, row: list[str]) -> ConsentRecord:
        if len(row) != len(self._index):
            raise RowError(f"expected {len(self._index)} fields, got {len(row)}")
        for name in sorted(_REQUIRED):
            if not self._cell(row, name):
                raise RowError(f"{name}: required")
        try:
            address = normalize(self._cell(row, "address"))
        except AddressError as exc:
            raise RowError(f"address: {exc}") from None
        account = self._cell(row, "account")
        if self._accounts is not None and account not in self._accounts:
            raise RowError(f"account: {account!r} is not configured")
        lname = self._cell(row, "list")
        if list_name(lname) != lname.lower() or "." in lname:
            raise RowError(f"list: {lname!r} is not a list name (letters, digits, '_', '-')")
        text = self._cell(row, "confirmed_at")
        try:
            confirmed = as_utc(datetime.fromisoformat(text))
        except ValueError:
            raise RowError(f"confirmed_at: not an ISO 8601 time: {text!r}") from None
        if confirmed > self._now:
            raise RowError(f"confirmed_at: {text!r} is in the future")
        try:
            ip = str(ipaddress.ip_address(self._cell(row, "ip")))
        except ValueError:
            raise RowError(f"ip: {self._cell(row, 'ip')!r} is not an IP address") from None
        return ConsentRecord(
            account=account,
            list=lname.lower(),
            address=address,
            confirmed_at=confirmed,
            ip=ip,
            user_agent=self._cell(row, "user_agent")[:_UA_MAX] or None,
            source=self._cell(row, "source") or self._default_source,
            evidence=_evidence(self._cell(row, "evidence")),
        )

    def next_batch(self, size: int) -> list[ConsentRecord]:
        return read_batch(self._reader, self.errors, size, self._record)


async def import_consents(
    store: ConsentStore,
    path: Path,
    *,
    accounts: Collection[str] | None = None,
    source: str | None = None,
    now: datetime | None = None,
    batch_size: int = 10_000,
) -> ImportResult:
    """Import consent records from the CSV file at ``path`` (see the module docstring).

    ``accounts``, when given, are the configured accounts: a row for another is rejected. A bad header
    imports nothing (an error on line 1). ``OSError`` and ``UnicodeDecodeError`` concern the whole file and
    propagate; so does :class:`~relayd.store.models.StoreError`, after the batches before it were kept.
    """
    default_source = source or f"csv:{Path(path).name}"
    imported = 0
    with open(path, encoding="utf-8-sig", newline="") as stream:
        parser = await asyncio.to_thread(_Parser, stream, default_source, as_utc(now or utcnow()), accounts)
        if not parser.header_ok:
            return ImportResult(0, parser.errors)
        while batch := await asyncio.to_thread(parser.next_batch, batch_size):
            imported += await store.add_consent(batch)
    return ImportResult(imported, parser.errors)


def _time(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


async def export_consents(
    store: ConsentStore,
    out: TextIO,
    *,
    account: str | None = None,
    list_name: str | None = None,
    address: str | None = None,
) -> int:
    """Write the matching records to ``out`` in the import format (every column); return the row count.

    ``out`` should be opened with ``newline=""`` (the csv module writes ``\\r\\n`` itself)."""
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    written = 0
    async for batch in store.consents(account=account, list_name=list_name, address=address):
        writer.writerows(
            safe_rows(  # formula injection: relayd.store.csvio
                [
                    r.account,
                    r.list,
                    r.address,
                    _time(r.confirmed_at),
                    r.ip,
                    r.user_agent or "",
                    r.source,
                    r.evidence,
                ]
                for r in batch
            )
        )
        written += len(batch)
    return written


# --- command line --------------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``consent import|export|show`` to ``relayd``'s sub-parsers; each sets ``fn=run``."""
    actions = group(
        sub,
        "consent",
        help="consent records (double opt-in proof): import, export, show",
        epilog="example: relayd consent show jane@example.test --json --config relayd.toml",
    )
    sp = command(
        actions, "import", run, help=f"import a CSV ({','.join(COLUMNS)}); bad rows are reported and skipped"
    )
    sp.add_argument("file", type=Path)
    sp = command(actions, "export", run, help="export consent records as CSV (to FILE or stdout)")
    sp.add_argument("file", nargs="?", type=Path)
    sp.add_argument("--account")
    sp.add_argument("--list")
    sp = command(actions, "show", run, help="the consent records of one address: when, from which IP, how")
    sp.add_argument("address")
    sp.add_argument("--account")
    sp.add_argument("--list")
    sp.add_argument("--json", action="store_true", help="one JSON object per record and line")


def run(args: argparse.Namespace) -> int:
    """``relayd consent ...``: 0 ok, 1 rows rejected or a runtime failure, 2 usage or config error.

    Raises :class:`~relayd.core.errors.ConfigError` for a bad config (``relayd.cli.main.main`` prints it)."""
    cfg = load_config(args)
    return run_on_store(cfg, lambda store: _main(args, cfg, store))


async def _main(args: argparse.Namespace, cfg: config_mod.Config, store: Store) -> int:
    if args.action == "import":
        try:
            result = await import_consents(store, args.file, accounts=set(cfg.accounts))
        except (OSError, UnicodeDecodeError) as exc:
            print(f"relayd consent import: {args.file}: cannot read: {exc}", file=sys.stderr)
            return 1
        return report_import(args.file, result.imported, result.errors)
    if args.action == "export":
        await write_export(
            args.file, lambda out: export_consents(store, out, account=args.account, list_name=args.list)
        )
        return 0
    if args.action == "show":
        try:
            address = normalize(args.address)
        except AddressError as exc:
            print(f"relayd consent show: {exc}", file=sys.stderr)
            return 2
        found = 0
        async for batch in store.consents(account=args.account, list_name=args.list, address=address):
            for r in batch:
                found += 1
                if args.json:
                    print(json.dumps(r.as_json(), sort_keys=True))
                else:
                    print(
                        f"{r.account:<12} {r.list:<12} {r.address}  confirmed {_time(r.confirmed_at)}"
                        f" from {r.ip or '-'} ({r.source}) {r.user_agent or ''}".rstrip()
                    )
        if not found:
            print(f"no consent on file for {address}", file=sys.stderr)
        return 0
    return 2
