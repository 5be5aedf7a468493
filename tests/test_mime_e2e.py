"""The rewrite end to end: what a real ``relayd serve`` delivers to an aiosmtpd sink.

Every delivered copy carries ``List-Unsubscribe`` (one-click URL first, then the mailto, RFC 2369 / RFC 8058)
with ``List-Unsubscribe-Post: List-Unsubscribe=One-Click``, a per-recipient URL that is also the link in the
footer, a ``Feedback-ID`` and an ``X-Relayd-ID``; every text part has the unsubscribe link and the imprint
exactly once; everything else of the MIME structure arrives as sent (compared on the parsed trees: content
types, parameters, number of parts, preamble and epilogue, attachments byte-identical after decoding). A
message whose MIME is broken is refused with ``554 5.6.0`` and nothing is delivered.

One daemon and one sink for the module; each test mails addresses of its own.
"""

from __future__ import annotations

import base64
import quopri
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email import message_from_bytes
from email.message import Message
from email.policy import compat32

import pytest

from tests.harness import Received, Relayd, Sink, split_delivered, submit_each, wait_until

IMPRINT = "ACME Ltd, 1 Test Street"  # the harness config's imprint for account acme
LIST_UNSUBSCRIBE = re.compile(
    r"<(https?://[^>]+)>, ?<mailto:(unsubscribe\+[A-Za-z0-9._+~=-]+@bounces\.example\.test)>"
)
HEAD = (
    b"From: ACME News <news@acme.example.test>\r\n"
    b"To: Subscriber <subscriber@example.test>\r\n"
    b"Subject: %s\r\n"
    b"Date: Mon, 23 Nov 2026 12:00:00 +0000\r\n"
    b"Message-ID: <%s@acme.example.test>\r\n"
    b"List-Id: ACME News <news.acme.example.test>\r\n"
    b"X-Campaign-ID: spring-2026\r\n"
    b"MIME-Version: 1.0\r\n"
)


def b64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def qp(text: str) -> bytes:
    lf = text.replace("\r\n", "\n").encode()  # quopri would encode a CR as =0D
    return quopri.encodestring(lf).replace(b"\n", b"\r\n")


PDF = b"%PDF-1.4\n" + bytes(range(256)) * 12 + b"\n%%EOF\n"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(255, -1, -1)) * 3
NOTES = "Attached notes, not a body part: no footer here.\r\n"
HTML = (
    "<html><head><style>p { color: #333 }</style></head><body><p>Caf\u00e9 news.</p>\r\n"
    '<img src="cid:logo@acme"></body></html>\r\n'
)

MESSAGES: dict[str, bytes] = {
    "plain_8bit": HEAD % (b"plain", b"plain")
    + b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    + "Gr\u00fc\u00dfe aus K\u00f6ln.\r\nSee you.\r\n".encode(),
    "alternative_qp": HEAD
    % (b"alternative", b"alternative")
    + b'Content-Type: multipart/alternative; boundary="alt-1"\r\n\r\n'
    b"This is a multi-part message in MIME format.\r\n"
    b"--alt-1\r\n"
    b'Content-Type: text/plain; charset="utf-8"; format=flowed\r\n'
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n" + qp("Caf\u00e9 news \u2013 read it soon.\r\n") + b"--alt-1\r\n"
    b'Content-Type: text/html; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n'
    b"\r\n" + qp(HTML) + b"--alt-1--\r\n",
    "base64_text": HEAD % (b"base64", b"base64")
    + b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    + b64((("Base64 body \u2713 " * 20 + "\r\n") * 5).encode()),
    "mixed_with_attachments": HEAD
    % (b"mixed", b"mixed")
    + b'Content-Type: multipart/mixed; boundary="mix-0"\r\n\r\n'
    b"preamble: ignored by readers\r\n"
    b"--mix-0\r\n"
    b'Content-Type: multipart/related; boundary="rel-0"; type="multipart/alternative"\r\n\r\n'
    b"--rel-0\r\n"
    b'Content-Type: multipart/alternative; boundary="alt-0"\r\n\r\n'
    b"--alt-0\r\n"
    b"Content-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    + "Caf\u00e9 news in Latin-1.\r\n".encode("iso-8859-1")
    + b"--alt-0\r\n"
    b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    + b64(HTML.encode())
    + b"--alt-0--\r\n"
    b"--rel-0\r\n"
    b"Content-Type: image/png\r\nContent-Transfer-Encoding: base64\r\nContent-ID: <logo@acme>\r\n"
    b"Content-Disposition: inline\r\n\r\n" + b64(PNG) + b"--rel-0--\r\n"
    b"--mix-0\r\n"
    b'Content-Type: application/pdf; name="report.pdf"\r\nContent-Transfer-Encoding: base64\r\n'
    b'Content-Disposition: attachment; filename="report.pdf"\r\n\r\n' + b64(PDF) + b"--mix-0\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n"
    b'Content-Disposition: attachment; filename="notes.txt"\r\n\r\n' + NOTES.encode() + b"--mix-0\r\n"
    b"Content-Type: message/rfc822\r\n\r\n"
    b"From: someone@example.test\r\nSubject: forwarded\r\nContent-Type: text/plain\r\n\r\n"
    b"A forwarded message stays as it is.\r\n"
    b"--mix-0--\r\n"
    b"epilogue: ignored too\r\n",
}


# --- fixtures and helpers -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sink() -> Iterator[Sink]:
    with Sink() as s:
        yield s


@pytest.fixture(scope="module")
def relayd(tmp_path_factory: pytest.TempPathFactory, sink: Sink) -> Iterator[Relayd]:
    with Relayd(tmp_path_factory.mktemp("mime"), routes={"example.test": sink.port}) as r:
        yield r


def public_url(relayd: Relayd) -> str:
    """The harness's ``[http] public_url``."""
    return f"http://127.0.0.1:{relayd.http_port}"


def deliver(relayd: Relayd, sink: Sink, raw: bytes, to: list[str]) -> dict[str, Received]:
    """Submit ``raw`` and wait for every recipient's copy; the copies by recipient."""
    tx = submit_each(relayd, raw, to=to)
    assert tx.data is not None and tx.data[0] == 250, tx
    assert wait_until(lambda: all(any(r in m.rcpt_tos for m in sink.messages) for r in to))
    return {r: next(m for m in sink.messages if r in m.rcpt_tos) for r in to}


@dataclass(frozen=True)
class Added:
    url: str
    mailto: str
    feedback_id: str
    relayd_id: str


def added_fields(data: bytes) -> Added:
    """The fields relayd adds, each exactly once, with their values checked for shape."""
    added, _, _ = split_delivered(data)
    for name in ("list-unsubscribe", "list-unsubscribe-post", "feedback-id", "x-relayd-id"):
        assert len(added.get(name, [])) == 1, (name, added.get(name))

    def value(name: str) -> str:
        return " ".join(added[name][0].decode().split(":", 1)[1].split())

    assert value("list-unsubscribe-post") == "List-Unsubscribe=One-Click"
    m = LIST_UNSUBSCRIBE.fullmatch(value("list-unsubscribe"))
    assert m is not None, value("list-unsubscribe")
    return Added(m.group(1), m.group(2), value("feedback-id"), value("x-relayd-id"))


def decoded_text(part: Message) -> str:
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode(part.get_content_charset() or "us-ascii")


def is_body_text(part: Message) -> bool:
    return (
        part.get_content_type() in ("text/plain", "text/html")
        and part.get_content_disposition() != "attachment"
    )


def check_tree(sent: Message, got: Message, url: str, path: str = "") -> int:
    """Walk both trees in parallel; returns how many text parts carry the footer."""
    where = path or "top"
    assert got.get_content_type() == sent.get_content_type(), where
    assert got.get_params() == sent.get_params(), where
    assert got.get_content_disposition() == sent.get_content_disposition(), where
    assert got.get_filename() == sent.get_filename(), where
    assert got["Content-ID"] == sent["Content-ID"], where
    if sent.get_content_maintype() == "message":
        assert got.as_bytes() == sent.as_bytes(), where  # an attached message is opaque
        return 0
    if sent.is_multipart():
        assert got.preamble == sent.preamble and got.epilogue == sent.epilogue, where
        kids_sent, kids_got = sent.get_payload(), got.get_payload()
        assert isinstance(kids_sent, list) and isinstance(kids_got, list)
        assert len(kids_got) == len(kids_sent), where
        return sum(
            check_tree(s, g, url, f"{path}/{i}")
            for i, (s, g) in enumerate(zip(kids_sent, kids_got, strict=True))
        )
    if not is_body_text(sent):
        assert got.get_payload(decode=True) == sent.get_payload(decode=True), where
        assert got["Content-Transfer-Encoding"] == sent["Content-Transfer-Encoding"], where
        return 0
    before, after = decoded_text(sent), decoded_text(got)
    assert after.count(url) == 1, (where, after)
    assert after.count(IMPRINT) == 1, (where, after)
    if sent.get_content_subtype() == "html":
        # the footer goes just before </body>: what was before and after it is unchanged
        cut = before.lower().rfind("</body>")
        assert after.startswith(before[:cut]) and after.endswith(before[cut:]), (where, after)
        assert after.count(f'<a href="{url}">Unsubscribe</a>') == 1, (where, after)
    else:
        assert after.startswith(before), (where, after)
        assert after.count(f"Unsubscribe: {url}") == 1, (where, after)
    return 1


# --- headers ------------------------------------------------------------------------------------------------


def test_every_copy_has_one_click_list_unsubscribe_with_its_own_url(relayd: Relayd, sink: Sink) -> None:
    to = [f"lu-{i}@example.test" for i in range(3)]
    copies = deliver(relayd, sink, MESSAGES["plain_8bit"], to)
    added = {r: added_fields(m.data) for r, m in copies.items()}
    urls = {a.url for a in added.values()}
    assert len(urls) == 3, "each recipient gets a URL of its own"
    assert len({a.mailto for a in added.values()}) == 3
    assert len({a.relayd_id for a in added.values()}) == 3
    for a in added.values():
        assert a.url.startswith(public_url(relayd) + "/u/") and len(a.url) <= 67, a.url
        # the mailto carries the same token as the URL: either way unsubscribes this recipient
        assert a.mailto == f"unsubscribe+{a.url.rsplit('/', 1)[1]}@bounces.example.test"


def test_feedback_id_is_campaign_list_account_sender(relayd: Relayd, sink: Sink) -> None:
    [copy] = deliver(relayd, sink, MESSAGES["plain_8bit"], ["fbl-1@example.test"]).values()
    assert added_fields(copy.data).feedback_id == "spring-2026:news:acme:relayd"


def test_app_supplied_relayd_fields_are_replaced(relayd: Relayd, sink: Sink) -> None:
    forged = (
        b"List-Unsubscribe: <https://app.example.test/forged-unsub>\r\n"
        b"List-Unsubscribe-Post: List-Unsubscribe=Forged\r\n"
        b"Feedback-ID: forged:feedback:id:x\r\n"
        b"X-Relayd-ID: forged-trace-token\r\n"
    )
    raw = MESSAGES["plain_8bit"].replace(b"MIME-Version: 1.0\r\n", b"MIME-Version: 1.0\r\n" + forged, 1)
    [copy] = deliver(relayd, sink, raw, ["forged-1@example.test"]).values()
    added = added_fields(copy.data)  # exactly one of each
    assert b"forged" not in copy.data.lower() and b"Forged" not in copy.data
    assert (
        added.url.startswith(public_url(relayd) + "/u/")
        and added.feedback_id == "spring-2026:news:acme:relayd"
    )
    # the app's other header fields arrive byte for byte
    _, kept, _ = split_delivered(copy.data)
    assert kept == MESSAGES["plain_8bit"].partition(b"\r\n\r\n")[0] + b"\r\n"


# --- bodies -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MESSAGES))
def test_footer_once_per_text_part_and_structure_unchanged(relayd: Relayd, sink: Sink, name: str) -> None:
    to = [f"mime-{name}-{i}@example.test" for i in range(2)]
    sent = message_from_bytes(MESSAGES[name], policy=compat32)
    expected_parts = sum(1 for p in sent.walk() if is_body_text(p) and not _inside_message(sent, p))
    for rcpt, copy in deliver(relayd, sink, MESSAGES[name], to).items():
        url = added_fields(copy.data).url
        got = message_from_bytes(copy.data, policy=compat32)
        assert check_tree(sent, got, url) == expected_parts, rcpt
        assert got["Subject"] == sent["Subject"] and got["Message-ID"] == sent["Message-ID"]


def _inside_message(root: Message, part: Message) -> bool:
    """Whether ``part`` sits inside an attached message/* (whose text parts are not ours to footer)."""
    for p in root.walk():
        if p.get_content_maintype() == "message" and p is not part and any(q is part for q in p.walk()):
            return True
    return False


def test_placeholder_places_the_link_and_the_imprint_is_still_added(relayd: Relayd, sink: Sink) -> None:
    raw = (
        HEAD % (b"placeholder", b"placeholder")
        + b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
        + b"Hello.\r\nTo stop these mails: {{unsubscribe_url}}\r\n"
    )
    [copy] = deliver(relayd, sink, raw, ["placeholder-1@example.test"]).values()
    url = added_fields(copy.data).url
    text = decoded_text(message_from_bytes(copy.data, policy=compat32))
    assert f"To stop these mails: {url}\r\n" in text
    assert text.count(url) == 1 and text.count(IMPRINT) == 1 and "{{" not in text


# --- broken MIME --------------------------------------------------------------------------------------------

BROKEN: dict[str, bytes] = {
    "multipart_without_boundary": HEAD % (b"broken", b"broken-1")
    + b"Content-Type: multipart/mixed\r\n\r\n--x\r\nContent-Type: text/plain\r\n\r\nhi\r\n--x--\r\n",
    "close_delimiter_missing": HEAD
    % (b"broken", b"broken-2")
    + b'Content-Type: multipart/mixed; boundary="cut"\r\n\r\n--cut\r\nContent-Type: text/plain\r\n\r\n'
    b"the message was truncated here\r\n",
    "boundary_never_occurs": HEAD % (b"broken", b"broken-3")
    + b'Content-Type: multipart/alternative; boundary="nowhere"\r\n\r\njust text\r\n',
    "invalid_base64_text": HEAD
    % (b"broken", b"broken-4")
    + b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    b"!!!! this is not base64 ####\r\n",
    "two_content_types_on_a_multipart": HEAD
    % (b"broken", b"broken-5")
    + b'Content-Type: multipart/mixed; boundary="a"\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
    b"--a\r\nContent-Type: text/plain\r\n\r\nhi\r\n--a--\r\n",
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_mime_is_refused_with_554_5_6_0(relayd: Relayd, sink: Sink, name: str) -> None:
    rcpt = f"broken-{name}@example.test"
    tx = submit_each(relayd, BROKEN[name], to=[rcpt])
    assert tx.data is not None
    code, text = tx.data
    assert code == 554 and text.startswith("5.6.0 "), tx.data
    # nothing was queued: a later message to the same recipient is the first thing it gets
    deliver(relayd, sink, MESSAGES["plain_8bit"], [rcpt])
    assert [m.rcpt_tos for m in sink.messages if rcpt in m.rcpt_tos] == [[rcpt]]
