"""relayd.store.rows and relayd.store.sql: what both backends share.

A value written as a row and read back is the same value (whatever driver hands the row back); the shared
statements differ between the backends only in their placeholders; and each backend class, made of one
part per concern, still has every method of :class:`relayd.store.protocols.Store` with its parameters.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest

from relayd.store import rows, sql
from relayd.store.models import (
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
    TlsSessionCount,
)
from relayd.store.postgresql import PostgresStore
from relayd.store.protocols import Store
from relayd.store.sqlite import SqliteStore

T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


def _qmark(_n: int) -> str:
    return "?"


def _dollar(n: int) -> str:
    return f"${n}"


def test_times_are_exact_microseconds_and_any_zone_is_utc() -> None:
    assert rows.micros(datetime(1970, 1, 1, tzinfo=UTC)) == 0
    assert rows.from_micros(rows.micros(T0)) == T0
    assert rows.from_micros(rows.micros(T0)).tzinfo is UTC
    east = T0.astimezone(timezone(timedelta(hours=2)))
    assert rows.micros(east) == rows.micros(T0)
    assert rows.micros(T0.replace(tzinfo=None)) == rows.micros(T0)  # naive is UTC, never local time
    assert rows.day_number(date(1970, 1, 2)) == 1


@pytest.mark.parametrize(
    "entry",
    [
        SuppressionEntry("a@example.test", Scope.GLOBAL, None, None, Reason.HARD_BOUNCE, "dsn", T0),
        SuppressionEntry("a@example.test", Scope.ACCOUNT, "acme", None, Reason.COMPLAINT, "arf", T0, T0),
        SuppressionEntry("a@example.test", Scope.LIST, "acme", "news", Reason.UNSUBSCRIBE, "web", T0),
    ],
    ids=["global", "account-expiring", "list"],
)
def test_suppression_entry_round_trip_stores_none_as_empty(entry: SuppressionEntry) -> None:
    row = rows.entry_row(entry)
    assert row[2] == (entry.account or "") and row[3] == (entry.list or "")
    assert rows.suppression_entry(row) == entry


def test_keep_broadest_prefers_global_over_account_over_list() -> None:
    glob = SuppressionEntry("a@x.test", Scope.GLOBAL, None, None, Reason.SPAMTRAP, "s", T0)
    acct = SuppressionEntry("a@x.test", Scope.ACCOUNT, "acme", None, Reason.COMPLAINT, "s", T0)
    lst = SuppressionEntry("b@x.test", Scope.LIST, "acme", "news", Reason.UNSUBSCRIBE, "s", T0)
    found: dict[str, SuppressionEntry] = {}
    rows.keep_broadest(found, [rows.entry_row(e) for e in (acct, lst, glob, acct)])
    assert found == {"a@x.test": glob, "b@x.test": lst}


def test_values_round_trip_through_their_rows() -> None:
    event = Event(T0, "complaint", "acme", "news", "a@x.test", "abuse", "q1", "{}", "k1", 3, T0)
    assert rows.event(rows.event_row(event)) == event
    assert rows.event((7, *rows.event_row(event)), 1) == event  # after an id column
    sent = SentRecord("q000000000000001", 2, "acme", None, "a@x.test", T0)
    assert rows.sent_row(sent)[3] == ""
    assert rows.sent_record(rows.sent_row(sent)) == sent
    consent = ConsentRecord("acme", "news", "a@x.test", T0, "192.0.2.1", None, "double-opt-in", '{"q": 1}')
    assert rows.consent(rows.consent_row(consent)) == consent
    policy = MtaStsRecord("example.com", "id1", "enforce", ("mx1.example.com", "*.example.net"), 86400, T0)
    assert rows.mta_sts_record("example.com", rows.mta_sts_row(policy)[1:6]) == policy
    tls = TlsSessionCount(date(2026, 3, 1), "example.com", "sts", "{}", "", "", "", 5)
    assert rows.tls_count(rows.tls_row(tls)) == tls
    dmarc = DmarcCount("example.com", date(2026, 3, 1), "org", "r1", "192.0.2.1", 9, 8, 7, 6, 5, 4, 3, 2)
    assert rows.dmarc_count(rows.dmarc_row(dmarc)) == dmarc
    key = ApiKey("k1", "acme", "ab" * 32, "ci", T0, T0 + timedelta(days=1))
    assert rows.api_key(rows.api_key_row(key)) == key


def test_inbox_item_round_trip_keeps_raw_bytes_apart() -> None:
    item = InboxItem(5, T0, "abuse", "192.0.2.1", "a@x.test", "A <a@x.test>", "hi", "Sun", "", 10, False)
    written = rows.inbox_row(item, b"raw")
    assert written[-1] == b"raw" and len(written) == len(sql.INBOX_COLUMNS.split(","))
    listed = (item.id, *written[:-1])  # INBOX_LIST_COLUMNS: the id, no raw bytes
    assert rows.inbox_item(listed) == item
    assert rows.inbox_item(listed, b"raw").raw == b"raw"


def test_argument_checks() -> None:
    assert rows.distinct(["b", "a", "b"]) == ["b", "a"]
    assert rows.cap_windows({604800: 3, 86400: 1}) == [86400, 604800]
    with pytest.raises(ValueError, match="positive seconds"):
        rows.cap_windows({0: 1})


def _statements(mark: Callable[[int], str]) -> list[str]:
    listing, _ = sql.suppression_list(
        mark,
        address="a",
        scope=Scope.LIST,
        account="acme",
        list_name="news",
        reason=Reason.UNSUBSCRIBE,
        not_expired_at_us=1,
        limit=10,
        offset=0,
    )
    removal, _ = sql.suppression_remove(mark, "a", None, "acme", "news")
    since, _ = sql.events_since(mark, 0, 10, "acme", "complaint")
    consent, _ = sql.consent_page(mark, account="acme", list_name=None, address="a", after=True)
    return [
        listing,
        removal,
        since,
        consent,
        sql.suppression_page(mark, first=False),
        sql.sent_page(mark),
        sql.mta_sts_upsert(mark),
        sql.api_key_insert(mark),
        sql.api_key_revoke(mark),
    ]


def test_shared_statements_differ_only_in_placeholders() -> None:
    for question, dollar in zip(_statements(_qmark), _statements(_dollar), strict=True):
        marks = re.findall(r"\$(\d+)", dollar)
        assert [int(n) for n in marks] == list(range(1, len(marks) + 1)), dollar  # numbered in order
        assert re.sub(r"\$\d+", "?", dollar) == question


def test_keep_reasons_is_empty_without_reasons() -> None:
    assert sql.keep_reasons(frozenset()) == ""
    kept = sql.keep_reasons(frozenset({Reason.UNSUBSCRIBE, Reason.COMPLAINT}))
    assert kept == " WHERE suppression.reason NOT IN ('complaint', 'unsubscribe')"


def _protocol_methods() -> dict[str, inspect.Signature]:
    methods: dict[str, inspect.Signature] = {}
    for proto in Store.__mro__:
        for name, value in vars(proto).items():
            if not name.startswith("_") and inspect.isfunction(value):
                methods.setdefault(name, inspect.signature(value))
    return methods


#: plain methods returning a future: begun before they return, so that the queue's write can follow the
#: ledger's without a turn of the loop (relayd.store.sqlitewriter, ``after``)
BEGUN_AT_ONCE = {"record_sent"}


@pytest.mark.parametrize("backend", [SqliteStore, PostgresStore], ids=["sqlite", "postgresql"])
def test_backend_has_every_store_method_with_its_parameters(backend: type[Any]) -> None:
    methods = _protocol_methods()
    assert "list_entries" in methods and "check" in methods
    for name, wanted in methods.items():
        got = inspect.signature(getattr(backend, name))
        assert list(got.parameters) == list(wanted.parameters), name
        method = getattr(backend, name)
        awaited = inspect.iscoroutinefunction(method) or inspect.isasyncgenfunction(method)
        assert awaited != (name in BEGUN_AT_ONCE), name
