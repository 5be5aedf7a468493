"""Unit tests of the edge layer's pure pieces: the submission outcome and its metric labels, the tenant
API's request validation and JSON shapes, its route table, and the listeners' shared bind."""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from relayd.core import metrics
from relayd.edge.smtp.accept import SubmissionOutcome
from relayd.edge.smtp.protocol import listen
from relayd.edge.web import api
from relayd.edge.web.api.auth import redact
from relayd.edge.web.api.context import ApiError
from relayd.edge.web.api.inputs import PROTECTED, TENANT_REASONS, expiry, instant, list_name, tenant_reason
from relayd.edge.web.api.suppressions import entry_json
from relayd.edge.web.openapi import document
from relayd.store.models import Reason, Scope, SuppressionEntry
from tests import test_inbound
from tests.test_inbound import Live

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)

# --- the submission outcome -------------------------------------------------------------------------------

#: every outcome and the (outcome, reason) labels of relayd_submissions_total it counts under: the values
#: dashboards and alerts (SECURITY.md: deferred/storage) already select on
LABELS = {
    SubmissionOutcome.ACCEPTED: ("accepted", "ok"),
    SubmissionOutcome.REFUSED_MIME: ("refused", "mime"),
    SubmissionOutcome.REFUSED_CONTENT: ("refused", "content"),
    SubmissionOutcome.REFUSED_DROPPED: ("refused", "policy"),
    SubmissionOutcome.DEFERRED_POLICY_STORE: ("deferred", "policy_store"),
    SubmissionOutcome.DEFERRED_CAP: ("deferred", "cap_contended"),
    SubmissionOutcome.DEFERRED_STORAGE: ("deferred", "storage"),
}


@pytest.mark.parametrize("outcome", list(SubmissionOutcome), ids=lambda o: o.name.lower())
def test_each_outcome_counts_under_its_labels(outcome: SubmissionOutcome) -> None:
    assert outcome.labels == LABELS[outcome]


def test_every_outcome_has_its_row_and_distinct_labels() -> None:
    assert set(LABELS) == set(SubmissionOutcome)
    assert len({o.labels for o in SubmissionOutcome}) == len(SubmissionOutcome)
    assert {o.labels[0] for o in SubmissionOutcome} == {"accepted", "refused", "deferred"}


# --- tenant API: request validation ----------------------------------------------------------------------


def _raises(fn: Callable[..., object], *args: object) -> ApiError:
    """The ApiError ``fn(*args)`` raises (the test fails when it returns)."""
    with pytest.raises(ApiError) as info:
        fn(*args)
    return info.value


@pytest.mark.parametrize("value", ["news", "News", "a_b-c", "x" * 63])
def test_list_name_takes_a_label_in_lower_case(value: str) -> None:
    assert list_name(value) == value.lower()


@pytest.mark.parametrize("value", ["", "a.b", "a b", "x" * 64, 7, None, ["news"]], ids=repr)
def test_list_name_refuses_anything_else_naming_the_field(value: object) -> None:
    err = _raises(list_name, value, "filter")
    assert err.status == 400
    assert err.message.startswith("filter: not a list name")


def test_tenant_reason_takes_only_what_a_tenant_may_give() -> None:
    assert tenant_reason("manual") is Reason.MANUAL
    assert tenant_reason("unsubscribe") is Reason.UNSUBSCRIBE
    for value in ["complaint", "spamtrap", "hard_bounce", "discard", "", "MANUAL", 1, None]:
        err = _raises(tenant_reason, value)
        assert (err.status, err.message) == (400, "reason: one of manual, unsubscribe")


def test_protected_reasons_are_all_the_others() -> None:
    assert frozenset(Reason) == PROTECTED | TENANT_REASONS
    assert not PROTECTED & TENANT_REASONS
    assert Reason.COMPLAINT in PROTECTED


def test_instant_reads_iso_8601_as_utc() -> None:
    assert instant("2026-12-07T12:00:00Z", "since") == NOW
    assert instant("2026-12-07T13:00:00+01:00", "since") == NOW
    assert _raises(instant, 20261207, "since").message == "since: an ISO 8601 time"
    assert _raises(instant, "yesterday", "since").message == "since: not an ISO 8601 time: 'yesterday'"


def test_expiry_is_none_a_lifetime_or_a_future_time() -> None:
    assert expiry(None, NOW) is None
    assert expiry("30d", NOW) == NOW + timedelta(days=30)
    assert expiry("90m", NOW) == NOW + timedelta(minutes=90)
    assert expiry("2027-01-01T00:00:00Z", NOW) == datetime(2027, 1, 1, tzinfo=UTC)
    assert _raises(expiry, "2026-12-07T11:59:59Z", NOW).message == "expires: in the past"
    assert _raises(expiry, "soon", NOW).status == 400
    assert _raises(expiry, 30, NOW).message == "expires: an ISO 8601 time"


# --- tenant API: what a tenant is shown -------------------------------------------------------------------


def test_a_global_entry_shows_nothing_but_its_existence() -> None:
    entry = SuppressionEntry(
        address="a@example.test",
        scope=Scope.GLOBAL,
        account=None,
        list=None,
        reason=Reason.COMPLAINT,
        source="fbl:other-tenant",
        created_at=NOW,
    )
    assert entry_json(entry) == {"scope": "global", "status": "suppressed (global)"}


def test_an_own_entry_shows_everything() -> None:
    entry = SuppressionEntry(
        address="a@example.test",
        scope=Scope.LIST,
        account="acme",
        list="news",
        reason=Reason.MANUAL,
        source="api:k1",
        created_at=NOW,
        expires_at=NOW + timedelta(days=1),
    )
    assert entry_json(entry) == {
        "scope": "list",
        "list": "news",
        "reason": "manual",
        "source": "api:k1",
        "created_at": "2026-12-07T12:00:00Z",
        "expires_at": "2026-12-08T12:00:00Z",
        "status": "suppressed (manual)",
    }


def test_redact_masks_an_address_at_the_end_of_a_path_only() -> None:
    assert redact("/api/v1/suppressions/jane.doe@example.test") == "/api/v1/suppressions/j***@example.test"
    assert redact("/api/v1/messages/ABC123") == "/api/v1/messages/ABC123"
    assert len(redact("/api/v1/" + "x" * 1000)) == 400


# --- tenant API: the route table ------------------------------------------------------------------------


def test_the_route_table_is_the_contract_in_its_order() -> None:
    assert [(m, p) for m, p, _ in api.ROUTES] == [
        ("GET", "/api/v1/suppressions/{address}"),
        ("PUT", "/api/v1/suppressions/{address}"),
        ("DELETE", "/api/v1/suppressions/{address}"),
        ("GET", "/api/v1/suppressions"),
        ("POST", "/api/v1/suppressions/import"),
        ("GET", "/api/v1/suppressions/export"),
        ("GET", "/api/v1/events"),
        ("GET", "/api/v1/consent/{address}"),
        ("PUT", "/api/v1/consent/{address}"),
        ("GET", "/api/v1/stats"),
        ("GET", "/api/v1/messages/{queue_id}"),
        ("GET", "/api/v1/openapi.json"),
    ]
    assert len({h for _, _, h in api.ROUTES}) == len(api.ROUTES)


def test_every_route_is_in_the_openapi_document_and_nothing_else() -> None:
    paths = document("https://relay.example.test")["paths"]
    described = {(m.upper(), p) for p, ops in paths.items() for m in ops if m != "parameters"}
    assert described == {(m, p) for m, p, _ in api.ROUTES}


# --- the listeners' bind ---------------------------------------------------------------------------------


class _Greeter(asyncio.Protocol):
    def __init__(self, host: str) -> None:
        self.host = host

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(f"220 {self.host}\r\n".encode())
        transport.close()


async def test_listen_binds_every_address_with_the_factory_for_its_host() -> None:
    asked: list[str] = []

    def factory_for(host: str) -> Callable[[], asyncio.BaseProtocol]:
        asked.append(host)
        return lambda: _Greeter(host)

    servers = await listen(["127.0.0.1:0", "127.0.0.2:0"], factory_for, reuse_port=False)
    try:
        assert asked == ["127.0.0.1", "127.0.0.2"]
        for server, host in zip(servers, asked, strict=True):
            bound_host, port = server.sockets[0].getsockname()[:2]
            assert bound_host == host
            reader, writer = await asyncio.open_connection(host, port)
            assert await reader.readline() == f"220 {host}\r\n".encode()
            writer.close()
            await writer.wait_closed()
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()


async def test_listen_raises_oserror_for_an_address_it_cannot_bind() -> None:
    with pytest.raises(OSError):
        await listen(["192.0.2.1:0"], lambda _host: asyncio.Protocol, reuse_port=False)


# --- the submission outcome, made with its reply ----------------------------------------------------------

#: the in-process submission listener (with its policy, store and queue) of the inbound tests
live = test_inbound.live


def _counted(outcome: SubmissionOutcome) -> float:
    label, reason = outcome.labels
    value = metrics.REGISTRY.get_sample_value(
        "relayd_submissions_total", {"outcome": label, "reason": reason}
    )
    return value or 0.0


async def _data_reply(live: Live, author: str) -> tuple[int, bytes]:
    """One message from account acme (network-mapped) with header ``From: author``; the DATA reply."""

    def run() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", live.submission_port, timeout=30) as s:
            s.ehlo("app.acme.example.test")
            s.mail("news@acme.example.test")
            code, msg = s.rcpt("reader@example.net")
            assert code == 250, msg
            body = (
                b"From: " + author.encode() + b"\r\nTo: reader@example.net\r\n"
                b"Subject: news\r\nList-Id: <news.acme.example.test>\r\n\r\nHello\r\n"
            )
            return s.data(body)

    return await asyncio.to_thread(run)


@pytest.mark.parametrize(
    ("author", "code", "outcome"),
    [
        ("News <news@acme.example.test>", 250, SubmissionOutcome.ACCEPTED),
        ("News <news@elsewhere.example.test>", 550, SubmissionOutcome.REFUSED_CONTENT),
        # the reply quotes the sender's own text: it must not choose the label (a reply that said
        # "dropped by policy" was once counted as every recipient dropped)
        ('<"dropped by policy"@elsewhere.example.test>', 550, SubmissionOutcome.REFUSED_CONTENT),
    ],
    ids=["accepted", "foreign-from", "from-quoting-another-reply"],
)
async def test_a_data_reply_is_counted_under_the_outcome_made_with_it(
    live: Live, author: str, code: int, outcome: SubmissionOutcome
) -> None:
    before = {o: _counted(o) for o in SubmissionOutcome}
    got, msg = await _data_reply(live, author)
    assert got == code, msg
    after = {o: _counted(o) for o in SubmissionOutcome}
    assert {o for o in SubmissionOutcome if after[o] != before[o]} == {outcome}
    assert after[outcome] == before[outcome] + 1
