"""CSV import/export of suppression entries: bad rows by line number, good rows kept, round trip."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from relayd.store import Reason, Scope, SqliteStore, Store, SuppressionEntry
from relayd.store.csvio import HEADER, ImportResult, export_csv, import_csv

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
HEAD = ",".join(HEADER)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = SqliteStore(tmp_path / "relayd.db")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def write(tmp_path: Path, text: str, name: str = "in.csv", encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


async def test_import_keeps_good_rows_and_reports_bad_ones_by_line(store: Store, tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "\n".join(
            [
                HEAD,
                "Alice@Example.TEST,global,,,hard_bounce,2025-01-02T03:04:05Z,",  # 2 ok, normalised
                "not-an-address,global,,,hard_bounce,,",  # 3 bad address
                "b@example.test,account,acme,,complaint,2025-01-02,2026-01-02T00:00:00+02:00",  # 4 ok
                "c@example.test,planet,,,manual,,",  # 5 bad scope
                "d@example.test,list,acme,news,unsubscribe,,",  # 6 ok
                "",  # 7 blank, skipped
                "e@example.test,list,acme,,unsubscribe,,",  # 8 list scope without list
                "f@example.test,global,,,bored,,",  # 9 bad reason
                "g@example.test,global,,,manual,yesterday,",  # 10 bad time
                "h@example.test,global,,,manual",  # 11 too few fields
                '"i@example.test",GLOBAL,,,MANUAL,,',  # 12 ok, quoted, upper-case enums
            ]
        )
        + "\n",
    )
    result = await import_csv(store, path, now=T0)
    assert result.imported == 4
    assert [line for line, _ in result.errors] == [3, 5, 8, 9, 10, 11]
    assert "address" in result.errors[0][1]
    assert "scope" in result.errors[1][1]
    assert "expires_at" not in result.errors[4][1] and "created_at" in result.errors[4][1]
    entries = {e.address: e for e in await store.list_entries(include_expired=True)}
    assert set(entries) == {"alice@example.test", "b@example.test", "d@example.test", "i@example.test"}
    alice = entries["alice@example.test"]
    assert alice.created_at == datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert alice.source == "csv:in.csv"
    b = entries["b@example.test"]
    assert b.scope is Scope.ACCOUNT and b.account == "acme" and b.reason is Reason.COMPLAINT
    assert b.created_at == datetime(2025, 1, 2, tzinfo=UTC)
    assert b.expires_at == datetime(2026, 1, 1, 22, 0, tzinfo=UTC)
    assert entries["d@example.test"].created_at == T0  # empty created_at = now
    assert entries["d@example.test"].list == "news"


async def test_multiline_field_reports_physical_line(store: Store, tmp_path: Path) -> None:
    path = write(
        tmp_path, f'{HEAD}\n"x\ny@example.test",global,,,manual,,\nz@example.test,global,,,manual,,\n'
    )
    result = await import_csv(store, path)
    assert result.imported == 1
    assert [line for line, _ in result.errors] == [3]


async def test_bad_header_imports_nothing(store: Store, tmp_path: Path) -> None:
    result = await import_csv(store, write(tmp_path, "email,reason\na@example.test,manual\n"))
    assert result == ImportResult(0, result.errors)
    assert [line for line, _ in result.errors] == [1]
    empty = await import_csv(store, write(tmp_path, "", name="empty.csv"))
    assert empty.imported == 0 and empty.errors[0][0] == 1
    assert await store.count() == 0


async def test_bom_and_source_column(store: Store, tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"\ufeff{HEAD},source\na@example.test,global,,,spamtrap,,,vendor-feed\nb@example.test,global,,,manual,,,\n",
    )
    result = await import_csv(store, path, source="migration-2025")
    assert result == ImportResult(2, [])
    sources = {e.address: e.source for e in await store.list_entries()}
    assert sources == {"a@example.test": "vendor-feed", "b@example.test": "migration-2025"}


async def test_large_import_in_batches_and_upsert_on_reimport(store: Store, tmp_path: Path) -> None:
    lines = [HEAD] + [f"u{i:05d}@example.test,global,,,hard_bounce,," for i in range(12_345)]
    lines[100] = "broken"
    path = write(tmp_path, "\n".join(lines) + "\n")
    result = await import_csv(store, path, batch_size=1000)
    assert result.imported == 12_344
    assert result.errors == [(101, "expected 7 fields, got 1")]
    again = await import_csv(store, path, batch_size=5000)
    assert again.imported == 12_344
    assert await store.count() == 12_344


async def test_export_round_trip(store: Store, tmp_path: Path) -> None:
    entries = [
        SuppressionEntry("a@example.test", Scope.GLOBAL, None, None, Reason.HARD_BOUNCE, "dsn", T0),
        SuppressionEntry(
            '"john, doe"@example.test', Scope.LIST, "acme", "news", Reason.UNSUBSCRIBE, "web", T0, T0
        ),
        SuppressionEntry(
            "c@example.test",
            Scope.ACCOUNT,
            "acme",
            None,
            Reason.COMPLAINT,
            "arf",
            T0 + timedelta(microseconds=5),
            T0 + timedelta(days=3),
        ),
    ]
    await store.add(entries)
    buf = io.StringIO(newline="")
    assert await export_csv(store, buf, include_source=True, batch_size=2) == 3
    text = buf.getvalue()
    assert text.splitlines()[0] == HEAD + ",source"
    assert "2025-03-01T12:00:00Z" in text

    other = SqliteStore(tmp_path / "other.db")
    await other.open()
    try:
        result = await import_csv(other, write(tmp_path, text, name="export.csv"))
        assert result == ImportResult(3, [])
        exported = await store.list_entries(include_expired=True)
        assert await other.list_entries(include_expired=True) == exported
    finally:
        await other.close()

    active_only = io.StringIO(newline="")
    assert await export_csv(store, active_only, include_expired=False, now=T0) == 2
    assert active_only.getvalue().splitlines()[0] == HEAD
