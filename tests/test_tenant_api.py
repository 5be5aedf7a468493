"""The tenant API (``/api/v1``) end to end: a real ``relayd serve``, keys made with the real command line,
and a real HTTP client (urllib) on 127.0.0.1.

One daemon serves the module (accounts ``acme`` and ``other`` of tests.harness); each test uses addresses
of its own. The per-key rate limit and the API being off get daemons of their own.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from relayd.store import Store
from tests.harness import Relayd, free_port, message, submit_each


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    relayd: Relayd,
    method: str,
    path: str,
    key: str | None = None,
    *,
    body: Any = None,
    raw: bytes | None = None,
    content_type: str = "application/json",
) -> Reply:
    """One HTTP request to the daemon's web listener; 4xx and 5xx are replies, not exceptions."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(f"http://127.0.0.1:{relayd.http_port}{path}", data=data, method=method)
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return Reply(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read())


def q(address: str) -> str:
    return urllib.parse.quote(address, safe="@")


def enable_api(relayd: Relayd, extra: str = "") -> None:
    text = relayd.config.read_text()
    relayd.config.write_text(text.replace("[http]\n", f"[http]\napi = true\n{extra}", 1))


def new_key(relayd: Relayd, account: str) -> dict[str, Any]:
    out = relayd.cli("account", "api-key", "create", account, "--name", "test", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relayd]:
    # mail to example.test goes to a closed port: it stays queued, so its status can be read
    relayd = Relayd(tmp_path_factory.mktemp("api"), routes={"example.test": free_port()})
    enable_api(relayd, 'api_rate = "100000/m"\n')
    with relayd:
        yield relayd


@pytest.fixture(scope="module")
def acme(daemon: Relayd) -> str:
    return str(new_key(daemon, "acme")["key"])


@pytest.fixture(scope="module")
def other(daemon: Relayd) -> str:
    return str(new_key(daemon, "other")["key"])


def test_put_get_and_delete_a_suppression(daemon: Relayd, acme: str) -> None:
    put = call(
        daemon, "PUT", f"/api/v1/suppressions/{q('Jane@Example.TEST')}", acme, body={"reason": "manual"}
    )
    assert put.status == 200, put.body
    assert put.json()["address"] == "jane@example.test" and put.json()["scope"] == "account"
    got = call(daemon, "GET", "/api/v1/suppressions/jane@example.test", acme)
    assert got.status == 200
    (entry,) = got.json()["entries"]
    assert (
        entry["reason"] == "manual"
        and entry["source"].startswith("api:")
        and entry["status"] == "suppressed (manual)"
    )
    put = call(
        daemon, "PUT", "/api/v1/suppressions/jane@example.test", acme, body={"list": "news", "expires": "30d"}
    )
    assert put.status == 200 and put.json()["scope"] == "list" and put.json()["expires_at"]
    gone = call(daemon, "DELETE", "/api/v1/suppressions/jane@example.test?list=news", acme)
    assert gone.status == 200 and gone.json()["removed"] == 1
    gone = call(daemon, "DELETE", "/api/v1/suppressions/jane@example.test", acme)
    assert gone.status == 200 and gone.json() == {
        "address": "jane@example.test",
        "removed": 1,
        "still_suppressed": None,
    }
    missing = call(daemon, "GET", "/api/v1/suppressions/jane@example.test", acme)
    assert missing.status == 404 and missing.json() == {"error": "not suppressed"}
    # the changes are logged with the address masked
    assert "j***@example.test" in daemon.log_text() and "jane@example.test" not in daemon.log_text()
    # the daemon now accepts mail to her again
    tx = submit_each(daemon, message(), to=["jane@example.test"])
    assert tx.rcpt["jane@example.test"][0] == 250


def test_suppression_put_refuses_bad_input_with_json_errors(daemon: Relayd, acme: str) -> None:
    path = "/api/v1/suppressions/bad@example.test"
    for body, word in (
        ({"reason": "whim"}, "reason"),
        ({"list": "no.dots"}, "list"),
        ({"expires": "2001-01-01T00:00:00Z"}, "expires"),
        ({"scope": "global"}, "unknown field"),
    ):
        reply = call(daemon, "PUT", path, acme, body=body)
        assert reply.status == 400 and word in reply.json()["error"], (body, reply.body)
    for raw in (b"{not json", b"[" * 60_000):
        reply = call(daemon, "PUT", path, acme, raw=raw)
        assert reply.status == 400 and reply.json() == {"error": "the body is not JSON"}
    reply = call(daemon, "PUT", "/api/v1/suppressions/not-an-address", acme, body={})
    assert reply.status == 400 and reply.headers["content-type"].startswith("application/json")


def test_list_pages_with_cursor_and_filters(daemon: Relayd, acme: str) -> None:
    addresses = [f"page{i}@list.example.test" for i in range(5)]
    for i, a in enumerate(addresses):
        body = {"reason": "unsubscribe", "list": "digest"} if i % 2 else {"reason": "manual"}
        assert call(daemon, "PUT", f"/api/v1/suppressions/{a}", acme, body=body).status == 200
    seen: list[str] = []
    cursor = ""
    pages = 0
    while True:
        reply = call(daemon, "GET", f"/api/v1/suppressions?limit=2{cursor}", acme)
        assert reply.status == 200
        page = reply.json()
        assert len(page["suppressions"]) <= 2
        seen += [e["address"] for e in page["suppressions"]]
        pages += 1
        if page["next_cursor"] is None:
            break
        cursor = f"&cursor={page['next_cursor']}"
    assert pages >= 3 and len(seen) == len(set(seen))
    assert set(addresses) <= set(seen)
    listed = call(daemon, "GET", "/api/v1/suppressions?scope=list&list=digest&limit=1000", acme).json()
    assert {e["address"] for e in listed["suppressions"]} == set(addresses[1::2])
    manual = call(daemon, "GET", "/api/v1/suppressions?reason=manual&since=1h&limit=1000", acme).json()
    assert set(addresses[0::2]) <= {e["address"] for e in manual["suppressions"]}
    assert not set(addresses[1::2]) & {e["address"] for e in manual["suppressions"]}
    future = call(daemon, "GET", "/api/v1/suppressions?since=2999-01-01T00:00:00Z", acme).json()
    assert future == {"suppressions": [], "next_cursor": None}
    assert call(daemon, "GET", "/api/v1/suppressions?scope=global", acme).status == 400


def test_export_is_csv_of_the_accounts_own_entries_with_formulas_neutralised(
    daemon: Relayd, acme: str, other: str
) -> None:
    assert call(daemon, "PUT", "/api/v1/suppressions/-cmd@export.example.test", acme, body={}).status == 200
    assert call(daemon, "PUT", "/api/v1/suppressions/kept@export.example.test", acme, body={}).status == 200
    assert (
        call(daemon, "PUT", "/api/v1/suppressions/theirs@export.example.test", other, body={}).status == 200
    )
    reply = call(daemon, "GET", "/api/v1/suppressions/export", acme)
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(reply.body.decode())))
    assert rows[0] == ["address", "scope", "account", "list", "reason", "created_at", "expires_at"]
    addresses = [r[0] for r in rows[1:]]
    assert "'-cmd@export.example.test" in addresses and "kept@export.example.test" in addresses
    assert "theirs@export.example.test" not in addresses
    assert {r[2] for r in rows[1:]} == {"acme"}
    assert all(not cell.startswith(("=", "+", "-", "@")) for row in rows for cell in row)


def test_import_adds_own_rows_and_rejects_global_and_other_accounts_rows(
    daemon: Relayd, acme: str, other: str
) -> None:
    data = (
        b"address,scope,account,list,reason,created_at,expires_at\r\n"
        b"one@import.example.test,account,,,manual,,\r\n"
        b"two@import.example.test,list,acme,news,unsubscribe,2026-01-01T00:00:00Z,\r\n"
        b"'-three@import.example.test,account,,,manual,,\r\n"
        b"four@import.example.test,global,,,hard_bounce,,\r\n"
        b"five@import.example.test,account,other,,manual,,\r\n"
        b"six@import.example.test,account,,,nonsense,,\r\n"
        b"seven@import.example.test,account,,,complaint,,\r\n"
    )
    reply = call(daemon, "POST", "/api/v1/suppressions/import", acme, raw=data, content_type="text/csv")
    assert reply.status == 200, reply.body
    doc = reply.json()
    assert doc["imported"] == 3 and doc["rejected"] == 4
    assert [e["line"] for e in doc["errors"]] == [5, 6, 7, 8]
    assert "recorded by relayd" in doc["errors"][3]["error"]
    assert "global" in doc["errors"][0]["error"]
    for address in ("one", "two", "-three"):
        got = call(daemon, "GET", f"/api/v1/suppressions/{address}@import.example.test", acme)
        assert got.status == 200, address
        assert got.json()["entries"][0]["source"].startswith("api:")
    for address in ("four", "five"):
        assert call(daemon, "GET", f"/api/v1/suppressions/{address}@import.example.test", acme).status == 404
        assert call(daemon, "GET", f"/api/v1/suppressions/{address}@import.example.test", other).status == 404
    bad = call(
        daemon, "POST", "/api/v1/suppressions/import", acme, raw=b"who,what\r\n", content_type="text/csv"
    )
    assert bad.status == 400 and "header" in bad.json()["error"]


def test_another_accounts_key_gets_404_and_changes_nothing(daemon: Relayd, acme: str, other: str) -> None:
    path = "/api/v1/suppressions/private@b.example.test"
    assert call(daemon, "PUT", path, acme, body={"reason": "unsubscribe"}).status == 200
    for method in ("GET", "DELETE"):
        reply = call(daemon, method, path, other)
        assert reply.status == 404 and reply.json() == {"error": "not suppressed"}, method
    assert call(daemon, "GET", path, acme).json()["entries"][0]["reason"] == "unsubscribe"
    listed = call(daemon, "GET", "/api/v1/suppressions?limit=1000", other).json()["suppressions"]
    assert "private@b.example.test" not in {e["address"] for e in listed}
    # other's own entry for the same address is its own: adding and removing it leaves acme's alone
    assert call(daemon, "PUT", path, other, body={}).status == 200
    assert call(daemon, "DELETE", path, other).json()["removed"] == 1
    assert call(daemon, "GET", path, acme).status == 200


def test_global_suppression_shows_no_detail_and_cannot_be_removed_by_a_tenant(
    daemon: Relayd, acme: str
) -> None:
    out = daemon.cli(
        "suppress", "add", "bounced@global.example.test", "--scope", "global", "--reason", "hard_bounce"
    )
    assert out.returncode == 0, out.stderr
    got = call(daemon, "GET", "/api/v1/suppressions/bounced@global.example.test", acme)
    assert got.status == 200
    assert got.json()["entries"] == [{"scope": "global", "status": "suppressed (global)"}]
    assert b"hard_bounce" not in got.body and b"manual" not in got.body
    refused = call(daemon, "DELETE", "/api/v1/suppressions/bounced@global.example.test", acme)
    assert refused.status == 409 and "only the operator" in refused.json()["error"]
    listed = call(daemon, "GET", "/api/v1/suppressions?limit=1000", acme).json()["suppressions"]
    assert "bounced@global.example.test" not in {e["address"] for e in listed}
    exported = call(daemon, "GET", "/api/v1/suppressions/export", acme).body
    assert b"bounced@global.example.test" not in exported
    # an own entry next to the global one can be removed; the global one stays
    assert (
        call(daemon, "PUT", "/api/v1/suppressions/bounced@global.example.test", acme, body={}).status == 200
    )
    gone = call(daemon, "DELETE", "/api/v1/suppressions/bounced@global.example.test", acme)
    assert gone.json()["removed"] == 1 and gone.json()["still_suppressed"] == "suppressed (global)"
    rows = daemon.cli("suppress", "list", "--address", "bounced@global.example.test", "--json")
    assert [json.loads(line)["scope"] for line in rows.stdout.splitlines()] == ["global"]


def test_revoked_unknown_and_missing_keys_get_401_with_www_authenticate(daemon: Relayd) -> None:
    made = new_key(daemon, "acme")
    key, key_id = made["key"], made["id"]
    assert call(daemon, "GET", "/api/v1/stats", key).status == 200
    out = daemon.cli("account", "api-key", "revoke", "acme", key_id)
    assert out.returncode == 0 and "revoked" in out.stdout
    for presented in (key, key[:-1] + ("A" if key[-1] != "A" else "B"), "rlk_nonsense", None):
        reply = call(daemon, "GET", "/api/v1/stats", presented)
        assert reply.status == 401, presented
        assert reply.headers["www-authenticate"].startswith("Bearer")
        assert "error" in reply.json()
    listed = [
        json.loads(line)
        for line in daemon.cli("account", "api-key", "list", "acme", "--json").stdout.splitlines()
    ]
    mine = [k for k in listed if k["id"] == key_id]
    assert mine and mine[0]["revoked_at"] is not None and "key" not in mine[0]
    # another account's key id is no key of acme's
    theirs = new_key(daemon, "other")
    out = daemon.cli("account", "api-key", "revoke", "acme", theirs["id"])
    assert out.returncode == 1 and call(daemon, "GET", "/api/v1/stats", theirs["key"]).status == 200
    assert key not in daemon.log_text() and theirs["key"] not in daemon.log_text()
    revoked = daemon.cli("events", "--kind", "api_key_revoked", "--json").stdout.splitlines()
    assert [json.loads(line)["reason"] for line in revoked] == [key_id]


def test_keys_are_stored_hashed(daemon: Relayd) -> None:
    made = new_key(daemon, "acme")
    stored = b"".join(p.read_bytes() for p in daemon.tmp.glob("relayd.db*"))
    secret = made["key"].encode()
    assert secret not in stored and secret.split(b"_")[-1] not in stored
    assert hashlib.sha256(secret).hexdigest().encode() in stored
    assert made["id"].encode() in stored


def test_openapi_document_validates_and_lists_every_api_route(daemon: Relayd, tmp_path: Path) -> None:
    from openapi_spec_validator import validate

    from relayd import config as config_mod
    from relayd.edge.web import create_app
    from relayd.store import SqliteStore

    reply = call(daemon, "GET", "/api/v1/openapi.json")  # no key needed
    assert reply.status == 200
    doc = reply.json()
    validate(doc)
    assert doc["openapi"].startswith("3.1")
    documented = {(m.upper(), p) for p, item in doc["paths"].items() for m in item if m != "parameters"}
    cfg = config_mod.load(daemon.config)
    app = create_app(cfg, SqliteStore(tmp_path / "unused.db"), b"x" * 32, None)
    served = {
        (r.method, r.resource.canonical)
        for r in app.router.routes()
        if r.resource is not None and r.resource.canonical.startswith("/api/v1") and r.method != "HEAD"
    }
    assert served == documented
    assert {p for _, p in served} >= {
        "/api/v1/suppressions/{address}",
        "/api/v1/suppressions",
        "/api/v1/suppressions/import",
        "/api/v1/suppressions/export",
        "/api/v1/events",
        "/api/v1/consent/{address}",
        "/api/v1/stats",
        "/api/v1/messages/{queue_id}",
        "/api/v1/openapi.json",
    }


def test_events_after_a_cursor_are_the_webhook_objects_of_the_accounts_changes(
    daemon: Relayd, acme: str, other: str
) -> None:
    start = call(daemon, "GET", "/api/v1/events?after=0&limit=500", acme).json()
    cursor = start["next"]
    while start["more"]:
        start = call(daemon, "GET", f"/api/v1/events?after={cursor}&limit=500", acme).json()
        cursor = start["next"]
    assert call(daemon, "PUT", "/api/v1/suppressions/ev@events.example.test", acme, body={}).status == 200
    assert call(daemon, "DELETE", "/api/v1/suppressions/ev@events.example.test", acme).status == 200
    assert call(daemon, "PUT", "/api/v1/suppressions/ev@events.example.test", other, body={}).status == 200
    page = call(daemon, "GET", f"/api/v1/events?after={cursor}", acme).json()
    # the deliveries of earlier tests' mail go on meanwhile (deferred events): only acme's, never other's
    assert {e["account"] for e in page["events"]} == {"acme"}
    events = [e for e in page["events"] if e["recipient"] == "ev@events.example.test"]
    assert [(e["event"], e["kind"]) for e in events] == [
        ("suppressed", "api_suppress"),
        ("unsuppressed", "api_unsuppress"),
    ]
    key_ids = {
        k["id"]
        for k in map(
            json.loads, daemon.cli("account", "api-key", "list", "acme", "--json").stdout.splitlines()
        )
    }
    for e in events:
        assert e["account"] == "acme" and e["recipient"] == "ev@events.example.test"
        assert e["evidence"]["who"].removeprefix("api:") in key_ids
        assert set(e) == {
            "id",
            "event",
            "kind",
            "at",
            "account",
            "list",
            "recipient",
            "reason",
            "queue_id",
            "evidence",
        }
    assert events[0]["id"] < events[1]["id"] <= page["next"]
    later = call(daemon, "GET", f"/api/v1/events?after={page['next']}", acme).json()
    assert all(e["id"] > page["next"] and e["recipient"] != "ev@events.example.test" for e in later["events"])


def test_stats_give_rates_and_the_suspension_state(daemon: Relayd, other: str) -> None:
    reply = call(daemon, "GET", "/api/v1/stats", other)
    assert reply.status == 200
    stats = reply.json()
    assert stats["account"] == "other" and stats["suspended"] is False and stats["suspension"] is None
    for name in ("sent", "complaints", "hard_bounces", "complaint_rate", "hard_bounce_rate", "thresholds"):
        assert name in stats
    assert daemon.cli("account", "suspend", "other").returncode == 0
    try:
        stats = call(daemon, "GET", "/api/v1/stats", other).json()
        assert stats["suspended"] is True and stats["suspension"]["reason"] == "manual"
    finally:
        assert daemon.cli("account", "reinstate", "other").returncode == 0


def test_consent_put_records_the_evidence_and_get_shows_it_to_the_account_only(
    daemon: Relayd, acme: str, other: str
) -> None:
    body = {
        "list": "news",
        "confirmed_at": "2026-11-01T10:00:00Z",
        "ip": "192.0.2.7",
        "user_agent": "Mozilla/5.0",
        "evidence": {"form": "signup-footer"},
    }
    put = call(daemon, "PUT", "/api/v1/consent/Reader@Consent.example.test", acme, body=body)
    assert put.status == 200, put.body
    got = call(daemon, "GET", "/api/v1/consent/reader@consent.example.test", acme)
    assert got.status == 200
    (record,) = got.json()["consents"]
    assert (
        record["list"] == "news"
        and record["ip"] == "192.0.2.7"
        and record["confirmed_at"] == "2026-11-01T10:00:00Z"
    )
    assert record["evidence"] == {"form": "signup-footer"} and record["source"].startswith("api:")
    shown = daemon.cli("consent", "show", "reader@consent.example.test", "--json")
    assert json.loads(shown.stdout.splitlines()[0])["ip"] == "192.0.2.7"
    assert call(daemon, "GET", "/api/v1/consent/reader@consent.example.test", other).status == 404
    missing_ip = {k: v for k, v in body.items() if k != "ip"}
    assert call(daemon, "PUT", "/api/v1/consent/x@consent.example.test", acme, body=missing_ip).status == 400
    future = {**body, "confirmed_at": "2999-01-01T00:00:00Z"}
    assert call(daemon, "PUT", "/api/v1/consent/x@consent.example.test", acme, body=future).status == 400


def test_message_status_of_own_queue_id_and_404_for_another_accounts(
    daemon: Relayd, acme: str, other: str
) -> None:
    tx = submit_each(daemon, message(subject="status"), to=["bob@example.test", "carol@example.test"])
    queue_id = tx.queue_id
    reply = call(daemon, "GET", f"/api/v1/messages/{queue_id}", acme)
    assert reply.status == 200, reply.body
    doc = reply.json()
    assert doc["queue_id"] == queue_id
    assert [(r["address"], r["state"]) for r in doc["recipients"]] == [
        ("bob@example.test", "queued"),
        ("carol@example.test", "queued"),
    ]
    theirs = call(daemon, "GET", f"/api/v1/messages/{queue_id}", other)
    nothing = call(daemon, "GET", "/api/v1/messages/aaaaaaaaaaaaaaaa", other)
    assert theirs.status == nothing.status == 404 and theirs.body == nothing.body


def test_request_body_over_the_cap_is_413(daemon: Relayd, acme: str) -> None:
    big = json.dumps({"reason": "manual", "list": "x" * 70_000}).encode()
    reply = call(daemon, "PUT", "/api/v1/suppressions/big@example.test", acme, raw=big)
    assert reply.status == 413 and "error" in reply.json()
    assert call(daemon, "GET", "/api/v1/suppressions/big@example.test", acme).status == 404


def test_unknown_api_path_and_wrong_method_are_json_errors(daemon: Relayd, acme: str) -> None:
    reply = call(daemon, "GET", "/api/v1/nothing-here", acme)
    assert reply.status == 404 and reply.json() == {"error": "no such resource"}
    reply = call(daemon, "POST", "/api/v1/stats", acme, body={})
    assert reply.status == 405 and "GET" in reply.headers["allow"] and "error" in reply.json()


def test_per_key_rate_limit_gives_429_with_retry_after(tmp_path: Path) -> None:
    relayd = Relayd(tmp_path, routes={"example.test": free_port()})
    enable_api(relayd, 'api_rate = "3/m"\n')
    with relayd:
        key = new_key(relayd, "acme")["key"]
        second = new_key(relayd, "acme")["key"]
        statuses = [call(relayd, "GET", "/api/v1/stats", key).status for _ in range(5)]
        assert statuses[:3] == [200, 200, 200] and statuses[3:] == [429, 429]
        reply = call(relayd, "GET", "/api/v1/stats", key)
        assert int(reply.headers["retry-after"]) >= 1 and "error" in reply.json()
        assert call(relayd, "GET", "/api/v1/stats", second).status == 200  # per key, not per client


def test_requests_without_a_valid_key_are_limited_per_client(tmp_path: Path) -> None:
    relayd = Relayd(tmp_path, routes={"example.test": free_port()})
    enable_api(relayd, 'rate_per_ip = "4/m"\n')
    with relayd:
        key = new_key(relayd, "acme")["key"]
        statuses = [call(relayd, "GET", "/api/v1/stats", "rlk_guess").status for _ in range(6)]
        assert statuses[:4] == [401] * 4 and statuses[4:] == [429, 429]
        # a blocked client is refused before any key is looked up, a valid one too, until Retry-After
        assert call(relayd, "GET", "/api/v1/stats", key).status == 429


def test_api_is_off_unless_enabled_and_its_keys_are_validated(tmp_path: Path) -> None:
    relayd = Relayd(tmp_path, routes={"example.test": free_port()})
    with relayd:
        key = new_key(relayd, "acme")["key"]
        reply = call(relayd, "GET", "/api/v1/stats", key)
        assert reply.status == 404 and reply.headers["content-type"].startswith("text/html")
        assert call(relayd, "GET", "/api/v1/openapi.json").status == 404
    for bad, key_path in (('api = "sometimes"\n', "http.api"), ('api_rate = "lots"\n', "http.api_rate")):
        relayd.config.write_text(relayd.config.read_text().replace("[http]\n", f"[http]\n{bad}", 1))
        out = relayd.cli("check-config")
        assert out.returncode == 2 and f"{relayd.config}: {key_path}:" in out.stderr, out.stderr
        relayd.config.write_text(relayd.config.read_text().replace(bad, ""))
    out = relayd.cli("account", "api-key", "create", "nobody")
    assert out.returncode == 2 and "no account 'nobody'" in out.stderr
    out = relayd.cli("account", "api-key", "revoke", "acme")
    assert out.returncode == 2


# --- the key store on both backends (the contract of relayd.store.protocols.ApiKeyStore) -------------------


@pytest.fixture(params=["sqlite", "postgresql"])
async def key_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    from relayd.store import SqliteStore
    from relayd.store.postgresql import PostgresStore

    store: Store
    if request.param == "sqlite":
        store = SqliteStore(tmp_path / "relayd.db")
    else:
        schema = "k_" + hashlib.sha1(str(tmp_path).encode()).hexdigest()[:16]
        store = PostgresStore(request.getfixturevalue("pg_dsn"), schema=schema)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def test_key_store_keeps_hashes_lists_by_account_and_revokes_once(key_store: Store) -> None:
    from relayd.edge import apikeys

    t0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    first = await apikeys.create(key_store, "acme", "billing", t0)
    second = await apikeys.create(key_store, "acme", "", t0 + timedelta(seconds=1))
    theirs = await apikeys.create(key_store, "other", "crm", t0)
    assert first.record.key_hash == hashlib.sha256(first.secret.encode()).hexdigest()
    assert await key_store.get_api_key(first.record.key_id) == first.record
    assert await key_store.get_api_key("000000000000") is None
    assert [k.key_id for k in await key_store.list_api_keys("acme")] == [
        first.record.key_id,
        second.record.key_id,
    ]
    assert len(await key_store.list_api_keys()) == 3
    assert await apikeys.authenticate(key_store, first.secret) == first.record
    flipped = first.secret[:-1] + ("A" if first.secret[-1] != "A" else "B")
    assert await apikeys.authenticate(key_store, flipped) is None
    wrong = first.secret[: -len(theirs.secret.split("_")[-1])] + theirs.secret.split("_")[-1]
    assert await apikeys.authenticate(key_store, wrong) is None  # acme's id with another key's secret
    with pytest.raises(ValueError):
        await key_store.add_api_key(first.record)
    assert await key_store.revoke_api_key(first.record.key_id, t0 + timedelta(days=1)) is True
    assert await key_store.revoke_api_key(first.record.key_id) is False
    assert await key_store.revoke_api_key("000000000000") is False
    revoked = await key_store.get_api_key(first.record.key_id)
    assert revoked is not None and revoked.revoked_at == t0 + timedelta(days=1)
    assert await apikeys.authenticate(key_store, first.secret) is None
    assert await apikeys.authenticate(key_store, second.secret) == second.record


async def test_api_changes_reach_the_accounts_webhook_signed_and_naming_the_key(tmp_path: Path) -> None:
    import asyncio

    from tests.harness import PASSWORD_HASH
    from tests.test_webhooks import SECRET, Receiver

    receiver = await Receiver().start()
    secret_file = tmp_path / "hook.secret"
    secret_file.write_bytes(SECRET)
    secret_file.chmod(0o600)
    accounts = f"""
[accounts.acme]
password_hash = "{PASSWORD_HASH}"
domains = ["acme.example.test"]
webhooks = [{{ url = "{receiver.url}", secret_file = "{secret_file}" }}]
"""
    relayd = Relayd(tmp_path, routes={"example.test": free_port()}, accounts=accounts)
    enable_api(relayd)
    try:
        await asyncio.to_thread(relayd.start)
        made = await asyncio.to_thread(new_key, relayd, "acme")
        key = made["key"]
        path = "/api/v1/suppressions/hook@example.test"
        assert (await asyncio.to_thread(call, relayd, "PUT", path, key, body={})).status == 200
        assert (await asyncio.to_thread(call, relayd, "DELETE", path, key)).status == 200
        consent = {"list": "news", "confirmed_at": "2026-11-01T10:00:00Z", "ip": "192.0.2.1"}
        put = await asyncio.to_thread(
            call, relayd, "PUT", "/api/v1/consent/hook@example.test", key, body=consent
        )
        assert put.status == 200
        csv_body = (
            b"address,scope,account,list,reason,created_at,expires_at\r\n"
            b"hook2@example.test,account,,,manual,,\r\n"
        )
        imported = await asyncio.to_thread(
            call, relayd, "POST", "/api/v1/suppressions/import", key, raw=csv_body, content_type="text/csv"
        )
        assert imported.status == 200
        await receiver.wait_for(lambda: len(receiver.events) >= 4, timeout=30)
    finally:
        relayd.kill()
        await receiver.stop()
    assert [e["event"] for e in receiver.events[:4]] == [
        "suppressed",
        "unsuppressed",
        "consented",
        "imported",
    ]
    assert {e["evidence"]["who"] for e in receiver.events} == {f"api:{made['id']}"}
    assert receiver.bad_signatures == 0


async def test_store_export_and_import_move_api_keys_so_they_still_work(
    key_store: Store, tmp_path: Path
) -> None:
    from relayd.edge import apikeys
    from relayd.store import SqliteStore
    from relayd.store.transfer import export_store, import_store

    source = SqliteStore(tmp_path / "source.db")
    await source.open()
    try:
        valid = await apikeys.create(source, "acme", "app")
        gone = await apikeys.create(source, "other", "old")
        await source.revoke_api_key(gone.record.key_id)
        out = io.StringIO()
        await export_store(source, out)
    finally:
        await source.close()
    assert valid.secret not in out.getvalue()
    lines = out.getvalue().splitlines()
    for _ in range(2):  # an import run twice changes nothing and reports nothing
        result = await import_store(key_store, lines)
        assert result.errors == [] and result.counts["api_key"] == 2
    assert await apikeys.authenticate(key_store, valid.secret) == valid.record
    assert await apikeys.authenticate(key_store, gone.secret) is None


def test_keys_of_an_account_removed_from_the_config_stop_working_at_reload(tmp_path: Path) -> None:
    import signal

    from tests.harness import wait_until

    relayd = Relayd(tmp_path, routes={"example.test": free_port()})
    enable_api(relayd)
    with relayd:
        key = new_key(relayd, "other")["key"]
        assert call(relayd, "GET", "/api/v1/stats", key).status == 200
        text = relayd.config.read_text()
        relayd.config.write_text(text[: text.index("[accounts.other]")])
        assert relayd.proc is not None
        relayd.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: call(relayd, "GET", "/api/v1/stats", key).status == 401), relayd.log_text()[
            -3000:
        ]


def test_a_complaint_entry_cannot_be_removed_changed_or_overwritten_by_the_tenant(
    daemon: Relayd, acme: str
) -> None:
    """A complaint (or another entry relayd recorded) is the operator's to lift: a tenant that could delete
    it, or rewrite it as an unsubscribe (which transactional mail passes), would mail the person again."""
    address = "complained@api.example.test"
    added = daemon.cli(
        "suppress", "add", address, "--scope", "account", "--account", "acme", "--reason", "complaint"
    )
    assert added.returncode == 0, added.stderr
    path = f"/api/v1/suppressions/{address}"
    assert call(daemon, "PUT", path, acme, body={"reason": "complaint"}).status == 400
    for body in ({"reason": "unsubscribe"}, {"reason": "manual"}):
        reply = call(daemon, "PUT", path, acme, body=body)
        assert reply.status == 409 and "complaint" in reply.json()["error"], body
    reply = call(daemon, "DELETE", path, acme)
    assert reply.status == 409 and "operator" in reply.json()["error"]
    data = (
        b"address,scope,account,list,reason,created_at,expires_at\r\n"
        + address.encode()
        + b",account,,,unsubscribe,,\r\n"
    )
    assert (
        call(daemon, "POST", "/api/v1/suppressions/import", acme, raw=data, content_type="text/csv").status
        == 200
    )
    entries = call(daemon, "GET", path, acme).json()["entries"]
    assert [(e["scope"], e["reason"]) for e in entries] == [("account", "complaint")]
