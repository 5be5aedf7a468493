"""The postmaster inbox: mail to abuse@/postmaster@ that a person must read is kept, listed, shown, marked
done, forwarded to ``[inbound] postmaster_forward`` with a null sender (never to the reporter), capped per
source and pruned after ``[inbound] keep_inbox``."""

from __future__ import annotations

import email
import json
import smtplib
import subprocess
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

from relayd import config as config_mod
from relayd.app import retention
from relayd.desk import inbox
from relayd.desk.inbox import MAX_RAW, PER_SOURCE_HOUR, Kind
from relayd.store import Store
from relayd.store.models import DmarcCount
from tests.harness import RELAYD, Relayd, Sink, wait_until
from tests.test_store_contract import _make_store, _postgresql_for_make_store  # noqa: F401

INBOUND = "bounces.example.test"
FORWARD_TO = "postmaster-team@ops.test"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

COMPLAINT = (
    "From: Jane Doe <jane@reporter.test>\r\n"
    f"To: abuse@{INBOUND}\r\n"
    "Subject: Stop sending me your newsletter\r\n"
    "Date: Mon, 07 Dec 2026 10:00:00 +0000\r\n"
    "Message-ID: <complaint-1@reporter.test>\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: quoted-printable\r\n"
    "\r\n"
    "Hello,\r\n\r\nI never signed up for the ACME newsletter and it keeps coming. Gr=C3=BC=C3=9Fe, Jane\r\n"
).encode()
PROVIDER_WARNING = (
    "From: Bigmail Postmaster <postmaster@bigmail.test>\r\n"
    f"To: postmaster@{INBOUND}\r\n"
    "Subject: Warning: high complaint rate from 192.0.2.10\r\n"
    "Date: Mon, 07 Dec 2026 11:00:00 +0000\r\n"
    "Message-ID: <notice-7@bigmail.test>\r\n"
    "Precedence: bulk\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: multipart/alternative; boundary=b\r\n"
    "\r\n"
    "--b\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    "Mail from 192.0.2.10 draws complaints above 0.3 %. Further mail will be deferred.\r\n"
    "--b\r\nContent-Type: text/html; charset=us-ascii\r\n\r\n<p>Mail from 192.0.2.10 ...</p>\r\n"
    "--b--\r\n"
).encode()


def _arf_without_token() -> bytes:
    return (
        b"From: fbl@isp.test\r\nTo: abuse@bounces.example.test\r\nSubject: complaint\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=feedback-report; boundary="b2"\r\n\r\n'
        b"--b2\r\nContent-Type: text/plain\r\n\r\nThis is an abuse report.\r\n"
        b"--b2\r\nContent-Type: message/feedback-report\r\n\r\n"
        b"Feedback-Type: abuse\r\nUser-Agent: isp-fbl/1.0\r\nVersion: 1\r\n"
        b"Original-Rcpt-To: someone@example.test\r\nSource-IP: 192.0.2.10\r\n\r\n"
        b"--b2\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        b"From: news@acme.example.test\r\nSubject: hi\r\n\r\n--b2--\r\n"
    )


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, store_config: str | None
) -> Iterator[tuple[Relayd, Sink]]:
    """relayd with a forward address; the forward's domain and every reporter's domain are routed to one
    sink, so a message to a reporter would be seen there."""
    with Sink() as sink:
        tmp = tmp_path_factory.mktemp("inbox")
        routes = {
            d: sink.port for d in ("ops.test", "reporter.test", "bigmail.test", "isp.test", "example.test")
        }
        r = Relayd(tmp, routes=routes, store=store_config)
        _set_inbound(r, f'postmaster_forward = "{FORWARD_TO}"')
        with r:
            yield r, sink


def _set_inbound(relayd: Relayd, line: str) -> None:
    text = relayd.config.read_text()
    anchor = f'domains = ["{INBOUND}"]\n'
    relayd.config.write_text(text.replace(anchor, anchor + line + "\n", 1))


def send(relayd: Relayd, data: bytes, to: str, sender: str) -> int:
    with smtplib.SMTP("127.0.0.1", relayd.inbound_port, timeout=60) as s:
        s.ehlo("mx.reporter.test")
        code, resp = s.docmd("MAIL", f"FROM:<{sender}>")
        assert code == 250, resp
        code, resp = s.rcpt(to)
        assert code == 250, resp
        return int(s.data(data)[0])


def items(relayd: Relayd, *args: str) -> list[dict[str, Any]]:
    out = relayd.cli("inbox", "list", "--json", *args)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def item_by_subject(relayd: Relayd, subject: str) -> dict[str, Any] | None:
    return next((i for i in items(relayd) if i["subject"] == subject), None)


def forwards(sink: Sink) -> list[Message]:
    return [email.message_from_bytes(m.data) for m in sink.messages if m.rcpt_tos == [FORWARD_TO]]


def forwarded_item(sink: Sink, item_id: int) -> Message | None:
    return next((m for m in forwards(sink) if m["X-Relayd-Inbox-Item"] == str(item_id)), None)


# -- end to end ----------------------------------------------------------------------------------------------


def test_complaint_and_provider_warning_are_listed_shown_forwarded_and_done(
    world: tuple[Relayd, Sink],
) -> None:
    relayd, sink = world
    assert send(relayd, COMPLAINT, f"abuse@{INBOUND}", "jane@reporter.test") == 250
    assert send(relayd, PROVIDER_WARNING, f"postmaster@{INBOUND}", "bounces@bigmail.test") == 250
    complaint = item_by_subject(relayd, "Stop sending me your newsletter")
    warning = item_by_subject(relayd, "Warning: high complaint rate from 192.0.2.10")
    assert complaint is not None and warning is not None
    assert (complaint["kind"], complaint["state"], complaint["from"]) == (
        "complaint-text",
        "open",
        "Jane Doe <jane@reporter.test>",
    )
    assert (warning["kind"], warning["mail_from"]) == ("provider-notice", "bounces@bigmail.test")
    assert [i["id"] for i in items(relayd, "--kind", "provider-notice")].count(warning["id"]) == 1

    shown = relayd.cli("inbox", "show", str(complaint["id"]))
    assert shown.returncode == 0, shown.stderr
    assert "Subject:   Stop sending me your newsletter" in shown.stdout
    assert "it keeps coming. Grüße, Jane" in shown.stdout  # the text, decoded
    shown = relayd.cli("inbox", "show", str(warning["id"]))
    assert "draws complaints above 0.3 %" in shown.stdout and "<p>" not in shown.stdout
    raw = relayd.cli("inbox", "show", str(complaint["id"]), "--raw")
    assert raw.returncode == 0 and "Gr=C3=BC=C3=9Fe, Jane" in raw.stdout  # as it came, undecoded

    # both are forwarded to the configured address, with the null sender, the original attached
    assert wait_until(lambda: forwarded_item(sink, complaint["id"]) is not None)
    assert wait_until(lambda: forwarded_item(sink, warning["id"]) is not None)
    copies = [m for m in sink.messages if m.rcpt_tos == [FORWARD_TO]]
    assert copies and all(m.mail_from in ("", "<>") for m in copies)
    fwd = forwarded_item(sink, complaint["id"])
    assert fwd is not None and fwd["Auto-Submitted"] == "auto-generated"
    assert "Stop sending me your newsletter" in str(fwd["Subject"])
    attached = [p for p in fwd.walk() if p.get_content_type() == "message/rfc822"]
    assert attached and "I never signed up" in attached[0].as_string()
    # and nothing goes back to the reporters
    reporters = {"jane@reporter.test", "bounces@bigmail.test", "postmaster@bigmail.test"}
    assert not [m for m in sink.messages if set(m.rcpt_tos) & reporters]

    done = relayd.cli("inbox", "done", str(complaint["id"]))
    assert done.returncode == 0, done.stderr
    open_ids = [i["id"] for i in items(relayd, "--state", "open")]
    assert complaint["id"] not in open_ids and warning["id"] in open_ids
    assert [i["state"] for i in items(relayd) if i["id"] == complaint["id"]] == ["done"]
    assert relayd.cli("inbox", "done", "999999").returncode == 1
    assert relayd.cli("inbox", "show", "999999").returncode == 1


def test_unattributed_report_and_bounce_are_kept_and_bounces_not_forwarded(
    world: tuple[Relayd, Sink],
) -> None:
    relayd, _ = world
    assert send(relayd, _arf_without_token(), f"abuse@{INBOUND}", "fbl@isp.test") == 250
    dsn = (
        b"From: MAILER-DAEMON@mx.other.test\r\nTo: postmaster@bounces.example.test\r\n"
        b"Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="b1"\r\n\r\n'
        b"--b1\r\nContent-Type: text/plain\r\n\r\nCould not deliver.\r\n"
        b"--b1\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.other.test\r\n\r\n"
        b"Final-Recipient: rfc822; nobody@other.test\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n--b1--\r\n"
    )
    assert send(relayd, dsn, f"postmaster@{INBOUND}", "") == 250
    kept = items(relayd, "--kind", "unattributed-report")
    arf = next(i for i in kept if i["subject"] == "complaint")
    bounce = next(i for i in kept if i["subject"] == "Undelivered Mail Returned to Sender")
    assert "no token of ours" in arf["note"] and bounce["mail_from"] in ("", "<>")
    assert f"inbox item {arf['id']} forwarded" in relayd.log_text()
    # a bounce is kept for a person but never forwarded (no loop through a bouncing forward address)
    assert f"inbox item {bounce['id']} forwarded" not in relayd.log_text()


def test_an_auto_reply_to_a_forward_is_kept_but_not_forwarded_again(world: tuple[Relayd, Sink]) -> None:
    relayd, _ = world
    reply = (
        f"From: postmaster-team@ops.test\r\nTo: postmaster@{INBOUND}\r\n"
        "Subject: Out of office: [relayd inbox 1 complaint-text] Stop sending me your newsletter\r\n"
        "Auto-Submitted: auto-replied\r\n\r\nI am away until Monday.\r\n"
    ).encode()
    assert send(relayd, reply, f"postmaster@{INBOUND}", "postmaster-team@ops.test") == 250
    item = item_by_subject(
        relayd, "Out of office: [relayd inbox 1 complaint-text] Stop sending me your newsletter"
    )
    assert item is not None and item["kind"] == "provider-notice"
    assert f"inbox item {item['id']} forwarded" not in relayd.log_text()


def test_a_large_message_is_kept_truncated_and_says_so(world: tuple[Relayd, Sink]) -> None:
    relayd, _ = world
    body = b"".join(b"line %06d of a very long complaint\r\n" % i for i in range(20_000))  # ~700 KB
    big = f"From: Big <big@reporter.test>\r\nTo: abuse@{INBOUND}\r\nSubject: big one\r\n\r\n".encode() + body
    assert send(relayd, big, f"abuse@{INBOUND}", "big@reporter.test") == 250
    item = item_by_subject(relayd, "big one")
    assert item is not None and item["truncated"] and item["size"] == len(big)
    shown = relayd.cli("inbox", "show", str(item["id"]))
    assert f"only the first {MAX_RAW} were kept" in shown.stdout
    raw = relayd.cli("inbox", "show", str(item["id"]), "--raw")
    assert len(raw.stdout.encode()) <= MAX_RAW


def test_control_characters_never_reach_the_terminal(world: tuple[Relayd, Sink]) -> None:
    relayd, _ = world
    evil = (
        f"From: x@reporter.test\r\nTo: abuse@{INBOUND}\r\n"
        "Subject: hi\x1b]0;owned\x07 there\r\n\r\n\x1b[2Jgone\r\n"
    )
    assert send(relayd, evil.encode(), f"abuse@{INBOUND}", "x@reporter.test") == 250
    listed = relayd.cli("inbox", "list", "--kind", "complaint-text")
    assert "\x1b" not in listed.stdout and "hi?]0;owned? there" in listed.stdout
    item = next(i for i in items(relayd) if i["subject"].startswith("hi"))
    shown = relayd.cli("inbox", "show", str(item["id"]))
    assert "\x1b" not in shown.stdout and "?[2Jgone" in shown.stdout


def test_open_items_are_a_gauge(world: tuple[Relayd, Sink]) -> None:
    import urllib.request

    relayd, _ = world
    assert (
        send(relayd, COMPLAINT.replace(b"newsletter", b"gauge"), f"abuse@{INBOUND}", "jane@reporter.test")
        == 250
    )
    open_items = len(items(relayd, "--state", "open"))
    url = f"http://127.0.0.1:{relayd.http_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    assert f"relayd_inbox_open_items {float(open_items)}" in text


# -- config --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (f"abuse@{INBOUND}", "is at an inbound domain of relayd: the forward would come back"),
        (f"ops@{INBOUND.upper()}", "is at an inbound domain of relayd"),
        ("not an address", "not a mail address"),
    ],
)
def test_a_forward_address_of_our_own_or_no_address_is_a_config_error(
    tmp_path: Path, value: str, problem: str
) -> None:
    r = Relayd(tmp_path, routes={"example.test": 25})
    _set_inbound(r, f'postmaster_forward = "{value}"')
    out = subprocess.run(
        [*RELAYD, "check-config", "--config", str(r.config)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert f"{r.config}: inbound.postmaster_forward: " in out.stderr and problem in out.stderr


def test_keep_inbox_is_a_duration(tmp_path: Path) -> None:
    r = Relayd(tmp_path, routes={"example.test": 25})
    _set_inbound(r, 'keep_inbox = "soon"')
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.load(r.config)
    assert any(p.startswith(f"{r.config}: inbound.keep_inbox: ") for p in err.value.problems)
    _set_inbound(r, 'keep_inbox = "14d"')
    text = r.config.read_text().replace('keep_inbox = "soon"\n', "")
    r.config.write_text(text)
    assert config_mod.load(r.config).inbound.keep_inbox == 14 * 86400


# -- the store, both backends --------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s = _make_store(request.param, tmp_path)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def test_items_are_capped_per_source_and_hour(store: Store) -> None:
    for n in range(PER_SOURCE_HOUR):
        kept = await inbox.keep(
            store, COMPLAINT, Kind.COMPLAINT_TEXT, T0 + timedelta(seconds=n), source="ip:a"
        )
        assert kept.item is not None and kept.item.id > 0
    over = await inbox.keep(store, COMPLAINT, Kind.COMPLAINT_TEXT, T0 + timedelta(minutes=30), source="ip:a")
    assert over.item is None and over.capped
    other = await inbox.keep(store, COMPLAINT, Kind.COMPLAINT_TEXT, T0 + timedelta(minutes=30), source="ip:b")
    assert other.item is not None  # another source is not held up
    later = await inbox.keep(store, COMPLAINT, Kind.COMPLAINT_TEXT, T0 + timedelta(hours=2), source="ip:a")
    assert later.item is not None  # the next hour, the source may again
    assert await store.count_open_inbox() == PER_SOURCE_HOUR + 2


async def test_store_keeps_raw_bytes_and_marks_done(store: Store) -> None:
    kept = await inbox.keep(
        store, COMPLAINT, Kind.COMPLAINT_TEXT, T0, source="ip:a", mail_from="jane@reporter.test"
    )
    assert kept.item is not None
    got = await store.get_inbox_item(kept.item.id)
    assert got is not None and got.raw == COMPLAINT and not got.truncated
    assert (got.subject, got.from_header, got.kind) == (
        "Stop sending me your newsletter",
        "Jane Doe <jane@reporter.test>",
        "complaint-text",
    )
    assert await store.mark_inbox_done(kept.item.id, T0 + timedelta(hours=1))
    assert not await store.mark_inbox_done(kept.item.id + 1000, T0)
    done = await store.get_inbox_item(kept.item.id)
    assert done is not None and done.state == "done" and done.done_at == T0 + timedelta(hours=1)
    assert await store.count_open_inbox() == 0
    assert [i.id for i in await store.inbox_items(state="done")] == [kept.item.id]
    assert await store.inbox_items(kind="provider-notice") == []
    assert await store.inbox_items(since=T0 + timedelta(days=1)) == []


async def test_keep_inbox_prunes_items_and_dmarc_counts(store: Store, tmp_path: Path) -> None:
    r = Relayd(tmp_path, routes={"example.test": 25})
    _set_inbound(r, 'keep_inbox = "90d"')
    cfg = config_mod.load(r.config)
    await inbox.keep(store, COMPLAINT, Kind.COMPLAINT_TEXT, T0, source="ip:a")
    newer = await inbox.keep(store, COMPLAINT, Kind.COMPLAINT_TEXT, T0 + timedelta(days=10), source="ip:a")
    count = DmarcCount(
        "acme.example.test", T0.date(), "google.com", "g-1", "192.0.2.10", 5, 5, 5, 5, 5, 5, 0, 0
    )
    assert await store.add_dmarc_report("google.com", "g-1", "acme.example.test", T0, [count])
    pruned = await retention.prune(store, cfg, now=T0 + timedelta(days=89))
    assert (pruned.inbox, pruned.dmarc) == (0, 0)
    pruned = await retention.prune(store, cfg, now=T0 + timedelta(days=95))
    assert (pruned.inbox, pruned.dmarc) == (1, 1)
    assert newer.item is not None
    assert [i.id for i in await store.inbox_items()] == [newer.item.id]  # an open item goes too, when old
    assert await store.dmarc_counts("acme.example.test", T0.date() - timedelta(days=1)) == []
