"""The HTTP side against a real server on 127.0.0.1 (port 0), a real SqliteStore and a real QueueStore.

Each test queues real messages (and their sent-ledger records, as the pipeline writes them at acceptance),
mints the unsubscribe URL the way the pipeline does, and talks HTTP to the server with an aiohttp client.
"Nothing changes" is checked by comparing the whole state (suppressions, events, queue) before and after.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relayd.config import Config
from relayd.core.tokens import make_token, new_queue_id
from relayd.edge.web import MAX_BODY, UnsubscribeSource, create_app, start_web, unsubscribe
from relayd.edge.web.pages import mask_address
from relayd.policy.render import unsubscribe_url
from relayd.queue.store import MessageRow, NewMessage, QueueStore
from relayd.store import Reason, Scope, SentRecord, SqliteStore, SuppressionEntry
from relayd.store.models import Event

SECRET = b"test-secret-0123456789abcdef0123"
JANE = "jane.doe@example.test"
BOB = "bob@example.test"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
BUTTON = '<button type="submit" name="confirm" value="yes">Unsubscribe</button>'


def make_config() -> Config:
    return Config.model_validate(
        {
            "accounts": {
                "acme": {
                    "domains": ["acme.example.test"],
                    "networks": ["127.0.0.1/32"],
                    "lists": {"news": {}, "offers": {}},
                },
                "globex": {"domains": ["globex.example.test"], "networks": ["127.0.0.2/32"]},
            }
        }
    )


async def send(
    store: SqliteStore, queue: QueueStore, account: str, list_name: str | None, *recipients: str
) -> str:
    """Queue one message and write its sent-ledger records, as the submission path does on acceptance."""
    qid = new_queue_id()
    await queue.enqueue(
        NewMessage(
            queue_id=qid,
            account=account,
            mail_from=f"news@{account}.example.test",
            recipients=recipients,
            data=b"Subject: hello\r\n\r\nhello\r\n",
            list_name=list_name,
        )
    )
    now = datetime.now(UTC)
    await store.record_sent(SentRecord(qid, i, account, list_name, r, now) for i, r in enumerate(recipients))
    return qid


@dataclass(frozen=True)
class Snapshot:
    suppressions: list[SuppressionEntry]
    events: list[Event]
    queue: list[MessageRow]


async def snapshot(store: SqliteStore, queue: QueueStore) -> Snapshot:
    return Snapshot(
        await store.list_entries(include_expired=True, limit=10_000),
        await store.events(EPOCH, limit=10_000),
        await queue.list_messages(limit=10_000),
    )


async def states(queue: QueueStore, qid: str) -> dict[str, str]:
    row = await queue.show(qid)
    assert row is not None
    return {r.address: r.state for r in row.recipients}


@dataclass
class Env:
    store: SqliteStore
    queue: QueueStore
    base: str
    http: aiohttp.ClientSession

    def url(self, qid: str, index: int, address: str) -> str:
        return unsubscribe_url(self.base, SECRET, qid, index, address)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "relayd.db")
    await s.open()
    yield s
    await s.close()


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[QueueStore]:
    q = QueueStore(tmp_path / "queue" / "queue.db")
    await q.open()
    yield q
    await q.close()


@pytest.fixture
async def env(store: SqliteStore, queue: QueueStore) -> AsyncIterator[Env]:
    runner = await start_web(create_app(make_config(), store, SECRET, queue), "127.0.0.1", 0)
    host, port = runner.addresses[0][:2]
    try:
        async with aiohttp.ClientSession() as http:
            yield Env(store, queue, f"http://{host}:{port}", http)
    finally:
        await runner.cleanup()


async def post(env: Env, url: str, data: Any, **kw: Any) -> tuple[int, str, Any]:
    async with env.http.post(url, data=data, allow_redirects=False, **kw) as r:
        return r.status, await r.text(), r.headers


async def get(env: Env, url: str) -> tuple[int, str, Any]:
    async with env.http.get(url, allow_redirects=False) as r:
        return r.status, await r.text(), r.headers


ONE_CLICK = {"List-Unsubscribe": "One-Click"}


# --- RFC 8058 one-click ---------------------------------------------------------------------------------


async def test_one_click_post_suppresses_the_list_and_drops_queued_mail(env: Env) -> None:
    store, queue = env.store, env.queue
    first = await send(store, queue, "acme", "news", JANE, BOB)
    second = await send(store, queue, "acme", "news", JANE)  # same list, queued: must go too
    other_list = await send(store, queue, "acme", "offers", JANE)
    other_account = await send(store, queue, "globex", "news", JANE)
    before = datetime.now(UTC)

    status, text, headers = await post(
        env, env.url(first, 0, JANE), ONE_CLICK, headers={"User-Agent": "ProviderBot/1.0"}
    )

    assert status == 200
    assert "You are unsubscribed" in text
    assert "j***@example.test" in text and JANE not in text
    assert "Location" not in headers and "Set-Cookie" not in headers  # RFC 8058 §3.1, §3.2
    [entry] = await store.list_entries(include_expired=True)
    assert (entry.address, entry.scope, entry.account, entry.list) == (JANE, Scope.LIST, "acme", "news")
    assert (entry.reason, entry.source, entry.expires_at) == (Reason.UNSUBSCRIBE, "one-click", None)
    assert before <= entry.created_at <= datetime.now(UTC)
    [event] = await store.events(EPOCH)
    assert (event.kind, event.account, event.list, event.address, event.queue_id) == (
        "unsubscribed",
        "acme",
        "news",
        JANE,
        first,
    )
    evidence = json.loads(event.evidence)
    assert evidence["source"] == "one-click"
    assert evidence["user_agent"] == "ProviderBot/1.0"
    assert evidence["ip"] == "127.0.0.1"
    # queued mail for (acme, news, jane) is dropped; everything else stays queued
    assert await states(queue, first) == {JANE: "dropped", BOB: "queued"}
    assert await states(queue, second) == {JANE: "dropped"}
    assert await states(queue, other_list) == {JANE: "queued"}
    assert await states(queue, other_account) == {JANE: "queued"}
    # and the list suppression is what the RCPT/DATA rules see from now on
    assert JANE in await store.check([JANE], "acme", "news")
    assert not await store.check([JANE], "acme", "offers")


async def test_one_click_as_multipart_form_data(env: Env) -> None:
    """RFC 8058 §3.2: the POST SHOULD be multipart/form-data (it MAY be url-encoded, as above)."""
    qid = await send(env.store, env.queue, "acme", "news", JANE)
    with aiohttp.MultipartWriter("form-data") as mp:
        part = mp.append("One-Click")
        part.set_content_disposition("form-data", name="List-Unsubscribe")
    status, text, _ = await post(env, env.url(qid, 0, JANE), mp)
    assert status == 200 and "You are unsubscribed" in text
    [entry] = await env.store.list_entries()
    assert (entry.scope, entry.list, entry.source) == (Scope.LIST, "news", "one-click")
    assert await states(env.queue, qid) == {JANE: "dropped"}


async def test_one_click_body_with_a_sloppy_content_type_is_accepted(env: Env) -> None:
    qid = await send(env.store, env.queue, "acme", "news", JANE)
    status, _, _ = await post(
        env, env.url(qid, 0, JANE), b"List-Unsubscribe=One-Click", headers={"Content-Type": "text/plain"}
    )
    assert status == 200
    assert len(await env.store.list_entries()) == 1


async def test_unnamed_list_unsubscribes_from_the_account(env: Env) -> None:
    """A message with no configured list has no list to leave: the scope is the account."""
    qid = await send(env.store, env.queue, "acme", None, JANE)
    other_list = await send(env.store, env.queue, "acme", "news", JANE)
    other_account = await send(env.store, env.queue, "globex", None, JANE)
    status, text, _ = await post(env, env.url(qid, 0, JANE), ONE_CLICK)
    assert status == 200 and "all mail of <strong>acme</strong>" in text
    [entry] = await env.store.list_entries()
    assert (entry.scope, entry.account, entry.list) == (Scope.ACCOUNT, "acme", None)
    assert await states(env.queue, qid) == {JANE: "dropped"}
    assert await states(env.queue, other_list) == {JANE: "dropped"}  # the whole account
    assert await states(env.queue, other_account) == {JANE: "queued"}


# --- the page and its button ----------------------------------------------------------------------------


async def test_get_shows_one_button_and_changes_nothing(env: Env) -> None:
    qid = await send(env.store, env.queue, "acme", "news", JANE)
    before = await snapshot(env.store, env.queue)
    status, text, headers = await get(env, env.url(qid, 0, JANE))
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert text.count("<form") == 1 and text.count("<button") == 1
    assert '<form method="post">' in text and BUTTON in text
    assert (
        "Unsubscribe <strong>j***@example.test</strong> from <strong>news</strong> of <strong>acme</strong>?"
        in text
    )
    assert JANE not in text
    assert "<script" not in text
    assert await snapshot(env.store, env.queue) == before


async def test_button_post_unsubscribes_and_a_second_post_changes_nothing(env: Env) -> None:
    qid = await send(env.store, env.queue, "acme", "news", JANE)
    url = env.url(qid, 0, JANE)
    status, text, _ = await post(env, url, {"confirm": "yes"})
    assert status == 200 and "You are unsubscribed" in text
    [entry] = await env.store.list_entries()
    assert (entry.scope, entry.account, entry.list, entry.source) == (Scope.LIST, "acme", "news", "web")
    assert json.loads((await env.store.events(EPOCH))[0].evidence)["source"] == "web"
    after_first = await snapshot(env.store, env.queue)

    for body in ({"confirm": "yes"}, ONE_CLICK):  # idempotent, whichever way it comes again
        status, text, _ = await post(env, url, body)
        assert status == 200 and "You are unsubscribed" in text
    assert await snapshot(env.store, env.queue) == after_first  # same entry (created_at kept), no event

    status, text, _ = await get(env, url)
    assert status == 200 and "Already unsubscribed" in text and "<button" not in text


async def test_concurrent_posts_leave_one_entry(env: Env) -> None:
    qid = await send(env.store, env.queue, "acme", "news", JANE)
    url = env.url(qid, 0, JANE)
    results = await asyncio.gather(*(post(env, url, ONE_CLICK) for _ in range(5)))
    assert [r[0] for r in results] == [200] * 5
    assert len(await env.store.list_entries()) == 1


MALFORMED_MULTIPART = [
    b"--x\r\nbroken",
    b'--x\r\nContent-Disposition: form-data; name="List-Unsubscribe"\r\n\r\nOne-Click',  # no end
    b"garbage without any boundary",
    b"--x--\r\n",
    b"--x\r\nContent-Disposition: form-data\r\n\r\nOne-Click\r\n--x--\r\n",  # no name
    b"--x\r\nContent-Disposition: attachment; filename=a\r\n\r\nOne-Click\r\n--x--\r\n",
]


async def test_post_that_does_not_ask_changes_nothing(env: Env) -> None:
    qid = await send(env.store, env.queue, "acme", "news", JANE)
    before = await snapshot(env.store, env.queue)
    for body in ({"confirm": "no"}, {"List-Unsubscribe": "Two-Clicks"}, b"", {"foo": "bar"}):
        status, text, _ = await post(env, env.url(qid, 0, JANE), body)
        assert status == 400 and "Nothing was changed" in text
    for broken in MALFORMED_MULTIPART:
        status, _, _ = await post(
            env, env.url(qid, 0, JANE), broken, headers={"Content-Type": "multipart/form-data; boundary=x"}
        )
        assert status == 400, broken
    assert await snapshot(env.store, env.queue) == before
    # a charset the server does not know cannot hide an ASCII body that does ask
    status, _, _ = await post(
        env,
        env.url(qid, 0, JANE),
        b"List-Unsubscribe=One-Click",
        headers={"Content-Type": "application/x-www-form-urlencoded; charset=no-such-charset"},
    )
    assert status == 200


async def test_markup_in_names_is_escaped(env: Env) -> None:
    """A list name comes from a List-Id the sender wrote; it must never become markup."""
    qid = new_queue_id()
    evil = "<img src=x onerror=alert(1)>&\"'"
    await env.store.record_sent([SentRecord(qid, 0, "acme", evil, '"<b>"@example.test', datetime.now(UTC))])
    token_url = env.url(qid, 0, '"<b>"@example.test')
    status, text, _ = await get(env, token_url)
    assert status == 200
    assert "<img" not in text and "<b>" not in text
    assert "&lt;img src=x onerror=alert(1)&gt;&amp;&quot;&#x27;" in text
    assert "&quot;***@example.test" in text


# --- invalid tokens -------------------------------------------------------------------------------------


def _tamper(token: str) -> str:
    head, mac = token.rsplit("-", 1)
    return f"{head}-{('b' if mac[0] != 'b' else 'c') + mac[1:]}"


INVALID: dict[str, Callable[[str], str]] = {
    "tampered-mac": lambda qid: _tamper(make_token(SECRET, "unsub", qid, 0, JANE)),
    "other-address": lambda qid: make_token(SECRET, "unsub", qid, 0, BOB),
    "other-index": lambda qid: make_token(SECRET, "unsub", qid, 1, JANE),
    "unknown-queue-id": lambda qid: make_token(SECRET, "unsub", new_queue_id(), 0, JANE),
    "other-purpose": lambda qid: make_token(SECRET, "verp", qid, 0, JANE),
    "other-secret": lambda qid: make_token(b"another secret", "unsub", qid, 0, JANE),
    "bad-shape": lambda qid: "not-a-token",
    "truncated": lambda qid: make_token(SECRET, "unsub", qid, 0, JANE)[:-3],
    "non-ascii-digit": lambda qid: make_token(SECRET, "unsub", qid, 0, JANE).replace("-0-", "-\u0660-"),
    "non-ascii-mac": lambda qid: make_token(SECRET, "unsub", qid, 0, JANE)[:-1] + "\u00e9",
}


@pytest.mark.parametrize("kind", list(INVALID))
async def test_invalid_token_is_400_and_changes_nothing(env: Env, kind: str) -> None:
    qid = await send(env.store, env.queue, "acme", "news", JANE, "carol@example.test")
    token = INVALID[kind](qid)
    url = f"{env.base}/u/{token}"
    before = await snapshot(env.store, env.queue)
    for method, body in (("GET", None), ("POST", ONE_CLICK), ("POST", {"confirm": "yes"})):
        async with env.http.request(method, url, data=body, allow_redirects=False) as r:
            text = await r.text()
            assert r.status == 400, (method, body)
            assert r.headers["Content-Type"] == "text/html; charset=utf-8"
            assert "This link is not valid" in text and "<button" not in text
    assert await snapshot(env.store, env.queue) == before
    assert before.suppressions == [] and before.events == []


# --- limits and methods ---------------------------------------------------------------------------------


async def test_body_over_8_kb_is_413_and_changes_nothing(env: Env) -> None:
    qid = await send(env.store, env.queue, "acme", "news", JANE)
    url = env.url(qid, 0, JANE)
    before = await snapshot(env.store, env.queue)
    big = {"List-Unsubscribe": "One-Click", "pad": "x" * MAX_BODY}
    status, text, _ = await post(env, url, big)
    assert status == 413 and "Request too large" in text

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit holds while reading
        yield b"List-Unsubscribe=One-Click&pad="
        for _ in range(10):
            yield b"x" * 1024

    status, _, _ = await post(
        env, url, chunks(), headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert status == 413
    with aiohttp.MultipartWriter("form-data") as mp:
        mp.append("One-Click").set_content_disposition("form-data", name="List-Unsubscribe")
        mp.append("x" * 10_000).set_content_disposition("form-data", name="pad")
    status, _, _ = await post(env, url, mp)
    assert status == 413
    status, _, _ = await post(env, url, b"x" * 20_000, headers={"Content-Type": "text/plain"})
    assert status == 413
    assert await snapshot(env.store, env.queue) == before

    at_limit = b"List-Unsubscribe=One-Click&pad="
    at_limit += b"x" * (MAX_BODY - len(at_limit))
    status, _, _ = await post(
        env, url, at_limit, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert status == 200  # 8 KB itself is still fine


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
async def test_only_get_and_post_on_the_unsubscribe_url(env: Env, method: str) -> None:
    qid = await send(env.store, env.queue, "acme", "news", JANE)
    before = await snapshot(env.store, env.queue)
    async with env.http.request(method, env.url(qid, 0, JANE), data=ONE_CLICK) as r:
        assert r.status == 405
        assert set(r.headers["Allow"].replace(" ", "").split(",")) == {"GET", "POST"}
    assert await snapshot(env.store, env.queue) == before


async def test_unknown_paths_are_404(env: Env) -> None:
    for path in ("/", "/u/", "/u/a/b"):
        status, text, headers = await get(env, env.base + path)
        assert status == 404, path
        assert "Not found" in text and "Content-Security-Policy" in headers


async def test_metrics_exposition(env: Env) -> None:
    async with env.http.get(env.base + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        assert "relayd_submissions_total" in await r.text()


async def test_healthz(env: Env) -> None:
    async with env.http.get(env.base + "/healthz") as r:
        assert r.status == 200
        assert await r.text() == "ok"
        assert r.headers["Cache-Control"] == "no-store"


async def test_store_failure_is_503_with_retry_after(env: Env) -> None:
    qid = await send(env.store, env.queue, "acme", "news", JANE)
    await env.store.close()
    for method in ("GET", "POST"):
        async with env.http.request(method, env.url(qid, 0, JANE), data=ONE_CLICK) as r:
            text = await r.text()
            assert r.status == 503
            assert r.headers["Retry-After"] == "60"
            assert "Please try again" in text and "not open" not in text  # no exception text
    assert await states(env.queue, qid) == {JANE: "queued"}


# --- headers --------------------------------------------------------------------------------------------


async def test_security_headers_on_every_response(env: Env) -> None:
    qid = await send(env.store, env.queue, "acme", "news", JANE)
    url = env.url(qid, 0, JANE)
    responses = [
        await get(env, url),
        await get(env, f"{env.base}/u/{_tamper(url.rsplit('/', 1)[1])}"),
        await get(env, env.base + "/healthz"),
        await get(env, env.base + "/nowhere"),
        await post(env, url, ONE_CLICK),
    ]
    for status, _, headers in responses:
        csp = headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src 'none'" in csp, status
        assert "'unsafe-inline'" not in csp
        assert headers["Cache-Control"] == "no-store"
        assert headers["X-Robots-Tag"].startswith("noindex")
        assert headers["Referrer-Policy"] == "no-referrer"
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert "Set-Cookie" not in headers


async def test_csp_style_hash_matches_the_inline_stylesheet(env: Env) -> None:
    """Otherwise a browser would refuse the stylesheet: the page would work but look broken."""
    qid = await send(env.store, env.queue, "acme", "news", JANE)
    _, text, headers = await get(env, env.url(qid, 0, JANE))
    m = re.search(r"<style>(.*?)</style>", text, re.S)
    assert m is not None
    digest = base64.b64encode(hashlib.sha256(m.group(1).encode()).digest()).decode()
    assert f"style-src 'sha256-{digest}'" in headers["Content-Security-Policy"]


async def test_logs_do_not_carry_the_token_mac(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    qid = await send(env.store, env.queue, "acme", "news", JANE)
    url = env.url(qid, 0, JANE)
    mac = url.rsplit("-", 1)[1]
    with caplog.at_level(logging.DEBUG, logger="relayd"):
        await get(env, url)
        await post(env, url, ONE_CLICK)
    assert qid in caplog.text  # traceable by queue id ...
    assert mac not in caplog.text  # ... but the capability is not in the logs


# --- the shared function (the mailto path calls it too) ------------------------------------------------


async def test_unsubscribe_function_for_mailto_without_a_queue(store: SqliteStore, queue: QueueStore) -> None:
    qid = await send(store, queue, "acme", "news", JANE)
    token = make_token(SECRET, "unsub", qid, 0, JANE)
    now = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert await unsubscribe(store, None, SECRET, _tamper(token), source="mailto", now=now) is None
    assert await store.list_entries() == [] and await store.events(EPOCH) == []

    result = await unsubscribe(
        store, None, SECRET, token.upper(), source="mailto", now=now, evidence={"mail_from": BOB}
    )
    assert result is not None
    assert (result.account, result.list, result.address, result.scope) == ("acme", "news", JANE, Scope.LIST)
    assert (result.already, result.dropped, result.queue_id) == (False, 0, qid)
    assert await store.list_entries(now=now) == [
        SuppressionEntry(JANE, Scope.LIST, "acme", "news", Reason.UNSUBSCRIBE, "mailto", now)
    ]
    [event] = await store.events(EPOCH)
    assert json.loads(event.evidence) == {"source": "mailto", "index": 0, "mail_from": BOB}
    assert await states(queue, qid) == {JANE: "queued"}  # no queue given: the dequeue check stops it

    again = await unsubscribe(store, queue, SECRET, token, source=UnsubscribeSource.WEB, now=now)
    assert again is not None and again.already and again.dropped == 1
    assert [e.source for e in await store.list_entries(now=now)] == ["mailto"]  # first request kept
    assert len(await store.events(EPOCH)) == 1
    with pytest.raises(ValueError):
        await unsubscribe(store, queue, SECRET, token, source="carrier-pigeon", now=now)


@pytest.mark.parametrize(
    ("address", "masked"),
    [
        ("jane.doe@example.test", "j***@example.test"),
        ("j@example.test", "j***@example.test"),
        ('"john doe"@example.test', '"***@example.test'),
        ("not-an-address", "***"),
    ],
)
def test_mask_address(address: str, masked: str) -> None:
    assert mask_address(address) == masked
