"""Missing header fields on submission, end to end: a real ``relayd serve``, smtplib as the app, a real sink.

A message without ``Date:`` or ``Message-ID:`` (what an app that writes its message by hand sends) is
delivered with both: ``Date`` the time of acceptance, ``Message-ID: <queue-id@[server] hostname>``, once
each, covered by the DKIM signature, the same in every copy (also one made again after a restart). A
message with its own keeps them byte for byte, an empty one included. A message without ``From:`` is
refused with ``550 5.6.0`` and nothing is queued.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path

import dkim as dkimpy
import pytest

from tests.dkimverify import records_from_zone_lines, verify_dkimpy
from tests.harness import (
    PASSWORD,
    RELAYD,
    Received,
    Relayd,
    Sink,
    split_fields,
    submit_each,
    wait_until,
)

DOMAIN = "acme.example.test"
SELECTOR = "mh2026"
HOSTNAME = "relayd.test"  # [server] hostname of tests.harness.config_text


@dataclass(frozen=True)
class Setup:
    relayd: Relayd
    sink: Sink
    records: dict[str, str]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("missing-headers")
    out = subprocess.run(
        [*RELAYD, "dkim", "keygen", "--domain", DOMAIN, "--selector", SELECTOR, "--algorithm", "rsa",
         "--out-dir", str(tmp / "keys")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    records = records_from_zone_lines(out.stdout.splitlines())
    dkim_config = (
        f'\n[[dkim]]\ndomain = "{DOMAIN}"\nselector = "{SELECTOR}"\n'
        f'key_file = "{tmp}/keys/{DOMAIN}.{SELECTOR}.rsa.pem"\nalgorithm = "rsa"\n'
    )
    with Sink() as sink, Relayd(tmp, routes={"example.test": sink.port}, extra=dkim_config) as relayd:
        yield Setup(relayd, sink, records)


def bare(subject: str, *, extra: str = "", sender: str = "From: App <app@acme.example.test>\r\n") -> bytes:
    """A message as an app writes it by hand: From, To, Subject, no Date, no Message-ID."""
    return (
        f"{sender}To: Bob <bob@example.test>\r\nSubject: {subject}\r\n{extra}"
        "Content-Type: text/plain; charset=utf-8\r\n\r\nHello there.\r\n"
    ).encode()


def deliver(setup: Setup, raw: bytes, to: list[str]) -> tuple[str, list[Received]]:
    """Submit ``raw`` with smtplib; (queue id from the 250 reply, the copy each recipient got)."""
    tx = submit_each(setup.relayd, raw, to=to)
    assert tx.data is not None and tx.data[0] == 250, tx
    sink = setup.sink
    assert wait_until(lambda: all(any(r in m.rcpt_tos for m in sink.messages) for r in to))
    return tx.queue_id, [next(m for m in sink.messages if r in m.rcpt_tos) for r in to]


def fields(data: bytes, name: bytes) -> list[bytes]:
    """Every header field called ``name`` (lower case) of a delivered copy, without its name, stripped."""
    head = data.partition(b"\r\n\r\n")[0] + b"\r\n"
    out = []
    for field in split_fields(head):
        key, _, value = field.partition(b":")
        if key.strip().lower() == name:
            out.append(value.strip())
    return out


def test_message_without_date_and_message_id_arrives_with_both(setup: Setup) -> None:
    raw = bare("no date, no id")
    qid, copies = deliver(setup, raw, ["nodate-1@example.test", "nodate-2@example.test"])
    for copy in copies:
        assert fields(copy.data, b"message-id") == [f"<{qid}@{HOSTNAME}>".encode()]
        [date] = fields(copy.data, b"date")
        sent = parsedate_to_datetime(date.decode())
        assert sent.tzinfo is not None and abs(datetime.now(UTC) - sent) < timedelta(days=1)
        # the app's header block stays one untouched slice
        assert raw.partition(b"\r\n\r\n")[0] + b"\r\n" in copy.data
    # every copy of the message carries the same two fields
    assert len({tuple(fields(c.data, b"date")) for c in copies}) == 1


def test_added_date_and_message_id_are_covered_by_the_dkim_signature(setup: Setup) -> None:
    _, [copy] = deliver(setup, bare("signed"), ["nodate-signed@example.test"])
    [signature] = [v for n, v in dkimpy.DKIM(copy.data).headers if n.lower() == b"dkim-signature"]
    signed = {h.strip().lower() for h in dkimpy.util.parse_tag_value(signature)[b"h"].split(b":")}
    assert {b"date", b"message-id"} <= signed, signed
    assert verify_dkimpy(copy.data, setup.records, DOMAIN) == {SELECTOR: "pass"}
    # and they really are covered: another Date or Message-ID breaks the signature
    [date] = fields(copy.data, b"date")
    [msgid] = fields(copy.data, b"message-id")
    for old, new in ((date, b"Thu, 01 Jan 2026 00:00:00 +0000"), (msgid, b"<other@relayd.test>")):
        assert verify_dkimpy(copy.data.replace(old, new, 1), setup.records, DOMAIN) == {SELECTOR: "fail"}


def test_message_with_its_own_date_and_message_id_keeps_them_unchanged(setup: Setup) -> None:
    own = "Date: Tue, 1 Dec 2026 09:30:00 -0500\r\nMessage-ID:\r\n  <own.1@acme.example.test>\r\n"
    _, [copy] = deliver(setup, bare("own fields", extra=own), ["own-1@example.test"])
    head = copy.data.partition(b"\r\n\r\n")[0] + b"\r\n"
    assert own.encode() in head
    assert fields(copy.data, b"date") == [b"Tue, 1 Dec 2026 09:30:00 -0500"]
    assert fields(copy.data, b"message-id") == [b"<own.1@acme.example.test>"]


def test_empty_message_id_is_left_as_sent_and_only_date_is_added(setup: Setup) -> None:
    qid, [copy] = deliver(setup, bare("empty id", extra="Message-ID:\r\n"), ["empty-id@example.test"])
    assert fields(copy.data, b"message-id") == [b""]
    assert f"{qid}@{HOSTNAME}".encode() not in copy.data.partition(b"\r\n\r\n")[0]
    assert len(fields(copy.data, b"date")) == 1


def test_message_without_from_gets_550_5_6_0_and_nothing_is_queued(tmp_path: Path, sink: Sink) -> None:
    with Relayd(tmp_path, routes={"example.test": sink.port}) as relayd:
        with relayd.smtp() as s:
            s.login("acme", PASSWORD)
            assert s.mail("app@acme.example.test")[0] == 250
            assert s.rcpt("bob@example.test")[0] == 250
            code, resp = s.data(bare("no from", sender=""))
            assert (code, resp) == (
                550,
                b"5.6.0 Message refused: no From header field (RFC 5322 \xc2\xa73.6)",
            )
            assert s.noop()[0] == 250  # the session goes on
        out = relayd.cli("queue", "list")
        assert out.returncode == 0 and out.stdout == "", out.stdout + out.stderr


def test_copy_made_again_after_a_restart_has_the_same_date_and_message_id(tmp_path: Path, sink: Sink) -> None:
    later = "later@example.test"
    sink.handler.script[later] = ["451 4.7.1 try later"]
    relayd = Relayd(tmp_path, routes={"example.test": sink.port})
    with relayd:
        tx = submit_each(relayd, bare("restart"), to=["now@example.test", later])
        assert tx.data is not None and tx.data[0] == 250, tx
        assert wait_until(lambda: sink.handler.count() == 1 and sink.handler.attempts.get(later, 0) >= 1)
        relayd.stop()
        sink.handler.script[later] = ["250 2.1.5 OK"]
        relayd.start()  # a new process: the copy is prepared again from the queued message
        assert wait_until(lambda: sink.handler.count() == 2)
    first, again = sink.messages
    assert first.rcpt_tos == ["now@example.test"] and again.rcpt_tos == [later]
    for name in (b"date", b"message-id"):
        assert fields(again.data, name) == fields(first.data, name) and len(fields(first.data, name)) == 1
    assert fields(again.data, b"message-id") == [f"<{tx.queue_id}@{HOSTNAME}>".encode()]


def test_from_written_with_a_space_before_the_colon_is_refused_not_passed_unchecked(setup: Setup) -> None:
    """``From :`` (RFC 5322 §4.5 obs-syntax) is a From field to many readers, and DKIM signs it as one; the
    From check doesn't read it, so it must not count as a message with a checked From either."""
    raw = bare("obs from", sender="From : CEO <ceo@beta.example>\r\n")
    tx = submit_each(setup.relayd, raw, to=["obs-from@example.test"])
    assert tx.data is not None and tx.data[0] == 550 and tx.data[1].startswith("5.6.0"), tx
