"""``relayd store export|import``: every entry survives a move to another store (here SQLite -> SQLite;
the PostgreSQL contract suite covers that backend's side of the same protocol methods)."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from pathlib import Path

from relayd.store import Event, Reason, Scope, SentRecord, SqliteStore, SuppressionEntry, SuspendReason
from relayd.store.models import ConsentRecord
from relayd.store.transfer import export_store, import_store

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


async def test_export_then_import_keeps_everything(tmp_path: Path) -> None:
    src = SqliteStore(tmp_path / "a.db")
    dst = SqliteStore(tmp_path / "b.db")
    await src.open()
    await dst.open()
    try:
        entries = [
            SuppressionEntry(f"g{i}@example.test", Scope.GLOBAL, None, None, Reason.HARD_BOUNCE, "dsn", T0)
            for i in range(25_000)
        ]
        entries += [
            SuppressionEntry("c@example.test", Scope.ACCOUNT, "acme", None, Reason.COMPLAINT, "arf", T0),
            SuppressionEntry(
                "u@example.test",
                Scope.LIST,
                "acme",
                "news",
                Reason.UNSUBSCRIBE,
                "web",
                T0,
                T0 + timedelta(days=30),
            ),
        ]
        await src.add(entries)
        await src.suspend("acme", SuspendReason.COMPLAINT_RATE, '{"rate": 0.3}', at=T0)
        await src.record_events([Event(T0, "complaint", "acme", None, "c@example.test", "abuse", "q1", "{}")])
        await src.record_sent([SentRecord("qqqqqqqqqqqqqqqq", 0, "acme", "news", "u@example.test", T0)])
        await src.add_consent(
            [ConsentRecord("acme", "news", "u@example.test", T0, "192.0.2.1", "Firefox", "double-opt-in")]
        )
        buf = io.StringIO()
        out = await export_store(src, buf)
        assert out.counts == {"suppression": 25_002, "account_state": 1, "event": 1, "sent": 1, "consent": 1}
        lines = buf.getvalue().splitlines()
        lines.insert(3, '{"type": "suppression", "address": "broken"}')  # a bad line is reported, not fatal
        result = await import_store(dst, lines)
        assert [n for n, _ in result.errors] == [4]
        assert result.counts == out.counts
        assert await dst.count() == 25_002
        got = await dst.list_entries(address="u@example.test", include_expired=True)
        assert got == await src.list_entries(address="u@example.test", include_expired=True)
        state = await dst.get_account_state("acme")
        assert state is not None and state.suspended and state.reason is SuspendReason.COMPLAINT_RATE
        assert await dst.lookup_sent("qqqqqqqqqqqqqqqq", 0) == SentRecord(
            "qqqqqqqqqqqqqqqq", 0, "acme", "news", "u@example.test", T0
        )
        assert [e.kind for e in await dst.events(T0 - timedelta(days=1))] == ["complaint"]
        assert await dst.get_consent("acme", "news", "u@example.test") is not None
    finally:
        await src.close()
        await dst.close()
