"""Consent records and double opt-in.

Four layers, each against real things (no mocks):

* the store contract of :class:`~relayd.store.protocols.ConsentStore`, run for every backend in ``BACKENDS``
  (PostgreSQL: add it there, as in ``tests/test_store_contract.py``);
* the pipeline in-process with a real SqliteStore: ``require_consent`` drops ``no_consent``, an unsubscribe
  wins over consent, a confirmation mail (``X-Relayd-Optin``) goes through once per 24 h with its
  ``{{confirm_url}}`` rendered in every MIME encoding;
* the confirm pages over real HTTP (aiohttp server on 127.0.0.1, port 0): GET changes nothing, POST records
  time, IP and user agent, tampered tokens are 400 with nothing recorded, the optional 303 redirect;
* the whole flow through a real ``relayd serve`` and an aiosmtpd sink, with the CSV import/export/show
  commands run as processes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.policy import compat32
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relayd.cli.consent import COLUMNS, export_consents, import_consents
from relayd.config import Config
from relayd.core import metrics
from relayd.core.tokens import new_queue_id
from relayd.edge.web import create_app, start_web
from relayd.mail.confirmation import OptinHeaderError
from relayd.mail.dkim import Signer
from relayd.policy.model import Verdict
from relayd.policy.pipeline import AllDropped, Pipeline, Processed
from relayd.policy.rules.consent import OPTIN_WINDOW
from relayd.policy.rules.suspension import AccountGate
from relayd.store import Reason, Scope, SqliteStore, SuppressionEntry
from relayd.store.migrations import LATEST_VERSION
from relayd.store.models import ConsentRecord
from relayd.store.protocols import Store
from tests.harness import PASSWORD_HASH, RELAYD, Relayd, Sink, submit_each, wait_until

BACKENDS = ["sqlite"]
SECRET = b"test-secret-0123456789abcdef0123"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
PUBLIC = "http://relayd.test"
CONFIRM = re.compile(r"http://[0-9a-z.:]+/c/([a-z2-7]{16}-[0-9]+-[a-z2-7]{16})")
UNSUB = re.compile(r"http://[0-9a-z.:]+/u/([a-z2-7]{16}-[0-9]+-[a-z2-7]{16})")


def consent(
    address: str,
    *,
    account: str = "acme",
    list_name: str = "news",
    at: datetime = T0,
    ip: str = "192.0.2.7",
    user_agent: str | None = "Mozilla/5.0",
    source: str = "test",
    evidence: str = "{}",
) -> ConsentRecord:
    return ConsentRecord(
        account=account,
        list=list_name,
        address=address,
        confirmed_at=at,
        ip=ip,
        user_agent=user_agent,
        source=source,
        evidence=evidence,
    )


async def all_consents(store: Store, **filters: Any) -> list[ConsentRecord]:
    return [r async for batch in store.consents(**filters) for r in batch]


# --- store contract ---------------------------------------------------------------------------------------


def _make_store(backend: str, tmp_path: Path) -> Store:
    if backend == "sqlite":
        return SqliteStore(tmp_path / "relayd.db")
    raise AssertionError(backend)  # pragma: no cover


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s = _make_store(request.param, tmp_path)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def test_schema_has_consent_migration(store: Store) -> None:
    assert LATEST_VERSION >= 5
    assert await store.migrate() == LATEST_VERSION


async def test_consent_round_trips_exactly(store: Store) -> None:
    rec = consent(
        "a@example.test",
        at=datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC),
        ip="2001:db8::1",
        evidence='{"form": "https://acme.example.test/signup"}',
    )
    assert await store.add_consent([rec]) == 1
    assert await store.get_consent("acme", "news", "a@example.test") == rec
    assert await store.get_consent("acme", "promo", "a@example.test") is None
    assert await store.get_consent("other", "news", "a@example.test") is None
    no_ua = consent("b@example.test", user_agent=None, ip="")
    await store.add_consent([no_ua])
    assert await store.get_consent("acme", "news", "b@example.test") == no_ua


async def test_add_consent_replaces_same_key(store: Store) -> None:
    await store.add_consent([consent("a@example.test", ip="192.0.2.1")])
    newer = consent("a@example.test", at=T0 + timedelta(days=1), ip="192.0.2.2", source="again")
    assert await store.add_consent([newer]) == 1
    assert await all_consents(store) == [newer]
    assert await store.add_consent([]) == 0


async def test_has_consent_is_per_account_and_list(store: Store) -> None:
    await store.add_consent(
        [
            consent("a@example.test"),
            consent("b@example.test", list_name="promo"),
            consent("c@example.test", account="other"),
        ]
    )
    asked = ["a@example.test", "b@example.test", "c@example.test", "d@example.test", "a@example.test"]
    assert await store.has_consent("acme", "news", asked) == {"a@example.test"}
    assert await store.has_consent("acme", "promo", asked) == {"b@example.test"}
    assert await store.has_consent("other", "news", asked) == {"c@example.test"}
    assert await store.has_consent("acme", "news", []) == set()


async def test_has_consent_large_batch(store: Store) -> None:
    addresses = [f"user{i}@example.test" for i in range(1500)]
    await store.add_consent(consent(a) for a in addresses[::3])
    assert await store.has_consent("acme", "news", addresses) == set(addresses[::3])


async def test_consents_filters_and_pages_in_key_order(store: Store) -> None:
    records = [consent(f"u{i:03}@example.test", list_name=("news", "promo")[i % 2]) for i in range(25)]
    records.append(consent("u001@example.test", account="other"))
    await store.add_consent(records)
    batches = [b async for b in store.consents(batch_size=10)]
    assert [len(b) for b in batches] == [10, 10, 6]
    flat = [r for b in batches for r in b]
    assert [(r.account, r.list, r.address) for r in flat] == sorted(
        (r.account, r.list, r.address) for r in records
    )
    assert {r.address for r in await all_consents(store, list_name="promo")} == {
        f"u{i:03}@example.test" for i in range(1, 25, 2)
    }
    mine = await all_consents(store, address="u001@example.test")
    assert [(r.account, r.list) for r in mine] == [("acme", "promo"), ("other", "news")]
    assert await all_consents(store, account="other", address="u001@example.test", batch_size=1) == [
        records[-1]
    ]
    assert await all_consents(store, address="nobody@example.test") == []


async def test_reserve_optin_once_per_window(store: Store) -> None:
    a, b = "a@example.test", "b@example.test"
    assert await store.reserve_optin("acme", "news", [a, a], T0, OPTIN_WINDOW) == {a}
    assert await store.reserve_optin("acme", "news", [a, b], T0 + timedelta(hours=23), OPTIN_WINDOW) == {b}
    # another list, another account: their own windows
    assert await store.reserve_optin("acme", "promo", [a], T0, OPTIN_WINDOW) == {a}
    assert await store.reserve_optin("other", "news", [a], T0, OPTIN_WINDOW) == {a}
    # exactly one window after the first one: allowed again (the window is (at - w, at])
    assert await store.reserve_optin("acme", "news", [a], T0 + timedelta(days=1), OPTIN_WINDOW) == {a}
    assert (
        await store.reserve_optin("acme", "news", [a], T0 + timedelta(days=1, hours=1), OPTIN_WINDOW) == set()
    )
    assert await store.reserve_optin("acme", "news", [], T0, OPTIN_WINDOW) == set()
    with pytest.raises(ValueError):
        await store.reserve_optin("acme", "news", [a], T0, 0)


async def test_reserve_optin_is_atomic_under_concurrency(store: Store) -> None:
    results = await asyncio.gather(
        *(store.reserve_optin("acme", "news", ["race@example.test"], T0, OPTIN_WINDOW) for _ in range(8))
    )
    assert sum(len(r) for r in results) == 1


async def test_prune_optin(store: Store) -> None:
    await store.reserve_optin("acme", "news", ["old@example.test"], T0, OPTIN_WINDOW)
    await store.reserve_optin("acme", "news", ["new@example.test"], T0 + timedelta(days=2), OPTIN_WINDOW)
    assert await store.prune_optin(T0 + timedelta(days=1)) == 1
    later = T0 + timedelta(days=2, hours=1)
    assert await store.reserve_optin(
        "acme", "news", ["old@example.test", "new@example.test"], later, 86_400
    ) == {"old@example.test"}


def test_consent_record_needs_key() -> None:
    with pytest.raises(ValueError):
        consent("")
    with pytest.raises(ValueError):
        consent("a@example.test", list_name="")
    naive = consent("a@example.test", at=datetime(2026, 3, 1, 12, 0))
    assert naive.confirmed_at == T0


# --- pipeline -----------------------------------------------------------------------------------------------


def make_config(*, redirect: str | None = None, public_url: str = PUBLIC) -> Config:
    news: dict[str, Any] = {"require_consent": True}
    if redirect:
        news["redirect"] = redirect
    return Config.model_validate(
        {
            "http": {"public_url": public_url},
            "accounts": {
                "acme": {
                    "domains": ["acme.example.test"],
                    "networks": ["127.0.0.1/32"],
                    "imprint": "ACME Ltd, 1 Test Street",
                    "lists": {"news": news, "promo": {"require_consent": True}, "offers": {}},
                },
            },
        }
    )


@pytest.fixture
async def sqlite(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "relayd.db")
    await s.open()
    yield s
    await s.close()


def pipeline(store: SqliteStore, cfg: Config | None = None) -> Pipeline:
    return Pipeline(cfg or make_config(), store, SECRET, Signer([]), AccountGate(store))


def mail(
    subject: str,
    *,
    list_id: str | None = "<news.acme.example.test>",
    optin: str | None = None,
    body: str = "Hello there.\r\n",
    headers: str = "Content-Type: text/plain; charset=utf-8\r\n",
) -> bytes:
    extra = f"List-Id: {list_id}\r\n" if list_id else ""
    extra += f"X-Relayd-Optin: {optin}\r\n" if optin else ""
    return (
        f"From: App <app@acme.example.test>\r\nTo: someone@example.test\r\nSubject: {subject}\r\n"
        f"Message-ID: <{new_queue_id()}@acme.example.test>\r\nDate: Mon, 23 Nov 2026 12:00:00 +0000\r\n"
        f"{extra}MIME-Version: 1.0\r\n{headers}\r\n{body}"
    ).encode()


@dataclass(frozen=True)
class Done:
    """A processed message and every recipient's copy, made as delivery makes them."""

    processed: Processed
    rendered: tuple[bytes, ...]

    @property
    def recipients(self) -> tuple[str, ...]:
        return self.processed.recipients

    @property
    def dropped(self) -> dict[str, Verdict]:
        return self.processed.dropped

    @property
    def list_name(self) -> str | None:
        return self.processed.list_name


async def run(p: Pipeline, raw: bytes, *recipients: str, now: datetime = T0) -> tuple[str, Done]:
    qid = new_queue_id()
    done = await p.process(
        queue_id=qid,
        account="acme",
        mail_from="app@acme.example.test",
        recipients=recipients,
        raw=raw,
        now=now,
    )
    if done.ledger is not None:  # nothing is queued here: the caller awaits the ledger's write
        await done.ledger
    return qid, Done(done, tuple(p.render(done, i) for i in range(len(done.recipients))))


def dropped_total(reason: str) -> float:
    return metrics.REGISTRY.get_sample_value("relayd_recipients_dropped_total", {"reason": reason}) or 0.0


def text_parts(data: bytes) -> list[tuple[str, str]]:
    """(content type, decoded text) of every text part of a delivered message."""
    msg = message_from_bytes(data, policy=compat32)
    out = []
    for part in msg.walk():
        if part.get_content_maintype() == "text":
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            out.append((part.get_content_type(), payload.decode(part.get_content_charset() or "ascii")))
    return out


async def test_require_consent_drops_recipients_without_record(sqlite: SqliteStore) -> None:
    await sqlite.add_consent([consent("yes@example.test")])
    before = dropped_total("no_consent")
    qid, done = await run(pipeline(sqlite), mail("news 1"), "yes@example.test", "no@example.test")
    assert done.recipients == ("yes@example.test",)
    verdict = done.dropped["no@example.test"]
    assert (verdict.rule, verdict.reason) == ("consent", "no_consent")
    assert verdict.reply == "550 5.7.1 <no@example.test>: no consent for list news"
    [event] = await sqlite.events(T0, kind="dropped")
    assert (event.address, event.reason, event.list, event.queue_id) == (
        "no@example.test",
        "no_consent",
        "news",
        qid,
    )
    assert dropped_total("no_consent") == before + 1
    with pytest.raises(AllDropped, match=r"550 5\.7\.1 all recipients dropped by policy \(no_consent\)"):
        await run(pipeline(sqlite), mail("news 2"), "no@example.test")


async def test_consent_is_per_list_and_only_where_required(sqlite: SqliteStore) -> None:
    await sqlite.add_consent([consent("a@example.test", list_name="promo")])
    p = pipeline(sqlite)
    with pytest.raises(AllDropped):
        await run(p, mail("news", list_id="<news.acme.example.test>"), "a@example.test")
    _, done = await run(p, mail("promo", list_id="<promo.acme.example.test>"), "a@example.test")
    assert done.recipients == ("a@example.test",)
    # no require_consent: nobody is asked; an unknown list or no list at all neither
    for list_id in ("<offers.acme.example.test>", "<adhoc.acme.example.test>", None):
        _, done = await run(p, mail("open", list_id=list_id), "b@example.test")
        assert done.recipients == ("b@example.test",), list_id


async def test_unsubscribe_wins_over_older_consent(sqlite: SqliteStore) -> None:
    await sqlite.add_consent([consent("a@example.test", at=T0 - timedelta(days=30))])
    await sqlite.add(
        [SuppressionEntry("a@example.test", Scope.LIST, "acme", "news", Reason.UNSUBSCRIBE, "web", T0)]
    )
    with pytest.raises(AllDropped, match="suppressed:unsubscribe"):
        await run(pipeline(sqlite), mail("news"), "a@example.test")
    # and no confirmation mail either: whoever unsubscribed is not asked again
    with pytest.raises(AllDropped, match="suppressed:unsubscribe"):
        await run(pipeline(sqlite), mail("confirm", optin="news", list_id=None), "a@example.test")


async def test_confirmation_mail_once_per_recipient_list_and_day(sqlite: SqliteStore) -> None:
    p = pipeline(sqlite)
    body = "Please confirm: {{confirm_url}}\r\n"
    qid, done = await run(p, mail("confirm", optin="news", list_id=None, body=body), "new@example.test")
    assert done.recipients == ("new@example.test",) and done.list_name == "news"
    [(_, text)] = text_parts(done.rendered[0])
    [token] = CONFIRM.findall(text)
    assert text.startswith(f"Please confirm: {PUBLIC}/c/{token}\r\n")
    assert token.startswith(f"{qid}-0-")
    assert "{{confirm_url}}" not in text and "/u/" not in text and "ACME Ltd, 1 Test Street" in text
    head = done.rendered[0].split(b"\r\n\r\n", 1)[0]
    assert b"x-relayd-optin" not in head.lower()  # an instruction to relayd, never delivered
    assert re.search(rb"List-Unsubscribe: <http://relayd\.test/u/" + qid.encode(), head)
    assert b"Feedback-ID: :news:acme:" in head
    ledger = await sqlite.lookup_sent(qid, 0)
    assert ledger is not None and (ledger.list, ledger.address) == ("news", "new@example.test")

    # a second one within 24 h is dropped, whatever the List-Id spelling
    for later in (timedelta(minutes=1), timedelta(hours=23, minutes=59)):
        with pytest.raises(AllDropped, match=r"\(no_consent\)"):
            await run(
                p,
                mail("again", optin="<news.acme.example.test>", body=body),
                "new@example.test",
                now=T0 + later,
            )
    events = await sqlite.events(T0, kind="dropped")
    assert [e.reason for e in events] == ["no_consent", "no_consent"]
    assert "confirmation mail was sent less than 24 h ago" in events[0].evidence
    # another list has its own allowance; the next day the first one's is back
    _, done = await run(p, mail("promo", optin="promo", list_id=None, body=body), "new@example.test")
    assert done.recipients == ("new@example.test",)
    _, done = await run(
        p,
        mail("retry", optin="news", list_id=None, body=body),
        "new@example.test",
        now=T0 + timedelta(days=1),
    )
    assert done.recipients == ("new@example.test",)


async def test_confirmation_mail_to_consented_recipient_is_not_limited(sqlite: SqliteStore) -> None:
    await sqlite.add_consent([consent("old@example.test")])
    p = pipeline(sqlite)
    for _ in range(2):
        _, done = await run(p, mail("confirm", optin="news", body="{{confirm_url}}\r\n"), "old@example.test")
        assert done.recipients == ("old@example.test",)


async def test_confirmation_mail_renders_link_in_every_encoding(sqlite: SqliteStore) -> None:
    html = '<html><body><p>Hi!</p><a href="{{confirm_url}}">Yes, sign me up</a></body></html>\r\n'
    b64 = base64.encodebytes(html.encode()).decode().replace("\n", "\r\n")
    body = (
        "--b1\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        "Gr=C3=BC=C3=9Fe! Confirm here: {{confirm_url}} (valid for a while)\r\n"
        "--b1\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        f"{b64}"
        "--b1\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nA part without the placeholder.\r\n"
        "--b1--\r\n"
    )
    raw = mail(
        "mime",
        optin="news",
        list_id=None,
        body=body,
        headers='Content-Type: multipart/alternative; boundary="b1"\r\n',
    )
    _, done = await run(pipeline(sqlite), raw, "x@example.test", "y@example.test")
    tokens = []
    for rendered in done.rendered:
        (t1, plain), (t2, markup), (t3, other) = text_parts(rendered)
        assert (t1, t2, t3) == ("text/plain", "text/html", "text/plain")
        [token] = CONFIRM.findall(plain)
        assert plain.startswith(f"Grüße! Confirm here: {PUBLIC}/c/{token} (valid for a while)")
        assert f'<a href="{PUBLIC}/c/{token}">Yes, sign me up</a>' in markup
        assert other.startswith("A part without the placeholder.")
        assert f"Confirm your subscription: {PUBLIC}/c/{token}" in other  # the footer carries it instead
        for text in (plain, markup, other):
            assert "{{confirm_url}}" not in text and "Unsubscribe" not in text and "ACME Ltd" in text
        tokens.append(token)
    assert len(set(tokens)) == 2  # one per recipient


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ("X-Relayd-Optin: news\r\nX-Relayd-Optin: news\r\n", "occurs 2 times"),
        ("X-Relayd-Optin: not a list!\r\n", "is not a list name"),
        ("X-Relayd-Optin: news\r\nList-Id: <promo.acme.example.test>\r\n", "List-Id names list 'promo'"),
    ],
    ids=["twice", "malformed", "other-list-id"],
)
async def test_bad_optin_header_refuses_the_message(sqlite: SqliteStore, extra: str, problem: str) -> None:
    raw = mail("bad", list_id=None, headers=f"{extra}Content-Type: text/plain\r\n")
    with pytest.raises(OptinHeaderError, match=problem):
        await run(pipeline(sqlite), raw, "a@example.test")
    assert await sqlite.reserve_optin("acme", "news", ["a@example.test"], T0, OPTIN_WINDOW) == {
        "a@example.test"
    }


async def test_confirmation_mail_with_unsubscribe_placeholder_is_refused(sqlite: SqliteStore) -> None:
    raw = mail("bad", optin="news", body="Confirm {{confirm_url}} or leave {{unsubscribe_url}}\r\n")
    with pytest.raises(OptinHeaderError, match=re.escape("not {{unsubscribe_url}}")):
        await run(pipeline(sqlite), raw, "a@example.test")


async def test_forged_optin_header_on_normal_mail_is_stripped(sqlite: SqliteStore) -> None:
    # the header only ever has effect as an instruction; a consented recipient's ordinary mail loses it too
    await sqlite.add_consent([consent("a@example.test")])
    _, done = await run(pipeline(sqlite), mail("hello", optin="news"), "a@example.test")
    assert b"X-Relayd-Optin" not in done.rendered[0]


# --- confirm pages over HTTP --------------------------------------------------------------------------------


class Web:
    def __init__(self, store: SqliteStore, base: str, http: aiohttp.ClientSession) -> None:
        self.store, self.base, self.http = store, base, http

    async def get(self, path: str) -> tuple[int, str, Any]:
        async with self.http.get(self.base + path, allow_redirects=False) as r:
            return r.status, await r.text(), r.headers

    async def post(self, path: str, data: Any = None, **kw: Any) -> tuple[int, str, Any]:
        data = {"confirm": "yes"} if data is None else data
        async with self.http.post(self.base + path, data=data, allow_redirects=False, **kw) as r:
            return r.status, await r.text(), r.headers


async def serve(store: SqliteStore, cfg: Config) -> AsyncIterator[Web]:
    runner = await start_web(create_app(cfg, store, SECRET, None), "127.0.0.1", 0)
    host, port = runner.addresses[0][:2]
    try:
        async with aiohttp.ClientSession(headers={"User-Agent": "consent-test/1.0"}) as http:
            yield Web(store, f"http://{host}:{port}", http)
    finally:
        await runner.cleanup()


@pytest.fixture
async def web(sqlite: SqliteStore) -> AsyncIterator[Web]:
    async for w in serve(sqlite, make_config()):
        yield w


async def confirmation(store: SqliteStore, address: str, *, list_name: str = "news") -> tuple[str, str]:
    """Send a confirmation mail through the pipeline; (confirm path, unsubscribe path) of its first copy."""
    raw = mail("confirm", optin=list_name, list_id=None, body="{{confirm_url}}\r\n")
    _, done = await run(pipeline(store), raw, address, now=datetime.now(UTC))
    [token] = CONFIRM.findall(done.rendered[0].decode())
    [unsub] = UNSUB.findall(done.rendered[0].decode())
    return f"/c/{token}", f"/u/{unsub}"


async def test_get_shows_page_and_records_nothing(web: Web) -> None:
    path, _ = await confirmation(web.store, "jane.doe@example.test")
    for _ in range(2):  # a scanner, then the person
        status, text, headers = await web.get(path)
        assert status == 200
        assert "<h1>Confirm your subscription</h1>" in text
        assert "j***@example.test" in text and "jane.doe" not in text
        assert '<button type="submit" name="confirm" value="yes">Confirm subscription</button>' in text
        assert "script-src 'none'" in headers["Content-Security-Policy"]
        assert headers["Cache-Control"] == "no-store"
    assert await all_consents(web.store) == []
    assert await web.store.events(T0, kind="consented") == []


async def test_post_records_consent_with_proof(web: Web) -> None:
    path, _ = await confirmation(web.store, "jane@example.test")
    before = datetime.now(UTC)
    status, text, _ = await web.post(path)
    assert status == 200 and "<h1>Your subscription is confirmed</h1>" in text
    rec = await web.store.get_consent("acme", "news", "jane@example.test")
    assert rec is not None
    assert before <= rec.confirmed_at <= datetime.now(UTC)
    assert (rec.ip, rec.user_agent, rec.source) == ("127.0.0.1", "consent-test/1.0", "double-opt-in")
    evidence = json.loads(rec.evidence)
    assert evidence["queue_id"] == path.split("/")[2].split("-")[0] and evidence["index"] == 0
    [event] = await web.store.events(before, kind="consented")
    assert (event.address, event.list, event.account) == ("jane@example.test", "news", "acme")
    # a second press keeps the first proof; GET now says it is done, without a button
    status, text, _ = await web.post(path, {"confirm": "yes"}, headers={"User-Agent": "other"})
    assert status == 200
    assert await all_consents(web.store) == [rec]
    status, text, _ = await web.get(path)
    assert status == 200 and "Already confirmed" in text and "<button" not in text


async def test_confirmed_recipient_then_gets_normal_mail(web: Web) -> None:
    p = pipeline(web.store)
    with pytest.raises(AllDropped):
        await run(p, mail("news before"), "jane@example.test", now=datetime.now(UTC))
    path, _ = await confirmation(web.store, "jane@example.test")
    assert (await web.post(path))[0] == 200
    _, done = await run(p, mail("news after"), "jane@example.test", now=datetime.now(UTC))
    assert done.recipients == ("jane@example.test",)


@pytest.mark.parametrize("kind", ["mac", "index", "queue-id", "shape", "unsubscribe-token", "other-address"])
async def test_tampered_token_is_400_and_records_nothing(web: Web, kind: str) -> None:
    path, unsub = await confirmation(web.store, "jane@example.test")
    token = path.removeprefix("/c/")
    qid, idx, mac = token.split("-")
    other_path, _ = await confirmation(web.store, "bob@example.test")
    forged = {
        "mac": f"{qid}-{idx}-{mac[::-1]}",
        "index": f"{qid}-1-{mac}",
        "queue-id": f"{qid[:-1]}{'a' if qid[-1] != 'a' else 'b'}-{idx}-{mac}",
        "shape": token + "x",
        "unsubscribe-token": unsub.removeprefix("/u/"),  # a valid token, for another purpose
        "other-address": f"{other_path.split('/')[2].split('-')[0]}-0-{mac}",
    }[kind]
    for status, text, _ in (await web.get(f"/c/{forged}"), await web.post(f"/c/{forged}")):
        assert status == 400 and "This link is not valid" in text
    assert await all_consents(web.store) == []
    assert (await web.post(path))[0] == 200  # the real one still works


async def test_post_without_the_button_field_records_nothing(web: Web) -> None:
    path, _ = await confirmation(web.store, "jane@example.test")
    for data in ({}, {"confirm": "no"}, "confirm=yes"):  # the last one has no form content type
        status, text, _ = await web.post(path, data)
        assert status == 400 and "Nothing was recorded" in text, data
    status, _, _ = await web.post(path, data=aiohttp.FormData({"confirm": "yes"}, default_to_multipart=True))
    assert status == 200
    status, _, _ = await web.post(
        path, data=b"x" * 10_000, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert status == 413


async def test_post_redirects_to_list_page_when_configured(sqlite: SqliteStore) -> None:
    cfg = make_config(redirect="https://acme.example.test:8443/welcome?from=relayd")
    async for w in serve(sqlite, cfg):
        path, _ = await confirmation(sqlite, "jane@example.test")
        status, _, headers = await w.get(path)
        assert status == 200
        assert "form-action 'self' https://acme.example.test:8443;" in headers["Content-Security-Policy"]
        status, _, headers = await w.post(path)
        assert status == 303 and headers["Location"] == "https://acme.example.test:8443/welcome?from=relayd"
        assert await sqlite.get_consent("acme", "news", "jane@example.test") is not None
        # promo has no redirect: the done page
        path, _ = await confirmation(sqlite, "jane@example.test", list_name="promo")
        status, _, headers = await w.get(path)
        assert "form-action 'self';" in headers["Content-Security-Policy"]
        status, text, _ = await w.post(path)
        assert status == 200 and "confirmed" in text


def test_redirect_must_be_a_plain_http_url() -> None:
    for bad in ("javascript:alert(1)", "https://a b.test/", "https://x;script-src *", "ftp://x.test/"):
        with pytest.raises(ValueError):
            make_config(redirect=bad)


# --- CSV import / export ------------------------------------------------------------------------------------


async def test_csv_import_reports_bad_rows_and_keeps_good_ones(sqlite: SqliteStore, tmp_path: Path) -> None:
    path = tmp_path / "consents.csv"
    path.write_text(
        "\ufeffAddress,list,account,confirmed_at,ip,user_agent,evidence\n"  # any column order, BOM
        'Jane@Example.TEST,news,acme,2025-01-02T03:04:05Z,192.0.2.1,Mozilla/5.0,"{""form"": ""/signup""}"\n'
        "bob@example.test,news,acme,2025-01-02 03:04:05+02:00,2001:DB8::1,,signed up at the fair\n"
        "not-an-address,news,acme,2025-01-02T03:04:05Z,192.0.2.1,,\n"
        "carl@example.test,news,acme,yesterday,192.0.2.1,,\n"
        "dora@example.test,news,acme,2025-01-02T03:04:05Z,,,\n"
        "emil@example.test,news,acme,2025-01-02T03:04:05Z,300.1.2.3,,\n"
        "fay@example.test,news,ghost,2025-01-02T03:04:05Z,192.0.2.1,,\n"
        "gus@example.test,news.acme,acme,2025-01-02T03:04:05Z,192.0.2.1,,\n"
        "hal@example.test,news,acme,2999-01-01T00:00:00Z,192.0.2.1,,\n"
        "ida@example.test,news,acme\n"
        "\n"
        "joe@example.test,promo,acme,2025-01-02,192.0.2.9,,\n",
        encoding="utf-8",
    )
    result = await import_consents(sqlite, path, accounts={"acme"}, now=T0)
    assert result.imported == 3
    lines = {line: problem for line, problem in result.errors}
    assert sorted(lines) == [4, 5, 6, 7, 8, 9, 10, 11]
    assert lines[4].startswith("address:")
    assert lines[5].startswith("confirmed_at: not an ISO 8601 time")
    assert lines[6] == "ip: required"
    assert lines[7].startswith("ip: '300.1.2.3'")
    assert lines[8] == "account: 'ghost' is not configured"
    assert lines[9].startswith("list: 'news.acme'")
    assert lines[10].endswith("is in the future")
    assert lines[11] == "expected 7 fields, got 3"
    jane = await sqlite.get_consent("acme", "news", "jane@example.test")
    assert jane == ConsentRecord(
        account="acme",
        list="news",
        address="jane@example.test",
        confirmed_at=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
        ip="192.0.2.1",
        user_agent="Mozilla/5.0",
        source="csv:consents.csv",
        evidence='{"form": "/signup"}',
    )
    bob = await sqlite.get_consent("acme", "news", "bob@example.test")
    assert bob is not None and (bob.ip, bob.user_agent) == ("2001:db8::1", None)
    assert bob.confirmed_at == datetime(2025, 1, 2, 1, 4, 5, tzinfo=UTC)
    assert json.loads(bob.evidence) == {"text": "signed up at the fair"}

    # export, then import into an empty store: the same records
    out = tmp_path / "export.csv"
    with out.open("w", newline="", encoding="utf-8") as f:
        assert await export_consents(sqlite, f) == 3
    assert out.read_text().splitlines()[0] == ",".join(COLUMNS)
    again = SqliteStore(tmp_path / "again.db")
    await again.open()
    try:
        result = await import_consents(again, out, now=T0)
        assert (result.imported, result.errors) == (3, [])
        assert await all_consents(again) == await all_consents(sqlite)
    finally:
        await again.close()


async def test_csv_bad_header_imports_nothing(sqlite: SqliteStore, tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("account,list,address,when\nacme,news,a@example.test,2025-01-01\n")
    result = await import_consents(sqlite, path)
    assert result.imported == 0
    [(line, problem)] = result.errors
    assert (
        line == 1 and "unknown column(s) when" in problem and "missing column(s) confirmed_at, ip" in problem
    )
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert (await import_consents(sqlite, empty)).errors[0][0] == 1


# --- end to end: relayd serve, the sink, the CLI ------------------------------------------------------------

ACCOUNTS = f"""
[accounts.acme]
password_hash = "{PASSWORD_HASH}"
domains = ["acme.example.test"]
imprint = "ACME Ltd, 1 Test Street"

[accounts.acme.lists.news]
require_consent = true
"""


def consent_cli(relayd: Relayd, *args: str) -> subprocess.CompletedProcess[str]:
    """``relayd consent ARGS --config ...`` (through the module until relayd.cli.main wires it in)."""
    return subprocess.run(
        [sys.executable, "-m", "relayd", "consent", *args, "--config", str(relayd.config)],
        capture_output=True,
        text=True,
        cwd=relayd.tmp,
        timeout=60,
    )


def delivered_to(sink: Sink, address: str) -> list[bytes]:
    return [m.data for m in sink.messages if address in m.rcpt_tos]


async def test_double_opt_in_end_to_end(tmp_path: Path, sink: Sink) -> None:
    csv_file = tmp_path / "old-system.csv"
    csv_file.write_text(
        "account,list,address,confirmed_at,ip\n"
        "acme,news,known@example.test,2025-05-01T10:00:00Z,198.51.100.4\n"
        "acme,news,broken@,2025-05-01T10:00:00Z,198.51.100.4\n"
    )
    with Relayd(tmp_path, routes={"example.test": sink.port}, accounts=ACCOUNTS) as relayd:
        out = consent_cli(relayd, "import", str(csv_file))
        assert out.returncode == 1, out.stderr
        assert f"{csv_file}:3: address:" in out.stderr
        assert "1 row(s) imported, 1 rejected" in out.stdout

        # require_consent: the known address gets the news, the new one is dropped no_consent
        tx = submit_each(relayd, mail("news 1"), to=["known@example.test", "new@example.test"])
        assert tx.data is not None and tx.data[0] == 250
        assert wait_until(lambda: len(delivered_to(sink, "known@example.test")) == 1)

        # the app sends the confirmation mail: delivered once, with the link; the second is refused
        confirm_mail = mail("Please confirm", optin="news", list_id=None, body="Confirm: {{confirm_url}}\r\n")
        tx = submit_each(relayd, confirm_mail, to=["new@example.test"])
        assert tx.data is not None and tx.data[0] == 250, tx.data
        tx = submit_each(relayd, confirm_mail, to=["new@example.test"])
        assert tx.data is not None and tx.data[0] == 550 and "no_consent" in tx.data[1]
        assert wait_until(lambda: len(delivered_to(sink, "new@example.test")) == 1)
        [data] = delivered_to(sink, "new@example.test")
        assert b"X-Relayd-Optin" not in data
        [(_, text)] = text_parts(data)
        [token] = CONFIRM.findall(text)

        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{relayd.http_port}/c/{token}"
            async with http.get(url) as r:
                assert r.status == 200 and "Confirm your subscription" in await r.text()
            async with http.get(url[:-1] + ("a" if url[-1] != "a" else "b")) as r:
                assert r.status == 400
            shown = consent_cli(relayd, "show", "new@example.test", "--json")
            assert shown.returncode == 0 and shown.stdout == ""  # nothing recorded by GETs
            async with http.post(url, data={"confirm": "yes"}) as r:
                assert r.status == 200 and "Your subscription is confirmed" in await r.text()
            async with http.get(f"http://127.0.0.1:{relayd.http_port}/metrics") as r:
                exposition = await r.text()
        assert re.search(r'relayd_recipients_dropped_total\{reason="no_consent"\} [1-9]', exposition)

        shown = consent_cli(relayd, "show", "NEW@example.test", "--json")
        assert shown.returncode == 0, shown.stderr
        [record] = [json.loads(line) for line in shown.stdout.splitlines()]
        assert (record["account"], record["list"], record["address"]) == ("acme", "news", "new@example.test")
        assert (record["ip"], record["source"]) == ("127.0.0.1", "double-opt-in")
        assert record["user_agent"].startswith("Python/") and "aiohttp" in record["user_agent"]
        confirmed = datetime.fromisoformat(record["confirmed_at"])
        assert timedelta(0) <= datetime.now(UTC) - confirmed < timedelta(minutes=5)
        assert record["evidence"]["index"] == 0

        # after confirming, the next normal message is delivered
        tx = submit_each(relayd, mail("news 2"), to=["new@example.test"])
        assert tx.data is not None and tx.data[0] == 250, tx.data
        assert wait_until(lambda: len(delivered_to(sink, "new@example.test")) == 2)

        exported = consent_cli(relayd, "export")
        assert exported.returncode == 0
        rows = exported.stdout.splitlines()
        assert rows[0] == ",".join(COLUMNS) and len(rows) == 3
        events = subprocess.run(
            [*RELAYD, "events", "--json", "--since", "1h", "--config", str(relayd.config)],
            capture_output=True,
            text=True,
            cwd=relayd.tmp,
            timeout=60,
        )
        drops = [json.loads(line) for line in events.stdout.splitlines()]
        reasons = sorted((e["address"], e["reason"]) for e in drops if e.get("kind") == "dropped")
        assert reasons == [("new@example.test", "no_consent"), ("new@example.test", "no_consent")]
