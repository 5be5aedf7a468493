"""Fuzz targets: one function per parser or codec, taking arbitrary bytes, raising only on a real bug.

Each target checks properties, not just "no exception": a DSN report is JSON-serialisable with reasons from
the taxonomy, a rewritten message parses with no new defects and carries the unsubscribe link once per
footered text part, an address normalises idempotently, a token round-trips and never verifies for another
address or purpose, and the DATA reader turns one DATA phase into exactly one message or one refusal.

Run by ``python -m tests.fuzz TARGET`` under atheris (coverage-guided, see README.md) and by
``tests/test_fuzz_targets.py`` for a few seconds each in CI.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import quopri
import re
import socket
from collections.abc import Callable
from email import errors as email_errors
from email import message_from_bytes
from email.message import Message
from email.policy import compat32

from aiosmtpd.smtp import Envelope, Session

from relayd.core.address import AddressError, normalize
from relayd.core.tokens import TokenRef, make_token, parse_token, verify_token
from relayd.edge.smtp.limits import ConnectionLimits
from relayd.edge.smtp.protocol import StrictSMTP
from relayd.mail.rewrite import (
    DEFAULT_HTML_TEMPLATE,
    DEFAULT_TEXT_TEMPLATE,
    PLACEHOLDER,
    FooterSpec,
    MimeError,
    prepare,
)
from relayd.reports.arf import ArfReport, parse
from relayd.reports.dsn import DsnReport, classify
from tests.test_dsn_corpus import CORPUS

# DESIGN.md, "Reasons and scopes": the sisimai (v5) taxonomy; "hard" only for the first four
REASONS = frozenset(
    {
        "userunknown",
        "hostunknown",
        "hasmoved",
        "notaccept",
        "mailboxfull",
        "filtered",
        "blocked",
        "badreputation",
        "requireptr",
        "authfailure",
        "spamdetected",
        "virusdetected",
        "policyviolation",
        "rejected",
        "suspend",
        "expired",
        "mesgtoobig",
        "exceedlimit",
        "norelaying",
        "systemerror",
        "systemfull",
        "networkerror",
        "toomanyconn",
        "speeding",
        "securityerror",
        "failedstarttls",
        "contenterror",
        "notcompliantrfc",
        "syntaxerror",
        "mailererror",
        "suppressed",
        "onhold",
        "delivered",
        "vacation",
        "feedback",
        "undefined",
    }
)
HARD_REASONS = frozenset({"userunknown", "hostunknown", "hasmoved", "notaccept"})


# --- DSN and ARF -------------------------------------------------------------------------------------------


def dsn_classify(data: bytes) -> None:
    report = classify(data)
    assert isinstance(report, DsnReport)
    for rcpt in report.recipients:
        assert rcpt.reason in REASONS, rcpt.reason
        assert isinstance(rcpt.hard, bool)
        assert not rcpt.hard or rcpt.reason in HARD_REASONS, rcpt
    json.dumps(dataclasses.asdict(report), default=lambda b: b.decode("latin-1"))  # what the CLI prints


def arf_parse(data: bytes) -> None:
    report = parse(data)
    assert isinstance(report, ArfReport)
    json.dumps(dataclasses.asdict(report), default=lambda b: b.decode("latin-1"))


# --- the rewrite -------------------------------------------------------------------------------------------

SPEC = FooterSpec(DEFAULT_TEXT_TEMPLATE, DEFAULT_HTML_TEMPLATE, "ACME Ltd · 1 Test Street")
URL = "https://lists.example.test/u/fz7q-0-k2m4p6r8t1v3x5z7"  # nothing a fuzzer will type by chance
MAILTO = "unsub+fz7q@bounces.example.test"
TRACE = "fz7q-0-k2m4p6r8t1v3x5z7"


def _cte(part: Message) -> str:
    """The transfer encoding as RFC 2045 §6.1 reads it: a token, case-insensitive, with only CFWS around
    it (Python's email package doesn't even allow a trailing space; a reader that does is right)."""
    return str(part.get("content-transfer-encoding", "")).partition("(")[0].strip(" \t\r\n").lower()


def _decoded(part: Message) -> str:
    raw = part.get_payload(decode=True)
    if not isinstance(raw, bytes):
        return ""
    cte = _cte(part)
    if cte != str(part.get("content-transfer-encoding", "")).lower():  # the email package left it encoded
        if cte == "base64":
            raw = base64.b64decode(re.sub(rb"[^A-Za-z0-9+/]", b"", raw) + b"==", validate=False)
        elif cte == "quoted-printable":
            raw = quopri.decodestring(raw)
    try:
        return raw.decode(part.get_content_charset() or "us-ascii", "replace")
    except (LookupError, UnicodeError, ValueError, TypeError):  # unknown or non-text codec names
        return raw.decode("latin-1")


def rewrite(data: bytes) -> None:
    """prepare + render: refused as MimeError, or a message that parses with no new defects and has the
    link in exactly ``footer_parts`` text parts, once each (or once per placeholder the app wrote)."""
    try:
        template = prepare(data, SPEC, "fz:news:acme:relayd")
    except MimeError:
        return
    out = template.render(unsubscribe_url=URL, unsubscribe_mailto=MAILTO, relayd_id=TRACE)
    assert re.search(rb"(?<!\r)\n|\r(?!\n)", out) is None, "bare CR or LF in the output"
    before = list(message_from_bytes(re.sub(rb"\r\n|\r|\n", b"\r\n", data), policy=compat32).walk())
    after = list(message_from_bytes(out, policy=compat32).walk())
    assert len(after) == len(before), "the MIME structure changed"
    linked = 0
    for b, a in zip(before, after, strict=True):
        new_defects = {type(d) for d in a.defects} - {type(d) for d in b.defects}
        if data.startswith(b"From ") and b is before[0]:
            # the parser took the first line for an mbox "From " line; with fields prepended, it is misplaced
            new_defects.discard(email_errors.MisplacedEnvelopeHeaderDefect)
        assert not new_defects, new_defects
        if a.is_multipart():
            continue
        count = _decoded(a).count(URL)
        if count:
            linked += 1
            assert count == max(1, _decoded(b).count(PLACEHOLDER)), (count, a.get_content_type())
    assert linked == template.footer_parts, (linked, template.footer_parts)


# --- addresses and tokens ----------------------------------------------------------------------------------


def address_normalize(data: bytes) -> None:
    texts = [data.decode("utf-8", "replace"), data.decode("latin-1")]
    if _valid_surrogates(data):  # lone surrogates: text that can't be encoded back
        texts.append(data.decode("utf-8", "surrogatepass"))
    for text in texts:
        try:
            canonical = normalize(text)
        except AddressError:
            continue
        assert normalize(canonical) == canonical, (text, canonical)
        assert len(canonical.encode("utf-8")) <= 254
        assert canonical.count("@") >= 1 and canonical == canonical.strip()
        try:
            stripped = normalize(text, strip_plus_tags=True)
        except AddressError:
            raise AssertionError(f"{text!r} is valid but not without its +tag") from None
        assert normalize(stripped, strip_plus_tags=True) == stripped


def _valid_surrogates(data: bytes) -> bool:
    try:
        data.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return False
    return True


def token_codec(data: bytes) -> None:
    """make -> parse -> verify round-trips; verify refuses another address or purpose; parse and verify
    never raise on any text at all."""
    secret, rest = data[:32] or b"k", data[32:]
    queue_id = base64.b32encode(rest[:10].ljust(10, b"\0")).decode().lower()
    index = int.from_bytes(rest[10:13].ljust(3, b"\0"), "big") % 1_000_000
    address = rest[13:80].decode("utf-8", "replace")
    purpose = ("verp", "unsub", "trace")[len(rest) % 3]
    token = make_token(secret, purpose, queue_id, index, address)
    assert parse_token(token) == TokenRef(queue_id, index), token
    assert verify_token(secret, purpose, token, address) == TokenRef(queue_id, index)
    assert verify_token(secret, purpose, token.upper(), address) == TokenRef(queue_id, index)
    assert verify_token(secret, purpose + "x", token, address) is None
    if address.lower() + "x" != address.lower():
        assert verify_token(secret, purpose, token, address + "x") is None
    assert verify_token(secret + b"x", purpose, token, address) is None
    for text in (data.decode("utf-8", "replace"), data.decode("latin-1")):
        parse_token(text)
        verify_token(secret, purpose, text, address)


# --- the SMTP DATA reader ----------------------------------------------------------------------------------


class _Recorder:
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle_DATA(self, server: StrictSMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)
        self.messages.append(envelope.content)
        return "250 2.0.0 Ok: queued"


_TERMINATOR = b"\r\n.\r\n"
_BARE = re.compile(rb"(?<!\r)\n|\r(?!\n)")
_MAX_INPUT = 64 * 1024  # far under the size limit below: size refusals are tested elsewhere


def _without_terminator(data: bytes) -> bytes:
    """``data`` with every real end of data dot-stuffed away (one more dot after the CRLF), including one
    that only appears once the harness's own ``CRLF . CRLF`` follows, so the message can only end where
    the harness ends it. Smuggling candidates (``LF . LF``, ``CR . CR``, ...) are left alone."""
    body = data[:_MAX_INPUT]
    while True:
        stream = b"\r\n" + body + _TERMINATOR  # the leading CRLF: a "." line at the very start ends it too
        at = stream.find(_TERMINATOR)
        if at == len(body) + 2:
            return body
        body = body[:at] + b"." + body[at:]  # the dot of that terminator is at body index ``at``


def _unstuffed(text: bytes) -> bytes:
    lines = text.split(b"\r\n")[:-1]
    return b"".join((ln[1:] if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)


def _normalized(text: bytes) -> bytes | None:
    """What ``bare_newline = "normalize"`` must make of ``text``: every line, ended by CRLF or a bare LF, as
    a CRLF line, dot-unstuffed (a lone "." is content there and stays, RFC 5321 §4.5.2); None when a bare
    CR is in it, which must be refused."""
    out = []
    for piece in text.split(b"\n")[:-1]:
        line = piece[:-1] if piece.endswith(b"\r") else piece
        if b"\r" in line:
            return None
        out.append((line[1:] if line.startswith(b".") and len(line) > 1 else line) + b"\r\n")
    return b"".join(out)


async def _session(body: bytes, *, lf_as_crlf: bool) -> tuple[list[bytes], list[bytes]]:
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    recorder = _Recorder()
    limits = ConnectionLimits(10, 10)

    def factory() -> StrictSMTP:
        return StrictSMTP(
            recorder,
            limits=limits,
            data_timeout=5.0,
            hostname="fuzz.test",
            ident="relayd",
            data_size_limit=1_000_000,
            decode_data=False,
            enable_SMTPUTF8=True,
            normalize_bare_lf=lf_as_crlf,
        )

    transport, _ = await loop.connect_accepted_socket(factory, sock=theirs)
    try:
        reader, writer = await asyncio.open_connection(sock=ours)
        writer.write(
            b"EHLO fuzz.test\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n"
            + body
            + _TERMINATOR
            + b"QUIT\r\n"
        )
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout=10)
        writer.close()
    finally:
        transport.close()
    return [ln for ln in raw.split(b"\r\n") if ln], recorder.messages


def smtp_data(data: bytes) -> None:
    """One DATA phase, whatever its bytes, in both ``bare_newline`` modes: exactly one final reply, then
    QUIT's 221. A 250 means exactly one message with no bare CR or LF and no NUL: in reject mode the
    dot-unstuffed bytes as sent, in normalize mode the same with each bare LF taken as CRLF; anything else a
    554 refusal (a bare CR always, a bare LF in reject mode). Only the harness's own ``CRLF . CRLF`` may end
    the message in either mode."""
    body = _without_terminator(data)
    accepted: dict[bool, list[bytes]] = {}
    for lf_as_crlf in (False, True):
        replies, messages = asyncio.run(_session(body, lf_as_crlf=lf_as_crlf))
        codes = [r[:3] for r in replies if r[3:4] == b" "]  # final lines of each reply
        assert codes[:5] == [b"220", b"250", b"250", b"250", b"354"], replies
        tail = codes[5:]
        assert len(tail) == 2 and tail[1] == b"221", replies  # one answer to the message, then QUIT's
        expected = _normalized(body + b"\r\n") if lf_as_crlf else _unstuffed(body + b"\r\n")
        if tail[0] == b"250":
            assert expected is not None, "a bare CR was accepted"
            assert messages == [expected], "the message differs from what was sent"
            assert _BARE.search(messages[0]) is None, "a bare CR or LF was passed on"
            assert lf_as_crlf or _BARE.search(body) is None, "a bare CR or LF was accepted"
            assert b"\0" not in body, "a NUL was accepted"
        else:
            assert tail[0] in (b"554", b"552"), replies
            assert messages == []
            if expected is None or (not lf_as_crlf and _BARE.search(body) is not None):
                assert any(b"bare <CR> or <LF>" in r for r in replies) or any(b"5.6.0" in r for r in replies)
        accepted[lf_as_crlf] = messages
    if accepted[False]:
        assert accepted[True] == accepted[False], "normalize mode changed a message without a bare LF"


# --- registry and seeds ------------------------------------------------------------------------------------

TARGETS: dict[str, Callable[[bytes], None]] = {
    "dsn_classify": dsn_classify,
    "arf_parse": arf_parse,
    "rewrite": rewrite,
    "address_normalize": address_normalize,
    "token_codec": token_codec,
    "smtp_data": smtp_data,
}

_MESSAGE = (
    b"From: a@acme.example.test\r\nTo: b@example.test\r\nSubject: hi\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: multipart/alternative; boundary=b1\r\n\r\npre\r\n--b1\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
    b"Hello =C3=A9 {{unsubscribe_url}}\r\n--b1\r\nContent-Type: text/html; charset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\nPGh0bWw+PGJvZHk+SGVsbG88L2JvZHk+PC9odG1sPg==\r\n"
    b"--b1--\r\npost\r\n"
)


def seeds(name: str) -> list[bytes]:
    """A small starting corpus per target (atheris mutates from these)."""
    samples = sorted(CORPUS.glob("*/*.eml"))[:60] if CORPUS.exists() else []
    mail = [p.read_bytes() for p in samples]
    by_target: dict[str, list[bytes]] = {
        "dsn_classify": mail,
        "arf_parse": mail,
        "rewrite": [_MESSAGE, b"Subject: x\r\n\r\nplain body\r\n", *mail[:10]],
        "address_normalize": [
            b"Alice@Example.TEST",
            b'"john doe"@example.test',
            b"user+tag@b\xc3\xbccher.example",
            b"<u@[IPv6:2001:db8::1]>",
            b"a@xn--bcher-kva.example",
        ],
        "token_codec": [bytes(range(64)), b"k" * 32 + b"\x01" * 13 + b"bob@example.test"],
        "smtp_data": [
            b"Subject: x\r\n\r\nbody\r\n",
            b"Subject: x\r\n\r\nbody\n.\nMAIL FROM:<evil@example.test>\r\n",
            b"Subject: x\r\n\r\n..leading dot\r\n.\r\r\n\r.\r",
            b"Subject: x\r\n\r\n" + b"y" * 1200 + b"\r\n",
            b"Subject: x\n\nLF only\n..stuffed\n.\nlone dot\n\r\n.\r\n" + b"z" * 999 + b"\n",
        ],
    }
    return by_target[name] or [b""]
