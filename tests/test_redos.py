"""Every report parser and classifier finishes on hostile input, whatever its size.

Inputs repeat the start of what a parser looks for and never finish it (the first
pieces of each multi-piece phrase of the reason tables, ``<script `` without a closing
tag, address characters without an ``@``, SMTP continuation prefixes...), at 64 KB and
1 MB. A backtracking matcher takes minutes to hours on them. Each batch runs in a child
process under a generous timeout: a hang detector, not a timing assertion. The parent
then checks what the child computed, so a batch that "finishes" by failing is caught too.

Hypothesis adds large inputs built from phrase pieces, under a deadline, and checks the
linear phrase matcher against the regular expression it replaced, on small texts.
"""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relayd.reports.arf import ArfReport
from relayd.reports.arf import parse as arf_parse
from relayd.reports.dsn import DsnReport, classify, classify_reply, heuristics, message, rfc3464, smtptext
from relayd.reports.dsn.patterns import PHRASES, mentions
from tests import adversarial

ROOT = Path(__file__).resolve().parent.parent
SIZES = (64 * 1024, 1024 * 1024)
#: Far beyond what any batch needs when parsing is linear (a few seconds on a busy CI
#: machine); the old backtracking code needs hours for these inputs.
HANG_TIMEOUT = 120


def _in_child(batch: str) -> Any:
    """Run ``BATCHES[batch]()`` in a fresh interpreter and return what it printed (JSON)."""
    code = f"import json, tests.test_redos as t; print(json.dumps(t.BATCHES[{batch!r}]()))"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=HANG_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{batch}: still running after {HANG_TIMEOUT} s (super-linear parsing?)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def _repeat(unit: str, size: int) -> str:
    return unit * max(1, size // len(unit))


# --- batches: run in the child, return JSON-able results --------------------------------


def _dsn_phrase_prefixes() -> list[list[Any]]:
    """classify() on a DSN per phrase prefix (64 KB), and on all of them at once (1 MB)."""
    units = adversarial.phrase_prefixes()
    inputs = [adversarial.adversarial_dsn(SIZES[0], unit) for unit in units]
    inputs += [adversarial.adversarial_dsn(size) for size in SIZES]
    inputs.append(adversarial.adversarial_dsn(SIZES[1], "".join(units)))
    out = []
    for raw in inputs:
        report = classify(raw)
        out.append([report.is_dsn, [r.address for r in report.recipients]])
    return out


def _reply_phrase_prefixes() -> list[list[Any]]:
    """classify_reply() on each phrase prefix repeated (64 KB), and all of them (1 MB)."""
    units = adversarial.phrase_prefixes()
    texts = [_repeat(unit, SIZES[0]) for unit in units] + [_repeat("".join(units), SIZES[1])]
    texts.append(_repeat(adversarial.MAILBOX_EXCEEDED, SIZES[1]))
    return [list(classify_reply(550, None, text, "RCPT")) for text in texts]


HTML_UNITS = ("<script ", "<style ", "<SCRIPT>x</scrip", "<br ", "<p ", "<", "< ", "<div", "<a href='")


def _html_to_text() -> list[list[Any]]:
    """html_to_text() on unclosed tags of every kind it reads, and one well-formed page."""
    out = []
    for size in SIZES:
        for unit in HTML_UNITS:
            text = message.html_to_text(_repeat(unit, size) + "tail")
            out.append([unit, text.endswith("tail")])
        page = _repeat("<p>a</p><script>x</script>", size)
        out.append(["page", message.html_to_text(page).count("a") == size // 26])
    return out


def _addresses() -> list[list[Any]]:
    """Address extraction (RFC 3464 fields, free text, notice scanning) on unfinished addresses."""
    out = []
    for size in SIZES:
        for unit in ("a", "a.", "a@", "a@a-", "a@a.", "<a", "a-", "!#"):
            junk = _repeat(unit, size)
            out.append(
                [
                    unit,
                    rfc3464.extract_address(f"rfc822; <v@example.test> {junk}"),
                    heuristics.addresses_in(junk + " v@example.test")[-1:],
                ]
            )
        sender = f"from{_repeat(' ', size // 2)}s@example.test"
        many = _repeat(" ", size // 4) + _repeat("x@example.test ", size // 4)
        hits = heuristics.scan_notice(f"  x@example.test\n{sender}\n{many}\n", set())
        out.append(["notice", [hit.address for hit in hits]])
        out.append(["fields", len(rfc3464.fields("Final-Recipient: a\n" + _repeat(" b\n", size)))])
    return out


def _smtp_text() -> list[list[Any]]:
    """The SMTP reply readers (enhanced code, reply code, command) on repeated reply fragments."""
    units = (
        "host a [",
        "host ",
        "550-5.7.1 ",
        "550 ",
        "after ",
        "in reply to ",
        ">>> ",
        "\n",
        " ",
        "5.",
        "[",
    )
    out = []
    for size in SIZES:
        for unit in units:
            text = "550 5.1.1 user unknown (in reply to RCPT TO command) " + _repeat(unit, size)
            out.append(
                [unit, smtptext.enhanced_code(text), smtptext.reply_code(text), smtptext.smtp_command(text)]
            )
    return out


def _hostile_structures() -> list[list[Any]]:
    """classify() on hostile shapes: HTML, address runs, continuations, blank lines, parts, recipients."""
    out = []
    for size in SIZES:
        many = "".join(
            f"Final-Recipient: rfc822; u{i}@example.test\nAction: failed\n\n" for i in range(size // 50)
        )
        parts = "".join(f"--b\nContent-Type: text/plain\n\n{i}\n" for i in range(size // 30))
        inputs = {
            "html": adversarial.adversarial_html(size),
            "addresses": adversarial.adversarial_addresses(size),
            "continuations": adversarial.adversarial_continuations(size),
            "sender-tail": adversarial.text_bounce(f"from{_repeat(' ', size)}x victim@example.test"),
            "blank-lines": adversarial.text_bounce("550 5.1.1 user unknown" + "\n" * size),
            "indent": adversarial.text_bounce(_repeat(" ", size) + _repeat("x@example.test ", size // 16)),
            "recipients": adversarial.dsn(f"550 5.1.1 unknown\n\n{many}"),
            # Nothing our readers take for an address: flufl.bounce's turn.
            "fallback": adversarial.text_bounce(
                _repeat("did not reach the following recipient, a@a on SMTP=a@a <a", size)
            ),
            "content-type": adversarial.content_type_bomb(size),
            "parts": (
                b"Subject: Undeliverable\nContent-Type: multipart/mixed; boundary=b\n\n"
                + parts.encode()
                + b"--b--\n"
            ),
        }
        for name, raw in inputs.items():
            report = classify(raw)
            out.append([size, name, report.is_dsn, len(report.recipients)])
    return out


def _arf() -> list[list[Any]]:
    """arf.parse() on complaints with endless folded fields, address runs and complaint words."""
    out = []
    for size in SIZES:
        report = arf_parse(adversarial.adversarial_arf(size))
        out.append([report.is_arf, report.feedback_type, report.original_rcpt])
        report = arf_parse(adversarial.content_type_bomb(size))
        out.append([report.is_arf, report.feedback_type, report.original_rcpt])
    return out


TOKEN = "abcdefghijklmnop-1-abcdefghijklmnop"


def _tokens() -> list[list[str]]:
    """The report token scan (trace header, VERP, unsubscribe) after a flood of blank lines."""
    from relayd.feedback.attribution import tokens_in

    out = []
    for size in SIZES:
        found = tokens_in(adversarial.blank_lines_report(size, TOKEN), "body", unsub=True)
        out.append([f"{c.purpose}:{c.token}" for c in found])
    return out


BATCHES = {
    "dsn_phrase_prefixes": _dsn_phrase_prefixes,
    "reply_phrase_prefixes": _reply_phrase_prefixes,
    "html_to_text": _html_to_text,
    "addresses": _addresses,
    "smtp_text": _smtp_text,
    "hostile_structures": _hostile_structures,
    "arf": _arf,
    "tokens": _tokens,
}


# --- the tests ---------------------------------------------------------------------------


def test_dsn_classify_finishes_on_repeated_phrase_prefixes() -> None:
    results = _in_child("dsn_phrase_prefixes")
    assert len(results) == len(adversarial.phrase_prefixes()) + 3
    assert all(result == [True, ["victim@example.test"]] for result in results)


def test_classify_reply_finishes_on_repeated_phrase_prefixes() -> None:
    results = _in_child("reply_phrase_prefixes")
    assert len(results) == len(adversarial.phrase_prefixes()) + 2
    assert all(isinstance(reason, str) and isinstance(hard, bool) for reason, hard in results)


def test_html_to_text_finishes_on_unclosed_tags() -> None:
    for unit, ok in _in_child("html_to_text"):
        assert ok, unit


def test_address_extraction_finishes_on_unfinished_addresses() -> None:
    for row in _in_child("addresses"):
        if row[0] == "notice":
            # "from   s@..." names the sender, not a recipient (and the notice is read
            # up to its cap, which may cut the last address short).
            assert row[1][0] == "x@example.test"
            assert "s@example.test" not in row[1]
        elif row[0] == "fields":
            assert row[1] == 1
        else:
            unit, extracted, found = row
            assert extracted == "v@example.test", unit
            assert found == ["v@example.test"], unit


def test_smtp_reply_readers_finish_on_repeated_reply_fragments() -> None:
    for unit, enhanced, reply, command in _in_child("smtp_text"):
        assert enhanced == "5.1.1", unit
        assert reply == "550", unit
        assert command == "RCPT", unit


def test_dsn_classify_finishes_on_hostile_structures() -> None:
    results = {(size, name): (is_dsn, count) for size, name, is_dsn, count in _in_child("hostile_structures")}
    assert len(results) == 10 * len(SIZES)
    for size in SIZES:
        # The one recipient each notice names is found; a flood of them is cut at the cap.
        for name in ("html", "continuations", "sender-tail", "blank-lines", "indent", "content-type"):
            assert results[size, name] == (True, 1), (size, name)
        assert results[size, "recipients"] == (True, 100)
        assert results[size, "parts"] == (False, 0)


def test_arf_parse_finishes_on_hostile_complaints() -> None:
    assert _in_child("arf") == [[True, "abuse", None], [False, None, None]] * len(SIZES)


def test_report_token_scan_finishes_on_blank_lines() -> None:
    assert _in_child("tokens") == [[f"trace:{TOKEN}"]] * len(SIZES)


def test_relayd_dsn_classify_command_finishes_on_the_adversarial_files(tmp_path: Path) -> None:
    files = []
    for size in (7_000, *SIZES):
        path = tmp_path / f"dsn-{size}.eml"
        path.write_bytes(adversarial.adversarial_dsn(size))
        files.append(str(path))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "relayd", "dsn", "classify", "--json", *files],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=HANG_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"relayd dsn classify still running after {HANG_TIMEOUT} s")
    assert proc.returncode == 0, proc.stderr
    reports = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["file"] for r in reports] == files
    for report in reports:
        assert report["is_dsn"] is True
        assert [r["address"] for r in report["recipients"]] == ["victim@example.test"]
        assert report["recipients"][0]["hard"] is False


# --- hypothesis ----------------------------------------------------------------------------

PIECES = sorted({piece for fragments in PHRASES.values() for f in fragments for piece in f.split(" ... ")})
GLUE = ["", " ", "\n", "550-", "5.1.1 ", "<", ">", "@", "a@b.example ", "from ", "<script ", "host a ["]
PREFIXES = adversarial.phrase_prefixes()
#: Large: a phrase prefix and a few pieces, repeated 500 to 2,000 times (tens of KB).
LARGE = settings(
    max_examples=15,
    deadline=timedelta(seconds=10),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def repeated_pieces(draw: st.DrawFn) -> str:
    """A phrase's first pieces, maybe followed by other pieces and glue, many times over."""
    unit = draw(st.sampled_from(PREFIXES))
    unit += "".join(draw(st.lists(st.sampled_from(PIECES + GLUE), max_size=3)))
    return unit * draw(st.integers(min_value=500, max_value=2_000))


@LARGE
@given(repeated_pieces())
def test_classify_on_large_phrase_soup_returns_a_report(text: str) -> None:
    assert isinstance(classify(adversarial.dsn(text)), DsnReport)
    assert isinstance(classify(adversarial.text_bounce(text)), DsnReport)
    assert isinstance(classify(adversarial.html_bounce(text)), DsnReport)


@LARGE
@given(repeated_pieces())
def test_classify_reply_on_large_phrase_soup_returns_a_reason(text: str) -> None:
    reason, hard = classify_reply(550, "5.0.0", text, "RCPT")
    assert isinstance(reason, str) and isinstance(hard, bool)


@LARGE
@given(repeated_pieces())
def test_arf_parse_on_large_phrase_soup_returns_a_report(text: str) -> None:
    raw = f"Subject: spam complaint\nContent-Type: text/plain\n\n{text}\n--- Original Message ---\n{text}"
    assert isinstance(arf_parse(raw.encode()), ArfReport)


@LARGE
@given(st.binary(min_size=1, max_size=200_000))
def test_classify_and_parse_on_large_binary_return_reports(raw: bytes) -> None:
    assert isinstance(classify(raw), DsnReport)
    assert isinstance(arf_parse(raw), ArfReport)


def _reference(fragments: tuple[str, ...]) -> re.Pattern[str] | None:
    """The regular expression the phrase tables used to be compiled to (lazy gaps)."""
    alternatives = [".*?".join(re.escape(piece) for piece in f.split(" ... ")) for f in fragments]
    return re.compile("|".join(alternatives)) if alternatives else None


REFERENCE = {reason: _reference(tuple(fragments)) for reason, fragments in PHRASES.items()}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([*PIECES, "", " ", "\n", "x"]), max_size=8).map("".join))
def test_phrase_matching_agrees_with_the_regex_it_replaced(text: str) -> None:
    for reason, pattern in REFERENCE.items():
        expected = bool(text) and pattern is not None and pattern.search(text) is not None
        assert mentions(reason, text) is expected, reason


# The rewrites say what the expressions they replace said: checked on small inputs,
# where the old expressions are quick.
_OLD_SCRIPT = re.compile(r"<(script|style)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_OLD_BLOCK_TAG = re.compile(r"<\s*(?:br|/p|/div|/tr|/li|/h\d|p|div)\b[^>]*>", re.IGNORECASE)
_OLD_TAG = re.compile(r"<[^>]*>")
_OLD_SENDER_TAIL = re.compile(
    r"(?:mail from|envelope-from|envelope sender|message-id|message id|queue id|return-path|"
    r"\bfrom|\bsender|\bid)\s*[:=]?\s*[<(\[]?\s*$",
    re.IGNORECASE,
)
HTML_BITS = [
    "<script>",
    "<SCRIPT a>",
    "</script>",
    "</script >",
    "<style>",
    "</STYLE>",
    "<br/>",
    "<p>",
    "</p>",
]
HTML_BITS += ["<div", "<", ">", "x", " ", "\n", "&amp;", "<scripts>", "</ script>"]
SENDER_BITS = ["from", "FROM", "mail from", "sender", "id", "message-id", "return-path", "xid", "_from"]
SENDER_BITS += [":", "=", "<", "(", "[", " ", "\t", "\u00a0", "x", "\u017f"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(HTML_BITS), max_size=10).map("".join))
def test_html_to_text_agrees_with_the_regexes_it_replaced(markup: str) -> None:
    expected = _OLD_TAG.sub(" ", _OLD_BLOCK_TAG.sub("\n", _OLD_SCRIPT.sub(" ", markup)))
    assert message.html_to_text(markup) == html.unescape(expected)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(SENDER_BITS), max_size=6).map("".join))
def test_sender_word_check_agrees_with_the_regex_it_replaced(before: str) -> None:
    expected = _OLD_SENDER_TAIL.search(before) is not None
    assert heuristics._after_sender_word(before, len(before)) is expected
