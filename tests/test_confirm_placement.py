"""Double opt-in can't be faked: ``{{confirm_url}}`` only where a person clicks, and a confirmation mail to a
spam trap is recorded without counting against the account.

The placement check on its own (:func:`relayd.policy.rules.confirmlink.misplaced_confirm_link`) over a table
of
messages, each decoded as the rewrite decodes it (quoted-printable, base64); then end to end through a
real ``relayd serve`` and an aiosmtpd sink: the refusal, the link as delivered, and the spam trap typed into
a sign-up form.
"""

from __future__ import annotations

import base64
import quopri
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.harness import PASSWORD_HASH, Relayd, Sink, cli_json, submit_each, wait_until

PH = "{{confirm_url}}"
CONFIRM = re.compile(r"http://127\.0\.0\.1:[0-9]+/c/[a-z2-7]{16}-[0-9]+-[a-z2-7]{16}")


def confirmation(
    body: str, *, headers: str = "Content-Type: text/html; charset=utf-8\r\n", extra: str = ""
) -> bytes:
    return (
        "From: ACME <news@acme.example.test>\r\nTo: someone@example.test\r\nSubject: Please confirm\r\n"
        f"Date: Mon, 23 Nov 2026 12:00:00 +0000\r\nX-Relayd-Optin: news\r\n{extra}MIME-Version: 1.0\r\n"
        f"{headers}\r\n{body}"
    ).encode()


def misplaced(raw: bytes) -> str | None:
    """:func:`relayd.policy.rules.confirmlink.misplaced_confirm_link` (imported here, so that the end-to-end
    tests below also run against a relayd without that module)."""
    from relayd.policy.rules.confirmlink import misplaced_confirm_link

    return misplaced_confirm_link(raw)


def b64(text: str) -> str:
    return base64.encodebytes(text.encode()).decode().replace("\n", "\r\n")


def qp(text: str) -> str:
    """Quoted-printable with CRLF line ends (quopri works on LF lines)."""
    return quopri.encodestring(text.replace("\r\n", "\n").encode()).decode().replace("\n", "\r\n")


HTML_QP = "Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n"
HTML_B64 = "Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n"
TEXT = "Content-Type: text/plain; charset=utf-8\r\n"
MIXED = 'Content-Type: multipart/mixed; boundary="m1"\r\n'


def mixed(*parts: str) -> str:
    return "".join(f"--m1\r\n{p}" for p in parts) + "--m1--\r\n"


LINK = f'<html><body><p>Hello!</p><a href="{PH}">Yes, subscribe me</a></body></html>\r\n'
IMG = f'<html><body><img src="https://tracker.example/p.gif?u={PH}"></body></html>\r\n'


@pytest.mark.parametrize(
    ("raw", "allowed"),
    [
        pytest.param(confirmation(LINK), True, id="html_a_href"),
        pytest.param(confirmation(f"<a href={PH} class=button>Yes</a>\r\n"), True, id="html_a_href_unquoted"),
        pytest.param(confirmation(f"Confirm here:\r\n{PH}\r\n", headers=TEXT), True, id="text_own_line"),
        pytest.param(confirmation(f"Confirm: {PH} (one click)\r\n", headers=TEXT), True,
                     id="text_between_spaces"),
        pytest.param(confirmation(f"Confirm: <{PH}>\r\n", headers=TEXT), True, id="text_in_angle_brackets"),
        pytest.param(confirmation(qp(LINK), headers=HTML_QP), True, id="html_a_href_qp"),
        pytest.param(confirmation(b64(LINK), headers=HTML_B64), True, id="html_a_href_base64"),
        pytest.param(confirmation("<p>No placeholder: the footer brings the link.</p>\r\n"), True, id="none"),
    ],
)  # fmt: skip
def test_a_link_a_person_clicks_is_accepted(raw: bytes, allowed: bool) -> None:
    assert misplaced(raw) is None


@pytest.mark.parametrize(
    ("raw", "place"),
    [
        pytest.param(confirmation(IMG), "<img src>", id="img_src"),
        pytest.param(confirmation(f'<a href="https://x.example/?u={PH}">Yes</a>'), "<a href>",
                     id="inside_other_url"),
        pytest.param(confirmation(f'<link rel="prefetch" href="{PH}">'), "<link href>", id="link_prefetch"),
        pytest.param(confirmation(f'<form action="{PH}" method="post">'), "<form action>", id="form_action"),
        pytest.param(confirmation(f'<a href="{PH}" ping="{PH}">x</a>'), "<a ping>", id="a_ping"),
        pytest.param(confirmation(f'<a title="{PH}" href="{PH}">x</a>'), "<a title>", id="other_attribute"),
        pytest.param(confirmation(f"<div style=\"background:url('{PH}')\">x</div>"), "<div style>",
                     id="style_attr"),
        pytest.param(confirmation(f"<style>body {{ background: url({PH}) }}</style>"),
                     "the content of <style>", id="css"),
        pytest.param(confirmation(f'<meta http-equiv="refresh" content="0;url={PH}">'), "<meta content>",
                     id="meta_refresh"),
        pytest.param(confirmation(f"<p>{PH}</p>"), "the text of an HTML part", id="html_text"),
        pytest.param(confirmation(f'<!-- <a href="{PH}"> -->'), "an HTML comment", id="html_comment"),
        pytest.param(confirmation(f'<a href="{PH}"'), "<a href>", id="tag_never_closed"),
        pytest.param(confirmation(qp(IMG), headers=HTML_QP), "<img src>", id="img_src_qp"),
        pytest.param(confirmation(IMG.replace(PH, "{{confirm=\r\n_url}}"), headers=HTML_QP), "<img src>",
                     id="img_src_qp_soft_break"),
        pytest.param(confirmation(b64(IMG), headers=HTML_B64), "<img src>", id="img_src_base64"),
        pytest.param(confirmation(f"https://tracker.example/?u={PH}\r\n", headers=TEXT), "a text part",
                     id="text_inside_other_url"),
        pytest.param(confirmation(f"Confirm: ({PH})\r\n", headers=TEXT), "a text part", id="text_glued"),
        pytest.param(confirmation(LINK, extra=f"X-Track: {PH}\r\n"), "the X-Track: header field",
                     id="header"),
        pytest.param(confirmation(LINK, extra="Subject: =?utf-8?q?=7B=7Bconfirm=5Furl=7D=7D?=\r\n"),
                     "the Subject: header field", id="header_encoded_word"),
        pytest.param(confirmation(mixed(f"{TEXT}\r\n{PH}\r\n",
                                        f"{TEXT}Content-Disposition: attachment\r\n\r\n{PH}\r\n"),
                                  headers=MIXED),
                     "a text/plain part that is not the message text", id="attachment"),
        pytest.param(confirmation(mixed(f"{TEXT}\r\nHi\r\n", "Content-Type: application/octet-stream\r\n"
                                        f"Content-Transfer-Encoding: base64\r\n\r\n{b64(PH)}"),
                                  headers=MIXED),
                     "a application/octet-stream part", id="attachment_base64"),
        pytest.param(confirmation(mixed(f"{TEXT}\r\nHi\r\n", "Content-Type: message/rfc822\r\n\r\n"
                                        f"Subject: fwd\r\n{HTML_B64}\r\n{b64(LINK)}"), headers=MIXED),
                     "a text/html part that is not the message text", id="forwarded_message"),
    ],
)  # fmt: skip
def test_the_placeholder_anywhere_else_is_refused_naming_the_place(raw: bytes, place: str) -> None:
    where = misplaced(raw)
    assert where is not None and where.startswith(place), where


#: pieces of markup that change the scanner's state, and the placeholder, in any order
_FRAGMENTS = ["<", ">", "</", "<!--", "-->", "<!", "<?", "=", '"', "'", " ", "\t", "/", "a", " href",
              "img src", "style", "script", "</style", "<a ", "<img ", "x", "\r\n", PH]  # fmt: skip


@settings(max_examples=500)
@given(st.lists(st.sampled_from(_FRAGMENTS), max_size=40))
def test_html_scan_never_raises_and_finds_nothing_without_the_placeholder(pieces: list[str]) -> None:
    body = "".join(pieces)
    where = misplaced(confirmation(body + "\r\n"))
    assert where is None or where
    if PH not in body:
        assert where is None
    # whatever follows, a link before it stays a link
    assert misplaced(confirmation(f'<a href="{PH}">x</a>' + body.replace(PH, "") + "\r\n")) is None


def test_an_html_part_too_long_to_check_is_refused() -> None:
    from relayd.policy.rules.confirmlink import MAX_HTML

    body = f'<a href="{PH}">Yes</a>' + "<p>padding</p>\r\n" * (MAX_HTML // 16 + 1)
    assert misplaced(confirmation(body)) == "an HTML part of more than 1024 KiB (too long to check)"


# --- end to end ---------------------------------------------------------------------------------------------

CONFIG = """
[policy]
spamtraps = ["trap@example.test"]

[policy.thresholds]
spamtrap_suspend = 1
"""

ACCOUNTS = f"""
[accounts.acme]
password_hash = "{PASSWORD_HASH}"
domains = ["acme.example.test"]

[accounts.acme.lists.news]
require_consent = true

[accounts.formco]
password_hash = "{PASSWORD_HASH}"
domains = ["formco.example.test"]

[accounts.formco.lists.news]
require_consent = true
"""


@dataclass(frozen=True)
class Setup:
    relayd: Relayd
    sink: Sink


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp: Path = tmp_path_factory.mktemp("confirm")
    with (
        Sink() as sink,
        Relayd(tmp, routes={"example.test": sink.port}, extra=CONFIG, accounts=ACCOUNTS) as r,
    ):
        yield Setup(r, sink)


def queued_addresses(setup: Setup) -> set[str]:
    """Every recipient in the queue: unfinished (the default of ``queue list``) and finished."""
    unfinished = cli_json(setup.relayd, "queue", "list")
    return {r["recipient"] for r in unfinished + cli_json(setup.relayd, "queue", "list", "--state", "done")}


def test_confirmation_mail_with_the_link_in_an_image_is_refused_554(setup: Setup) -> None:
    rcpt = "tracked@example.test"
    tx = submit_each(setup.relayd, confirmation(IMG), to=[rcpt])
    assert tx.data is not None and tx.data[0] == 554, tx
    assert tx.data[1].startswith("5.7.1 Message refused: {{confirm_url}} may stand only as the whole href")
    assert tx.data[1].endswith("not in <img src>")
    assert rcpt not in queued_addresses(setup)


def test_confirmation_mail_with_the_link_as_a_link_is_delivered_with_the_confirm_url(setup: Setup) -> None:
    rcpt = "clicker@example.test"
    tx = submit_each(setup.relayd, confirmation(qp(LINK), headers=HTML_QP), to=[rcpt])
    assert tx.data is not None and tx.data[0] == 250, tx
    sink = setup.sink
    assert wait_until(lambda: any(rcpt in m.rcpt_tos for m in sink.messages))
    data = next(m for m in sink.messages if rcpt in m.rcpt_tos).data
    html = quopri.decodestring(data.partition(b"\r\n\r\n")[2]).decode()
    [url] = {m.group() for m in CONFIRM.finditer(html)}
    assert f'<a href="{url}">Yes, subscribe me</a>' in html


def test_spamtrap_hit_by_confirmation_mail_is_recorded_but_does_not_suspend(setup: Setup) -> None:
    relayd = setup.relayd
    sender = "app@formco.example.test"
    raw = confirmation(LINK).replace(b"news@acme.example.test", sender.encode())
    tx = submit_each(
        relayd, raw, to=["trap@example.test", "real-signup@example.test"], sender=sender, user="formco"
    )
    assert tx.data is not None and tx.data[0] == 250, tx
    only_trap = submit_each(relayd, raw, to=["trap@example.test"], sender=sender, user="formco")
    assert only_trap.data is not None and only_trap.data[0] == 250, only_trap  # the same answer as any
    [shown] = cli_json(relayd, "account", "show", "formco")
    assert shown["suspended"] is False, shown
    events = [
        e for e in cli_json(relayd, "events", "--kind", "dropped") if e["address"] == "trap@example.test"
    ]
    assert [e["reason"] for e in events] == ["spamtrap:optin", "spamtrap:optin"]
    assert {e["account"] for e in events} == {"formco"}
    # the same trap in ordinary mail of the account still counts, and suspends at once (spamtrap_suspend = 1)
    news = raw.replace(b"X-Relayd-Optin: news\r\n", b"").replace(PH.encode(), b"https://formco.example.test/")
    tx = submit_each(relayd, news, to=["trap@example.test"], sender=sender, user="formco")
    assert tx.data is not None and tx.data[0] == 250, tx
    [shown] = cli_json(relayd, "account", "show", "formco")
    assert shown["suspended"] is True and shown["reason"] == "spamtrap", shown
