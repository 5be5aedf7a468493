"""Transactional mail end to end: a real ``relayd serve``, smtplib as the app, an aiosmtpd sink, a webhook
receiver and the /metrics endpoint.

acme may send ``X-Relayd-Class: transactional`` (``transactional = true``), other may not. Such a message
reaches a person who unsubscribed from acme's mail (at submission and while it waits in the queue), with
no List-Unsubscribe, no unsubscribe link, the imprint, no X-Relayd-Class field and a DKIM signature that
verifies; it is not held back by caps or consent; but a hard bounce, a complaint, a discard pattern still
stop it. Events, webhooks and the accepted-recipients metric carry the class.

Each test uses addresses of its own; the daemon (retry schedule 1 h) is shared by the module, so a deferred
recipient waits until the test runs ``relayd queue retry``.
"""

from __future__ import annotations

import http.server
import json
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relayd.edge.webhooks import SIGNATURE_HEADER, verify
from relayd.policy.rules.messageclass import strip_class_field
from relayd.policy.rules.suppression import transactional_passes
from relayd.store.models import Reason, Scope, SuppressionEntry
from tests.dkimverify import records_from_zone_lines, verify_dkimpy
from tests.harness import (
    PASSWORD_HASH,
    RELAYD,
    Received,
    Relayd,
    Sink,
    cli_json,
    submit_each,
    wait_until,
)

DOMAIN = "acme.example.test"
SELECTOR = "tx2026"
IMPRINT = "ACME Ltd, 1 Test Street"
NEWS = "News <news.acme.example.test>"  # caps = { day = 1 }
PROMO = "Promo <promo.acme.example.test>"  # require_consent = true
HOOK_SECRET = b"transactional-hook-secret"

_HEADERS = BytesHeaderParser(policy=compat32)


class HookReceiver:
    """A webhook endpoint (stdlib HTTP server in a thread) keeping every correctly signed payload."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if verify(HOOK_SECRET, body, self.headers.get(SIGNATURE_HEADER, "")):
                    with receiver.lock:
                        receiver.events.append(json.loads(body))
                    self.send_response(200)
                else:
                    self.send_response(401)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def __enter__(self) -> HookReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def of(self, queue_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [e for e in self.events if e["queue_id"] == queue_id]


@dataclass(frozen=True)
class Setup:
    relayd: Relayd
    sink: Sink
    hooks: HookReceiver
    records: dict[str, str]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("transactional")
    out = subprocess.run(
        [*RELAYD, "dkim", "keygen", "--domain", DOMAIN, "--selector", SELECTOR, "--algorithm", "rsa",
         "--out-dir", str(tmp / "keys")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    records = records_from_zone_lines(out.stdout.splitlines())
    hook_secret = tmp / "hook.secret"
    hook_secret.write_bytes(HOOK_SECRET + b"\n")
    hook_secret.chmod(0o600)
    with HookReceiver() as hooks:
        extra = f"""
[policy]
discard_patterns = ["noreply-*@example.test"]

[[dkim]]
domain = "{DOMAIN}"
selector = "{SELECTOR}"
key_file = "{tmp}/keys/{DOMAIN}.{SELECTOR}.rsa.pem"
algorithm = "rsa"
"""
        accounts = f"""
[accounts.acme]
password_hash = "{PASSWORD_HASH}"
domains = ["acme.example.test"]
imprint = "{IMPRINT}"
transactional = true
webhooks = [{{ url = "{hooks.url}", secret_file = "{hook_secret}" }}]

[accounts.acme.lists.news]
caps = {{ day = 1 }}

[accounts.acme.lists.promo]
require_consent = true

[accounts.other]
password_hash = "{PASSWORD_HASH}"
domains = ["other.example.test"]
imprint = "Other Ltd"
"""
        with (
            Sink() as sink,
            Relayd(
                tmp,
                routes={"example.test": sink.port},
                extra=extra,
                accounts=accounts,
                retry_schedule='["1h"]',
            ) as relayd,
        ):
            yield Setup(relayd, sink, hooks, records)


def make_message(
    subject: str,
    *,
    klass: str | None = "transactional",
    list_id: str | None = None,
    sender: str = "app@acme.example.test",
    extra: str = "",
) -> bytes:
    fields = f"X-Relayd-Class: {klass}\r\n" if klass is not None else ""
    if list_id:
        fields += f"List-Id: {list_id}\r\n"
    return (
        f"From: App <{sender}>\r\nTo: Person <person@example.test>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@tx.example.test>\r\n"
        f"Date: Mon, 07 Dec 2026 12:00:00 +0000\r\n{fields}{extra}MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\nYour reset code is 123456.\r\n"
    ).encode()


def received_by(sink: Sink, address: str) -> list[Received]:
    return [m for m in sink.messages if address in m.rcpt_tos]


def subjects(sink: Sink, address: str) -> list[str]:
    return sorted(str(_HEADERS.parsebytes(m.data)["Subject"]) for m in received_by(sink, address))


def wait_subjects(sink: Sink, address: str, n: int) -> list[str]:
    assert wait_until(lambda: len(received_by(sink, address)) >= n), subjects(sink, address)
    return subjects(sink, address)


def suppress(relayd: Relayd, *args: str) -> None:
    out = relayd.cli("suppress", "add", *args)
    assert out.returncode == 0, out.stdout + out.stderr


def queue_state(relayd: Relayd, queue_id: str) -> dict[str, dict[str, Any]]:
    [row] = cli_json(relayd, "queue", "show", queue_id)
    return {r["address"]: r for r in row["recipients"]}


def events_of(relayd: Relayd, queue_id: str) -> list[dict[str, Any]]:
    return [e for e in cli_json(relayd, "events") if e["queue_id"] == queue_id]


def header_names(data: bytes) -> list[str]:
    return [k.lower() for k in _HEADERS.parsebytes(data)]


def body_text(data: bytes) -> str:
    return data.partition(b"\r\n\r\n")[2].decode()


def one_click(url: str) -> int:
    request = urllib.request.Request(
        url,
        data=b"List-Unsubscribe=One-Click",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        return int(resp.status)


def unsubscribe_url(data: bytes) -> str:
    value = " ".join(str(_HEADERS.parsebytes(data)["List-Unsubscribe"]).split())
    return value.split("<", 1)[1].split(">", 1)[0]


def scrape(relayd: Relayd) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    url = f"http://127.0.0.1:{relayd.http_port}/metrics"
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


# --- an account unsubscribe: the transactional message goes, the bulk one does not --------------------------


def test_account_unsubscriber_receives_transactional_mail_without_unsubscribe_link(setup: Setup) -> None:
    relayd, sink = setup.relayd, setup.sink
    person = "tx-unsub@example.test"
    suppress(relayd, person, "--scope", "account", "--account", "acme", "--reason", "unsubscribe")

    tx = submit_each(relayd, make_message("password reset"), to=[person])
    assert tx.rcpt[person][0] == 250 and tx.data is not None and tx.data[0] == 250, tx
    assert wait_subjects(sink, person, 1) == ["password reset"]
    [copy] = received_by(sink, person)

    names = header_names(copy.data)
    assert "list-unsubscribe" not in names and "list-unsubscribe-post" not in names
    assert "x-relayd-class" not in names and b"X-Relayd-Class" not in copy.data
    assert "x-relayd-id" in names and "feedback-id" in names  # still attributable
    body = body_text(copy.data)
    assert IMPRINT in body and "Unsubscribe" not in body and "/u/" not in body
    assert verify_dkimpy(copy.data, setup.records, DOMAIN) == {SELECTOR: "pass"}


def test_account_unsubscriber_does_not_receive_bulk_mail(setup: Setup) -> None:
    relayd, sink = setup.relayd, setup.sink
    person = "bulk-unsub@example.test"
    suppress(relayd, person, "--scope", "account", "--account", "acme", "--reason", "unsubscribe")

    for klass in (None, "bulk", " BULK "):  # absent, and the bulk class named (any case, blanks)
        tx = submit_each(relayd, make_message(f"newsletter {klass}", klass=klass), to=[person])
        assert tx.data is not None and tx.data[0] == 550, tx
        assert "suppressed:unsubscribe" in tx.data[1]
    # the bulk copy of a message with a list, next to a recipient who gets it
    other = "bulk-unsub-other@example.test"
    tx = submit_each(relayd, make_message("news", klass="bulk", list_id=NEWS), to=[person, other])
    assert tx.data is not None and tx.data[0] == 250, tx
    assert wait_subjects(sink, other, 1) == ["news"]
    [copy] = received_by(sink, other)
    assert "list-unsubscribe" in header_names(copy.data) and b"X-Relayd-Class" not in copy.data
    assert received_by(sink, person) == []


# --- what still stops transactional mail --------------------------------------------------------------------


def test_hard_bounce_and_account_complaint_refuse_transactional_mail(setup: Setup) -> None:
    relayd = setup.relayd
    bounced, complained = "tx-bounced@example.test", "tx-complained@example.test"
    suppress(relayd, bounced, "--scope", "global", "--reason", "hard_bounce")
    suppress(relayd, complained, "--scope", "account", "--account", "acme", "--reason", "complaint")

    tx = submit_each(relayd, make_message("reset for the bounced"), to=[bounced, complained])
    assert tx.rcpt[bounced] == (550, f"5.7.1 <{bounced}>: suppressed (hard_bounce)")
    assert tx.rcpt[complained] == (550, f"5.7.1 <{complained}>: suppressed (complaint)")
    assert tx.data is None


def test_unsubscribe_click_after_a_complaint_does_not_let_transactional_mail_through(setup: Setup) -> None:
    relayd, sink = setup.relayd, setup.sink
    person = "tx-complaint-click@example.test"
    assert submit_each(relayd, make_message("old bulk", klass=None), to=[person]).data is not None
    assert wait_subjects(sink, person, 1) == ["old bulk"]
    [old] = received_by(sink, person)
    suppress(relayd, person, "--scope", "account", "--account", "acme", "--reason", "complaint")

    assert one_click(unsubscribe_url(old.data)) == 200  # the old message's link, clicked after complaining
    tx = submit_each(relayd, make_message("reset after complaint"), to=[person])
    assert tx.rcpt[person] == (550, f"5.7.1 <{person}>: suppressed (complaint)")


def test_list_entry_under_an_account_unsubscribe_still_stops_transactional_mail(setup: Setup) -> None:
    relayd = setup.relayd
    person = "tx-manual@example.test"
    suppress(relayd, person, "--scope", "account", "--account", "acme", "--reason", "unsubscribe")
    suppress(relayd, person, "--scope", "list", "--account", "acme", "--list", "news", "--reason", "manual")

    tx = submit_each(relayd, make_message("reset with a list", list_id=NEWS), to=[person])
    assert tx.data is not None and tx.data[0] == 550 and "suppressed:manual" in tx.data[1], tx


def test_discard_pattern_refuses_transactional_mail(setup: Setup) -> None:
    relayd = setup.relayd
    person = "noreply-tx@example.test"
    tx = submit_each(relayd, make_message("reset to a discarded address"), to=[person])
    assert tx.rcpt[person][0] == 550 and tx.data is None, tx


# --- who may mark mail transactional, and how ---------------------------------------------------------------


def test_account_without_transactional_gets_550_5_7_1(setup: Setup) -> None:
    relayd, sink = setup.relayd, setup.sink
    person = "tx-other@example.test"
    raw = make_message("other's reset", sender="app@other.example.test")
    tx = submit_each(relayd, raw, to=[person], sender="app@other.example.test", user="other")
    assert tx.data == (550, "5.7.1 X-Relayd-Class: account other may not send transactional mail"), tx
    # the same account's bulk mail, the class named, goes as before
    raw = make_message("other's news", klass="bulk", sender="app@other.example.test")
    tx = submit_each(relayd, raw, to=[person], sender="app@other.example.test", user="other")
    assert tx.data is not None and tx.data[0] == 250, tx
    assert wait_subjects(sink, person, 1) == ["other's news"]


@pytest.mark.parametrize(
    ("name", "fields"),
    [
        ("unknown", "X-Relayd-Class: urgent\r\n"),
        ("empty", "X-Relayd-Class: \r\n"),
        ("two", "X-Relayd-Class: transactional\r\nX-Relayd-Class: transactional\r\n"),
        ("two-different", "X-Relayd-Class: bulk\r\nx-relayd-class: transactional\r\n"),
        ("confirmation-mail", "X-Relayd-Class: transactional\r\nX-Relayd-Optin: news\r\n"),
    ],
)
def test_bad_class_field_gets_550_5_6_0(setup: Setup, name: str, fields: str) -> None:
    relayd, sink = setup.relayd, setup.sink
    person = f"tx-bad-{name}@example.test"
    tx = submit_each(relayd, make_message(f"bad {name}", klass=None, extra=fields), to=[person])
    assert tx.data is not None and tx.data[0] == 550 and tx.data[1].startswith("5.6.0 X-Relayd-Class: "), tx
    assert received_by(sink, person) == []


def test_class_value_is_case_insensitive_and_trimmed(setup: Setup) -> None:
    relayd, sink = setup.relayd, setup.sink
    person = "tx-case@example.test"
    suppress(relayd, person, "--scope", "account", "--account", "acme", "--reason", "unsubscribe")
    tx = submit_each(relayd, make_message("reset in capitals", klass="  TransActional "), to=[person])
    assert tx.data is not None and tx.data[0] == 250, tx
    assert wait_subjects(sink, person, 1) == ["reset in capitals"]
    [copy] = received_by(sink, person)
    assert b"X-Relayd-Class" not in copy.data and "list-unsubscribe" not in header_names(copy.data)


# --- caps and consent ---------------------------------------------------------------------------------------


def test_caps_and_consent_do_not_hold_transactional_mail(setup: Setup) -> None:
    relayd, sink = setup.relayd, setup.sink
    person = "tx-caps@example.test"
    for n in range(3):  # news has a cap of one a day
        tx = submit_each(relayd, make_message(f"receipt {n}", list_id=NEWS), to=[person])
        assert tx.data is not None and tx.data[0] == 250, tx
    # promo requires consent, which this person never gave
    tx = submit_each(relayd, make_message("promo receipt", list_id=PROMO), to=[person])
    assert tx.data is not None and tx.data[0] == 250, tx
    assert wait_subjects(sink, person, 4) == ["promo receipt", "receipt 0", "receipt 1", "receipt 2"]

    # and they did not count against the cap: the first bulk news of the day still goes, the second not
    first = submit_each(relayd, make_message("news 1", klass="bulk", list_id=NEWS), to=[person])
    second = submit_each(relayd, make_message("news 2", klass="bulk", list_id=NEWS), to=[person])
    promo = submit_each(relayd, make_message("promo", klass="bulk", list_id=PROMO), to=[person])
    assert first.data is not None and first.data[0] == 250, first
    assert second.data is not None and second.data == (550, "5.7.1 all recipients dropped by policy (cap)")
    assert promo.data is not None and promo.data[0] == 550 and "no_consent" in promo.data[1], promo
    assert wait_subjects(sink, person, 5) == [
        "news 1",
        "promo receipt",
        "receipt 0",
        "receipt 1",
        "receipt 2",
    ]


# --- unsubscribed while the message waits in the queue ------------------------------------------------------


def _deferred(setup: Setup, raw: bytes, person: str) -> str:
    """Submit ``raw`` to ``person`` and wait for its first attempt (deferred by the sink's script)."""
    relayd = setup.relayd
    qid = submit_each(relayd, raw, to=[person]).queue_id
    assert wait_until(lambda: queue_state(relayd, qid)[person]["attempts"] == 1)
    assert queue_state(relayd, qid)[person]["state"] == "queued"
    return qid


def test_unsubscribe_at_dequeue_drops_bulk_but_not_transactional(setup: Setup) -> None:
    relayd, sink = setup.relayd, setup.sink
    person = "tx-dequeue@example.test"
    sink.handler.script[person] = ["451 4.7.1 try later", "451 4.7.1 try later", "250 2.1.5 OK"]
    bulk = _deferred(setup, make_message("queued bulk", klass=None), person)
    tx = _deferred(setup, make_message("queued reset"), person)

    # written straight to the store: only the dequeue check can stop the queued mail
    suppress(relayd, person, "--scope", "account", "--account", "acme", "--reason", "unsubscribe")
    for qid in (bulk, tx):
        assert relayd.cli("queue", "retry", qid).returncode == 0
    assert wait_until(lambda: queue_state(relayd, tx)[person]["state"] == "delivered")
    assert wait_until(lambda: queue_state(relayd, bulk)[person]["state"] == "dropped")
    assert subjects(sink, person) == ["queued reset"]
    [dropped] = [e for e in events_of(relayd, bulk) if e["kind"] == "dropped"]
    assert dropped["reason"] == "suppressed:unsubscribe"


def test_queue_cat_shows_the_transactional_copy_as_delivery_makes_it(setup: Setup) -> None:
    relayd, sink = setup.relayd, setup.sink
    person = "tx-cat@example.test"
    sink.handler.script[person] = ["451 4.7.1 try later"]
    qid = _deferred(setup, make_message("reset waiting"), person)
    out = relayd.cli("queue", "cat", qid)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Subject: reset waiting" in out.stdout and IMPRINT in out.stdout
    assert "List-Unsubscribe" not in out.stdout and "X-Relayd-Class" not in out.stdout


def test_one_click_unsubscribe_while_queued_keeps_transactional_mail(setup: Setup) -> None:
    relayd, sink = setup.relayd, setup.sink
    person = "tx-oneclick@example.test"
    sink.handler.script[person] = [
        "250 2.1.5 OK",
        "451 4.7.1 try later",
        "451 4.7.1 try later",
        "250 2.1.5 OK",
    ]
    # a first bulk message (no list: its link unsubscribes from all of acme's mail) is delivered
    assert submit_each(relayd, make_message("first bulk", klass=None), to=[person]).data is not None
    assert wait_subjects(sink, person, 1) == ["first bulk"]
    [first] = received_by(sink, person)
    bulk = _deferred(setup, make_message("bulk after", klass=None), person)
    tx = _deferred(setup, make_message("reset after"), person)

    assert one_click(unsubscribe_url(first.data)) == 200
    assert queue_state(relayd, bulk)[person]["state"] == "dropped"  # taken out of the queue at once
    assert queue_state(relayd, tx)[person]["state"] == "queued"
    for qid in (bulk, tx):
        assert relayd.cli("queue", "retry", qid).returncode == 0
    assert wait_until(lambda: queue_state(relayd, tx)[person]["state"] == "delivered")
    assert subjects(sink, person) == ["first bulk", "reset after"]
    assert queue_state(relayd, bulk)[person]["state"] == "dropped"


# --- events, webhooks and the metric carry the class --------------------------------------------------------


def test_events_webhooks_and_metric_carry_the_class(setup: Setup) -> None:
    relayd, sink, hooks = setup.relayd, setup.sink, setup.hooks
    before = scrape(relayd)
    person = "tx-events@example.test"
    tx = submit_each(relayd, make_message("reset with events"), to=[person]).queue_id
    bulk = submit_each(relayd, make_message("bulk with events", klass=None), to=[person]).queue_id
    assert wait_subjects(sink, person, 2) == ["bulk with events", "reset with events"]

    for qid, klass in ((tx, "transactional"), (bulk, "bulk")):
        assert wait_until(lambda: any(e["kind"] == "delivered" for e in events_of(relayd, qid)))  # noqa: B023
        [event] = [e for e in events_of(relayd, qid) if e["kind"] == "delivered"]
        assert event["evidence"]["class"] == klass
        assert wait_until(lambda: len(hooks.of(qid)) == 1)  # noqa: B023
        [doc] = hooks.of(qid)
        assert (doc["event"], doc["recipient"], doc["evidence"]["class"]) == ("delivered", person, klass)
    assert f"{tx}: accepted account=acme" in relayd.log_text()
    assert "class=transactional" in next(
        line for line in relayd.log_text().splitlines() if f"{tx}: accepted" in line
    )

    after = scrape(relayd)

    def sent(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], klass: str) -> float:
        return m.get(("relayd_account_sent_total", (("account", "acme"), ("class", klass))), 0.0)

    assert sent(after, "transactional") - sent(before, "transactional") == 1
    assert sent(after, "bulk") - sent(before, "bulk") == 1
    classes = {dict(labels).get("class") for name, labels in after if name == "relayd_account_sent_total"}
    assert classes <= {"bulk", "transactional"}


def test_bounce_of_transactional_mail_is_an_event_with_the_class_and_suppresses(setup: Setup) -> None:
    relayd, sink = setup.relayd, setup.sink
    person = "tx-bounce@example.test"
    sink.handler.script[person] = ["550 5.1.1 <tx-bounce@example.test>: user unknown"]
    qid = submit_each(relayd, make_message("reset to nobody"), to=[person]).queue_id
    assert wait_until(lambda: any(e["kind"] == "bounced" for e in events_of(relayd, qid)))
    [event] = [e for e in events_of(relayd, qid) if e["kind"] == "bounced"]
    assert event["evidence"]["class"] == "transactional"
    # a hard bounce suppresses globally, transactional mail or not: the next reset is refused at RCPT
    tx = submit_each(relayd, make_message("second reset to nobody"), to=[person])
    assert tx.rcpt[person] == (550, f"5.7.1 <{person}>: suppressed (hard_bounce)")


def test_config_rejects_a_non_boolean_transactional(tmp_path: Path) -> None:
    config = tmp_path / "relayd.toml"
    config.write_text(
        f'[accounts.acme]\npassword_hash = "{PASSWORD_HASH}"\ndomains = ["acme.example.test"]\n'
        'transactional = "sometimes"\n'
    )
    out = subprocess.run(
        [*RELAYD, "check-config", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"{config}: accounts.acme.transactional: " in out.stdout + out.stderr


# --- the pieces, without a daemon ---------------------------------------------------------------------------


def test_strip_class_field_removes_only_the_top_level_field_with_its_folding() -> None:
    raw = (
        b"From: a@acme.example.test\r\nX-Relayd-Class :\r\n transactional\r\nSubject: s\r\n"
        b"x-relayd-class: bulk\r\n\r\nX-Relayd-Class: transactional\r\nbody\r\n"
    )
    assert strip_class_field(raw) == (
        b"From: a@acme.example.test\r\nSubject: s\r\n\r\nX-Relayd-Class: transactional\r\nbody\r\n"
    )
    bare_lf = b"From: a\nX-Relayd-Class: transactional\nSubject: s\n\nbody\n"
    assert strip_class_field(bare_lf) == b"From: a\nSubject: s\n\nbody\n"
    untouched = b"From: a\r\nX-Relayd-Classic: yes\r\n\r\nbody\r\n"
    assert strip_class_field(untouched) is untouched


@pytest.mark.parametrize(
    ("scope", "reason", "passes"),
    [
        ("account", "unsubscribe", True),
        ("list", "unsubscribe", True),
        ("global", "unsubscribe", False),
        ("account", "complaint", False),
        ("list", "complaint", False),
        ("global", "hard_bounce", False),
        ("global", "spamtrap", False),
        ("account", "manual", False),
        ("list", "manual", False),
        ("global", "discard", False),
        ("global", "soft_bounce_limit", False),
    ],
)
def test_transactional_passes_only_list_and_account_unsubscribes(
    scope: str, reason: str, passes: bool
) -> None:
    entry = SuppressionEntry(
        "p@example.test",
        Scope(scope),
        None if scope == "global" else "acme",
        "news" if scope == "list" else None,
        Reason(reason),
        "test",
        datetime.now(UTC),
    )
    assert transactional_passes(entry) is passes
