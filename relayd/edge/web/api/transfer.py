"""``/api/v1/suppressions/import`` and ``/export``: the account's suppressions as CSV, in the format of
``relayd suppress import`` (relayd.store.csvio)."""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import io
import logging
from datetime import datetime
from typing import Final

from aiohttp import web

from relayd.edge.web.api.context import API, KEY, PREFIX, ApiError, Route, api_event, json_response
from relayd.edge.web.api.inputs import PROTECTED, TENANT_REASONS, read_body
from relayd.store import csvio
from relayd.store.models import Scope, SuppressionEntry, as_utc, utcnow

log = logging.getLogger(__name__)

IMPORT_MAX_BODY: Final = 10 * 1024 * 1024

_IMPORT_BATCH: Final = 10_000
_ERRORS_SHOWN: Final = 100  # rejected import rows listed in the answer (all are counted)


def _csv_time(value: datetime | None) -> str:
    return "" if value is None else as_utc(value).isoformat().replace("+00:00", "Z")


async def _export(request: web.Request) -> web.StreamResponse:
    """The account's entries (expired ones too: an export is a backup) in the import format, streamed,
    every cell through the formula neutralising of relayd.store.csvio."""
    key, store = request[KEY], request.app[API].store
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/csv; charset=utf-8",
            "Content-Disposition": f'attachment; filename="suppressions-{key.account}.csv"',
        }
    )
    await resp.prepare(request)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(csvio.HEADER)
    offset = 0
    while True:
        batch = await store.list_entries(account=key.account, include_expired=True, limit=5000, offset=offset)
        rows = [
            [
                e.address,
                e.scope.value,
                e.account or "",
                e.list or "",
                e.reason.value,
                _csv_time(e.created_at),
                _csv_time(e.expires_at),
            ]
            for e in batch
        ]
        writer.writerows(csvio.safe_rows(rows))
        await resp.write(buf.getvalue().encode())
        buf.seek(0)
        buf.truncate()
        if len(batch) < 5000:
            break
        offset += len(batch)
    await resp.write_eof()
    return resp


def _parse_import(
    text: str, account: str, source: str, now: datetime
) -> tuple[list[SuppressionEntry], list[tuple[int, str]]]:
    """Rows of a tenant's CSV as entries of its account (run in a thread). The account column may be
    empty (the key's account) or name the key's account; global rows and other accounts are rejected."""
    reader = csv.reader(io.StringIO(text, newline=""))
    errors: list[tuple[int, str]] = []
    try:
        header = next(reader)
    except StopIteration:
        raise ApiError(400, "empty file: expected the header " + ",".join(csvio.HEADER)) from None
    except csv.Error as exc:
        raise ApiError(400, f"header: {exc}") from None
    names = tuple(h.strip().lower() for h in header)
    if names not in (csvio.HEADER, (*csvio.HEADER, "source")):
        raise ApiError(400, "header must be " + ",".join(csvio.HEADER))
    has_source = len(names) > len(csvio.HEADER)

    def parse(row: list[str]) -> SuppressionEntry:
        if len(row) > 2:
            if row[1].strip().lower() == Scope.GLOBAL.value:
                raise csvio.RowError("scope: global entries are the operator's (use account or list)")
            if row[2].strip() not in ("", account):
                raise csvio.RowError("account: must be empty or this key's account")
            row = [row[0], row[1], account, *row[3:]]
        entry = csvio.parse_row(row, has_source=has_source, default_source=source, now=now)
        if entry.reason not in TENANT_REASONS:
            allowed = ", ".join(sorted(r.value for r in TENANT_REASONS))
            raise csvio.RowError(f"reason: one of {allowed} (the others are recorded by relayd)")
        return dataclasses.replace(entry, source=source)

    entries: list[SuppressionEntry] = []
    while batch := csvio.read_batch(reader, errors, _IMPORT_BATCH, parse):
        entries.extend(batch)
    return entries, errors


async def _import(request: web.Request) -> web.Response:
    key, store = request[KEY], request.app[API].store
    raw = await read_body(request, IMPORT_MAX_BODY)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ApiError(400, "the CSV must be UTF-8") from None
    now = utcnow()
    entries, errors = await asyncio.to_thread(_parse_import, text, key.account, f"api:{key.key_id}", now)
    imported = 0
    for start in range(0, len(entries), _IMPORT_BATCH):
        # an entry relayd recorded (a complaint...) under the same key is kept as it is
        imported += await store.add(entries[start : start + _IMPORT_BATCH], keep=PROTECTED)
    evidence = {"imported": imported, "rejected": len(errors)}
    await store.record_event(api_event(key, "api_import", now, evidence))
    log.info(
        "api: key %s imported %d suppression(s) for %s, %d row(s) rejected",
        key.key_id,
        imported,
        key.account,
        len(errors),
    )
    shown = [{"line": line, "error": problem} for line, problem in errors[:_ERRORS_SHOWN]]
    return json_response({"imported": imported, "rejected": len(errors), "errors": shown})


#: (method, path, handler) of this resource, in the order of the package docstring
ROUTES: Final[tuple[Route, ...]] = (
    ("POST", f"{PREFIX}/suppressions/import", _import),
    ("GET", f"{PREFIX}/suppressions/export", _export),
)
