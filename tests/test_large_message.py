"""Big messages go through relayd without being copied or decoded: what that relies on.

- the rewrite reads the MIME structure from a skeleton of the message (big leaf bodies replaced), and that
  skeleton parses to the same tree as the message;
- an attachment passes byte for byte, the footer lands in the text part, broken MIME is still refused;
- a copy is sent and signed as pieces (relayd.mail.chunks): the signature, the dot-stuffing and the long-line
  check are those of the joined bytes, whatever the cut;
- the queue keeps a big message in ``messages.body`` and gives the same bytes back;
- end to end through a real relayd (one process, and a shard's two processes) to a sink, with DKIM checked
  by dkimpy.
"""

from __future__ import annotations

import base64
import email
import email.policy
import os
import pickle
import random
import sqlite3
import types
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32
from pathlib import Path

import pytest

from relayd.mail import chunks, dkim, headers
from relayd.mail.dkim import Signer, keygen, load_key
from relayd.mail.headers import MimeError, has_long_line_in, skeleton
from relayd.mail.rewrite import DEFAULT_TEXT_TEMPLATE, FooterSpec, Slice, prepare
from relayd.queue.store import NewMessage, QueueStore
from relayd.queue.store.queuestore import BODY_ABOVE
from tests.corpus import CORPUS
from tests.dkimverify import verify_dkimpy
from tests.harness import Relayd, Sink, wait_until

IMPRINT = "ACME Ltd, 1 Test Street"
SPEC = FooterSpec(DEFAULT_TEXT_TEMPLATE, "<p>{url}</p>{imprint}", IMPRINT)
URLS = {
    "unsubscribe_url": "https://x.test/u/abc",
    "unsubscribe_mailto": "u+abc@bounces.example.test",
    "relayd_id": "tok",
}


def invoice(attachment: bytes, *, close: bool = True, extra: bytes = b"") -> bytes:
    b64 = base64.encodebytes(attachment).replace(b"\n", b"\r\n")
    return (
        b"From: App <app@acme.example.test>\r\nTo: bob@example.test\r\nSubject: invoice\r\n"
        b"Date: Mon, 07 Dec 2026 10:00:00 +0000\r\nMessage-ID: <inv1@acme.example.test>\r\n"
        b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="=_b"\r\n\r\n'
        b"--=_b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nYour invoice.\r\n"
        b"--=_b\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + b64
        + extra
        + (b"--=_b--\r\n" if close else b"")
    )


def shape(node: Message) -> object:
    """What the rewrite reads from a parsed message: types, parameters, defects, children."""
    children = node.get_payload() if node.is_multipart() else []
    assert isinstance(children, list)
    return (
        node.get_content_type(),
        node.get_params(),
        node.get_boundary(),
        [type(d).__name__ for d in node.defects],
        [shape(c) for c in children],
    )


def parse(raw: bytes) -> Message:
    return BytesParser(policy=compat32).parsebytes(raw)


# --- the skeleton parses as the message -------------------------------------------------------------------

NESTED = (
    b'Content-Type: multipart/mixed; boundary="o"\r\n\r\npre\r\n--o\r\n'
    b'Content-Type: multipart/alternative; boundary="i"\r\n\r\n--i\r\nContent-Type: text/plain\r\n\r\n'
    + b"t" * 3000
    + b"\r\n--i\r\nContent-Type: text/html\r\n\r\n"
    + b"<p>h</p>" * 400
    + b"\r\n--i--\r\n--o\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\n"
    + b"m" * 3000
    + b"\r\n--o\r\nContent-Type: multipart/digest; boundary=d\r\n\r\n--d\r\n\r\nSubject: x\r\n\r\n"
    + b"d" * 3000
    + b"\r\n--d--\r\n--o--\r\nepilogue\r\n"
)
CASES: dict[str, bytes] = {
    "invoice": invoice(os.urandom(20_000)),
    "no close delimiter": invoice(os.urandom(20_000), close=False),
    "outer boundary inside the attachment": invoice(os.urandom(20_000), extra=b"--=_b\r\n"),
    "nested, rfc822, digest": NESTED,
    "inner multipart cut by the outer boundary": (
        b'Content-Type: multipart/mixed; boundary="o"\r\n\r\n--o\r\n'
        b'Content-Type: multipart/mixed; boundary="i"\r\n\r\n--i\r\n\r\n' + b"a" * 5000 + b"\r\n--o--\r\n"
    ),
    "no boundary parameter": b"Content-Type: multipart/mixed\r\n\r\n" + b"z" * 5000 + b"\r\n",
    "single big leaf": b"Content-Type: application/zip\r\n\r\n" + b"q" * 5000 + b"\r\n",
    "continuation first": b" folded\r\nSubject: x\r\n\r\n" + b"b" * 5000,
}


@pytest.mark.parametrize("raw", CASES.values(), ids=CASES.keys())
def test_the_skeleton_parses_to_the_tree_of_the_message(raw: bytes) -> None:
    assert shape(parse(skeleton(raw))) == shape(parse(raw))


def test_the_skeleton_of_every_corpus_message_parses_to_its_tree() -> None:
    files = sorted(CORPUS.glob("**/*.eml"))
    assert files
    for path in files:
        raw = path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        assert shape(parse(skeleton(raw))) == shape(parse(raw)), path.name


def test_the_skeleton_replaces_big_leaf_bodies_only() -> None:
    raw = invoice(os.urandom(200_000))
    small = skeleton(raw)
    assert len(small) < 2_000
    assert b"Your invoice." in small  # a small leaf stays as it is


# --- the rewrite ----------------------------------------------------------------------------------------


def test_an_attachment_passes_byte_for_byte_and_is_not_copied_into_the_template() -> None:
    attachment = os.urandom(3_000_000)
    raw = invoice(attachment)
    template = prepare(raw, SPEC, "c:l:acme:relayd")
    assert template.source is raw
    big = [s for s in template.segments if isinstance(s, Slice)]
    assert big and sum(s.end - s.start for s in big) > 3_900_000
    out = template.render(**URLS)
    assert out == b"".join(template.render_parts(**URLS))
    msg = email.message_from_bytes(out, policy=email.policy.default)
    parts = [p for p in msg.walk() if not p.is_multipart()]
    assert parts[1].get_payload(decode=True) == attachment
    assert IMPRINT in parts[0].get_content() and "https://x.test/u/abc" in parts[0].get_content()
    head = raw.index(b"--=_b\r\nContent-Type: application/pdf")
    assert raw[head:] in out  # every octet from the attachment's delimiter on, as submitted


def test_a_template_rebased_onto_the_queued_bytes_renders_the_same() -> None:
    raw = invoice(os.urandom(100_000))
    template = prepare(raw, SPEC, "c:l:acme:relayd")
    queued = b"Received: from x\r\n\tby y; now\r\n" + raw
    moved = template.rebase(queued, len(queued) - len(raw))
    assert moved.render(**URLS) == template.render(**URLS)
    from_queue = prepare(queued, SPEC, "c:l:acme:relayd", start=len(queued) - len(raw))
    assert from_queue.source is queued and from_queue.render(**URLS) == template.render(**URLS)


def test_a_template_pickles_with_its_slices_as_bytes() -> None:
    template = prepare(invoice(os.urandom(50_000)), SPEC, "c:l:acme:relayd")
    copy = pickle.loads(pickle.dumps(template))
    assert not any(isinstance(s, Slice) for s in copy.segments)
    assert copy.render(**URLS) == template.render(**URLS)


def test_a_big_message_with_broken_mime_is_still_refused() -> None:
    with pytest.raises(MimeError, match="close delimiter"):
        prepare(invoice(os.urandom(2_000_000), close=False), SPEC, "c:l:acme:relayd")


def test_a_big_text_part_gets_the_footer() -> None:
    raw = b"Subject: report\r\nContent-Type: text/plain\r\n\r\n" + b"line of the report\r\n" * 200_000
    out = prepare(raw, SPEC, "c:l:acme:relayd").render(**URLS)
    assert out.endswith(f"Unsubscribe: https://x.test/u/abc\r\n{IMPRINT}\r\n".encode())
    assert out.count(b"line of the report\r\n") == 200_000


# --- pieces: signature, dot-stuffing, long lines ----------------------------------------------------------


def cuts(data: bytes, rng: random.Random) -> list[bytes | memoryview]:
    points = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, rng.randint(0, 6))))
    out: list[bytes | memoryview] = []
    prev = 0
    for point in [*points, len(data)]:
        out.append(memoryview(data)[prev:point] if rng.random() < 0.5 else data[prev:point])
        prev = point
    return out


ALPHABET = [b"a", b" ", b"\t", b"\r\n", b".", b"x y", b"\r\n\r\n", b"  \r\n", b"\r\n.."]


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> Signer:
    path, _ = keygen("a.test", "s", "ed25519", tmp_path_factory.mktemp("dkim"))
    return Signer([load_key("a.test", "s", path, "ed25519")])


@pytest.mark.parametrize("window", [1, 3, 8, 64, chunks.WINDOW])
def test_pieces_are_signed_stuffed_and_measured_as_the_joined_bytes(
    window: int, signer: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chunks, "WINDOW", window)
    # one clock for both signatures: two signings a second apart differ in t= (seen once in CI)
    monkeypatch.setattr(dkim, "time", types.SimpleNamespace(time=lambda: 1_800_000_000.0))
    rng = random.Random(window)
    for _ in range(300):
        body = b"".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40)))
        if rng.random() < 0.1:
            body += rng.choice([b"\n", b"\r", b"x\nz"])  # a bare line end: signed joined, by the signer
        msg = b"From: a@a.test\r\nSubject: x\r\n\r\n" + body
        pieces = cuts(msg, rng)
        assert chunks.sign(signer, pieces, "a.test") == signer.sign(msg, "a.test")
        whole = msg if msg.endswith(b"\r\n") or not msg else msg + b"\r\n"
        whole = b"." + whole if whole.startswith(b".") else whole
        assert b"".join(chunks.dot_stuffed(pieces)) == whole.replace(b"\r\n.", b"\r\n..") + b".\r\n"
        assert chunks.total(pieces) == len(msg) and chunks.ends_with_crlf(pieces) == msg.endswith(b"\r\n")


@pytest.mark.parametrize("window", [1, 5, 1000, 64 * 1024])
def test_long_lines_are_found_across_pieces(window: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(headers, "_WINDOW", window)
    rng = random.Random(window)
    for _ in range(200):
        lines = [b"x" * rng.choice([0, 10, 997, 998, 999, 1500]) for _ in range(rng.randint(1, 4))]
        data = rng.choice([b"\r\n", b"\n", b"\r"]).join(lines) + rng.choice([b"", b"\r\n", b"\r"])
        assert has_long_line_in(cuts(data, rng)) == (max(map(len, data.split(b"\r\n"))) > 998)


# --- the queue ------------------------------------------------------------------------------------------


async def test_the_queue_keeps_a_big_message_in_its_body_column(tmp_path: Path) -> None:
    store = QueueStore(tmp_path / "queue.db")
    await store.open()
    try:
        data = os.urandom(BODY_ABOVE * 3)
        await store.enqueue(NewMessage("Q1", "acme", "a@acme.example.test", ("b@x.test",), data, render=True))
        small = b"Subject: small\r\n\r\nhi\r\n"
        await store.enqueue(NewMessage("Q2", "acme", "a@acme.example.test", ("b@x.test",), small))
        big, little = await store.message_data("Q1"), await store.recipient_data("Q2", 0)
        assert big is not None and big.data == data and big.render
        assert little is not None and little.data == small
        with sqlite3.connect(tmp_path / "queue.db") as db:
            rows = dict(db.execute("SELECT id, length(body) FROM messages").fetchall())
        assert rows == {"Q1": len(data), "Q2": None}
    finally:
        await store.close()


# --- end to end -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_a_big_invoice_arrives_whole_with_footer_and_a_valid_signature(tmp_path: Path, workers: int) -> None:
    key, zone = keygen("acme.example.test", "big", "rsa", tmp_path / "dkim")
    name, _, txt = zone.partition(" IN TXT ")
    records = {name.rstrip("."): "".join(txt.split('"')[1::2])}
    attachment = os.urandom(3_000_000)
    with Sink() as sink:
        relayd = Relayd(
            tmp_path,
            routes={"example.test": sink.port},
            submission_extra='max_message_size = "10MB"\n',
            server_extra=f"workers = {workers}\n",
            extra=f'[[dkim]]\ndomain = "acme.example.test"\nselector = "big"\nkey_file = "{key}"\n'
            'algorithm = "rsa"\n',
        )
        with relayd:
            code, _ = relayd.submit(invoice(attachment), to=["bob@example.test"])
            assert code == 250
            broken = invoice(os.urandom(1_000_000), close=False)
            code, reply = relayd.submit(broken, to=["bob@example.test"])
            assert code == 554 and reply.startswith(b"5.6.0")
            assert wait_until(lambda: len(sink.messages) == 1, timeout=60)
    data = sink.messages[0].data
    msg = email.message_from_bytes(data, policy=email.policy.default)
    parts = [p for p in msg.walk() if not p.is_multipart()]
    assert parts[1].get_payload(decode=True) == attachment
    assert IMPRINT in parts[0].get_content()
    assert verify_dkimpy(data, records, "acme.example.test") == {"big": "pass"}
