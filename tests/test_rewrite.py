"""relayd.mail.rewrite: headers, footers in every text part, structure kept, broken MIME refused.

Every rendered message is checked the same way (``check_message``): canonical CRLF, lines <= 998, each new
field exactly once, the app's other header fields byte-exact, and a parallel walk of the stdlib trees of
input and output: same content types, boundaries, parameters and number of parts; attachments
byte-identical; each text part decodes to its original text plus exactly one footer (link and imprint once).
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from email import message_from_bytes
from email.charset import QP, Charset
from email.message import EmailMessage, Message
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import SMTP, compat32

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relayd.mail.rewrite import (
    DEFAULT_HTML_TEMPLATE,
    DEFAULT_TEXT_TEMPLATE,
    FooterSpec,
    MimeError,
    Template,
    format_feedback_id,
    prepare,
)

IMPRINT = "ACME Newsletter GmbH · Hauptstraße 1 · 10115 Berlin"  # Latin-1 representable
IMPRINT_EURO = "ACME GmbH · Stammkapital 25.000 € · Berlin"  # not in ISO-8859-1, in windows-1252
IMPRINT_JA = "株式会社アクメ 東京都千代田区1-1"  # Japanese: ISO-2022-JP / Shift_JIS, not Latin-1
SPEC = FooterSpec(DEFAULT_TEXT_TEMPLATE, DEFAULT_HTML_TEMPLATE, IMPRINT)
FEEDBACK_ID = "spring24:news:acme:relayd1"
URL_1 = "https://lists.acme.example.test/u/0001-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
URL_2 = "https://lists.acme.example.test/u/0002-" + "b" * 90  # longer than a QP line
CRLF_ONLY = re.compile(rb"(?<!\r)\n|\r(?!\n)")


@dataclass(frozen=True)
class Recipient:
    url: str
    mailto: str
    token: str


R1 = Recipient(URL_1, "unsub+0001@bounces.example.test", "rid.0001.abc")
R2 = Recipient(URL_2, "unsub+0002@bounces.example.test", "rid.0002.def")


def render(template: Template, rcpt: Recipient) -> bytes:
    return template.render(unsubscribe_url=rcpt.url, unsubscribe_mailto=rcpt.mailto, relayd_id=rcpt.token)


# ---------------------------------------------------------------------------------------------------------
# Fixture messages


def headers(extra: str = "") -> str:
    return (
        "From: ACME News <news@acme.example.test>\r\n"
        "To: reader@example.test\r\n"
        "Subject: Weekly\r\n"
        "Message-ID: <m1@acme.example.test>\r\n"
        "DKIM-Signature: v=1; a=rsa-sha256; d=acme.example.test; s=app; h=from:to:subject;\r\n"
        "\tbh=AAAA; b=BBBB\r\n" + extra
    )


def as_bytes(msg: Message) -> bytes:
    if isinstance(msg, EmailMessage):
        return msg.as_bytes(policy=SMTP)
    return msg.as_bytes(policy=compat32.clone(linesep="\r\n"))


def email_message(**extra: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "ACME News <news@acme.example.test>"
    msg["To"] = "reader@example.test"
    msg["Subject"] = "Weekly news"
    for name, value in extra.items():
        msg[name.replace("_", "-")] = value
    return msg


TEXT = "Hello Jürgen,\n\nthis week: news, events and offers.\nRegards\n"
HTML = (
    "<html><head><title>News</title></head><body>\n<p>Hello J&uuml;rgen,</p>\n<p>news</p>\n</body></html>\n"
)


def plain_8bit() -> bytes:
    msg = email_message()
    msg.set_content(TEXT, cte="8bit")
    return as_bytes(msg)


def plain_ascii_non_mime() -> bytes:
    return (headers() + "\r\nJust ASCII text,\r\nno MIME headers at all.\r\n").encode()


def plain_header_only() -> bytes:
    return b"From: a@acme.example.test\r\nTo: b@example.test\r\nSubject: no body\r\n"


def html_with_body(cte: str) -> bytes:
    msg = email_message()
    msg.set_content(HTML, subtype="html", cte=cte)
    return as_bytes(msg)


def html_without_body() -> bytes:
    msg = email_message()
    msg.set_content(
        "<p>Fragment without body element</p>\n<p>second</p>", subtype="html", cte="quoted-printable"
    )
    return as_bytes(msg)


def html_upper_body_tag() -> bytes:
    return (
        headers("MIME-Version: 1.0\r\nContent-Type: text/html; charset=us-ascii\r\n")
        + "\r\n<HTML><BODY><p>x</p></BODY >\r\n</HTML>\r\n"
    ).encode()


def alternative(cte: str = "quoted-printable") -> bytes:
    msg = email_message(List_Id="<news.acme.example.test>")
    msg.set_content(TEXT, cte=cte)
    msg.add_alternative(HTML, subtype="html", cte=cte)
    return as_bytes(msg)


PDF = b"%PDF-1.4\n" + bytes(range(256)) * 8


def mixed_with_attachment() -> bytes:
    msg = email_message()
    msg.set_content(TEXT, cte="quoted-printable")
    msg.add_alternative(HTML, subtype="html", cte="base64")
    msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="report.pdf")
    msg.add_attachment("notes, a text attachment\n", filename="notes.txt")
    msg.preamble = "This is a multi-part message in MIME format."
    msg.epilogue = "epilogue text"
    return as_bytes(msg)


def related_in_mixed() -> bytes:
    msg = email_message()
    msg.set_content(TEXT)
    msg.add_alternative(HTML.replace("<p>news</p>", '<p><img src="cid:logo@acme"></p>'), subtype="html")
    html_part = msg.get_payload()[1]  # type: ignore[index]
    assert isinstance(html_part, EmailMessage)
    html_part.add_related(b"\x89PNG\r\n\x1a\n" + b"\x00" * 300, "image", "png", cid="<logo@acme>")
    msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="report.pdf")
    return as_bytes(msg)


def base64_plain() -> bytes:
    msg = email_message()
    msg.set_content(TEXT * 20, cte="base64")
    return as_bytes(msg)


def legacy(charset: str, text: str, cte: str, subtype: str = "plain") -> bytes:
    """A single-part message in ``charset`` built by hand (the stdlib would pick its own encodings)."""
    data = text.replace("\n", "\r\n").encode(charset)
    if cte == "base64":
        body = base64.encodebytes(data).replace(b"\n", b"\r\n")
    elif cte == "quoted-printable":
        import binascii

        body = binascii.b2a_qp(data.replace(b"\r\n", b"\n"), istext=True).replace(b"\n", b"\r\n")
    else:
        body = data
    head = headers(
        f'MIME-Version: 1.0\r\nContent-Type: text/{subtype}; charset="{charset}"; format=flowed\r\n'
        f"Content-Transfer-Encoding: {cte}\r\n"
    )
    return head.encode() + b"\r\n" + body


JA_TEXT = "アクメからのお知らせです。\n今週のニュース。\n"


def placeholder_message() -> bytes:
    msg = email_message()
    msg.set_content("Hi,\n\nunsubscribe here: {{unsubscribe_url}}\n", cte="base64")
    msg.add_alternative(
        '<html><body><p><a href="{{unsubscribe_url}}">leave the list</a></p></body></html>\n',
        subtype="html",
        cte="quoted-printable",
    )
    return as_bytes(msg)


def forged_headers() -> bytes:
    extra = (
        "List-Unsubscribe: <https://evil.example/u>\r\n"
        "list-unsubscribe-post: List-Unsubscribe=One-Click\r\n"
        "Feedback-ID: fake:fake:fake:fake\r\n"
        "X-Relayd-ID: forged-token\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
    )
    return (headers(extra) + "\r\nbody\r\n").encode()


def signed_message() -> bytes:
    inner = MIMEText("signed text\n", "plain", "us-ascii")
    sig = MIMEApplication(b"signature", "pkcs7-signature", name="smime.p7s")
    outer = MIMEMultipart("signed", protocol="application/pkcs7-signature", micalg="sha-256")
    outer.attach(inner)
    outer.attach(sig)
    outer["From"] = "a@acme.example.test"
    return as_bytes(outer)


def forwarded_message() -> bytes:
    inner = email_message()
    inner.set_content("the forwarded text\n")
    msg = email_message()
    msg.set_content("see attached\n")
    msg.add_attachment(inner)
    return as_bytes(msg)


def long_line_html() -> bytes:
    """8bit HTML with a 1,500-octet line (RFC 5322 §2.1.1 violation the rewrite repairs with QP)."""
    line = "<p>" + "x" * 1500 + "</p>"
    return (
        headers(
            "MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n"
        )
        + f"\r\n<html><body>{line}</body></html>\r\n"
    ).encode()


def qp_split_body_tag() -> bytes:
    """QP where a soft line break splits ``</body>``: the tag is only visible after decoding."""
    body = "<html><body><p>" + "y" * 60 + "</p></bo=\r\ndy></html>\r\n"
    head = headers("MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n")
    return (head + "Content-Transfer-Encoding: quoted-printable\r\n\r\n" + body).encode()


def odd_parts() -> bytes:
    """Hand-written multipart with the corner cases generators never produce."""
    return (
        headers('MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="outer"\r\n')
        + "\r\npreamble\r\n"
        "--outer\r\n"
        "\r\nno header fields at all: text/plain us-ascii by default (RFC 2045 section 5.2)\r\n"
        "--outer \t\r\n"  # transport padding after the boundary
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        "ends in a bare soft break=\r\n"
        "--outer\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n"
        "\r\n"  # empty body
        "--outer\r\n"
        "Content-Type: text/html; charset=utf-8\r\n"  # header-only part: no empty line, no body
        "--outer\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Disposition: attachment; filename=keep.txt\r\n\r\n"
        "attached text stays as it is\r\n"
        "--outer--\r\n"
        "epilogue\r\n"
    ).encode()


def bare_lf() -> bytes:
    return plain_8bit().replace(b"\r\n", b"\n")


def invalid_utf8_8bit() -> bytes:
    head = headers(
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
    )
    return head.encode() + b"\r\nlatin-1 bytes labelled utf-8: caf\xe9\r\n"


GOOD = [
    pytest.param(plain_8bit(), SPEC, id="plain-utf8-8bit"),
    pytest.param(plain_ascii_non_mime(), SPEC, id="plain-non-mime-needs-utf8"),
    pytest.param(plain_header_only(), SPEC, id="header-only-no-body"),
    pytest.param(html_with_body("quoted-printable"), SPEC, id="html-body-qp"),
    pytest.param(html_with_body("8bit"), SPEC, id="html-body-8bit"),
    pytest.param(html_with_body("base64"), SPEC, id="html-body-base64"),
    pytest.param(html_without_body(), SPEC, id="html-no-body-element"),
    pytest.param(html_upper_body_tag(), SPEC, id="html-uppercase-body-tag"),
    pytest.param(alternative(), SPEC, id="alternative-qp"),
    pytest.param(alternative("8bit"), SPEC, id="alternative-8bit"),
    pytest.param(alternative("base64"), SPEC, id="alternative-base64"),
    pytest.param(mixed_with_attachment(), SPEC, id="mixed-with-attachments"),
    pytest.param(related_in_mixed(), SPEC, id="related-nested-in-mixed"),
    pytest.param(base64_plain(), SPEC, id="plain-base64-long"),
    pytest.param(legacy("iso-8859-1", TEXT, "quoted-printable"), SPEC, id="latin1-qp-footer-fits"),
    pytest.param(legacy("iso-8859-1", TEXT, "8bit"), SPEC, id="latin1-8bit-footer-fits"),
    pytest.param(
        legacy("iso-8859-1", TEXT, "8bit"),
        FooterSpec(DEFAULT_TEXT_TEMPLATE, DEFAULT_HTML_TEMPLATE, IMPRINT_EURO),
        id="latin1-8bit-euro-reencoded-utf8",
    ),
    pytest.param(
        legacy("windows-1252", TEXT, "quoted-printable"),
        FooterSpec(DEFAULT_TEXT_TEMPLATE, DEFAULT_HTML_TEMPLATE, IMPRINT_EURO),
        id="cp1252-qp-euro-fits",
    ),
    pytest.param(
        legacy("iso-2022-jp", JA_TEXT, "7bit"),
        FooterSpec(DEFAULT_TEXT_TEMPLATE, DEFAULT_HTML_TEMPLATE, IMPRINT_JA),
        id="iso2022jp-7bit-japanese-footer",
    ),
    pytest.param(legacy("iso-2022-jp", JA_TEXT, "7bit"), SPEC, id="iso2022jp-7bit-latin-footer-reencoded"),
    pytest.param(
        legacy("shift_jis", JA_TEXT, "base64"),
        FooterSpec(DEFAULT_TEXT_TEMPLATE, DEFAULT_HTML_TEMPLATE, IMPRINT_JA),
        id="shiftjis-base64-japanese-footer",
    ),
    pytest.param(
        legacy("shift_jis", "<html><body><p>" + JA_TEXT + "</p></body></html>\n", "8bit", "html"),
        FooterSpec(DEFAULT_TEXT_TEMPLATE, DEFAULT_HTML_TEMPLATE, IMPRINT_JA),
        id="shiftjis-html-8bit",
    ),
    pytest.param(legacy("us-ascii", "plain ascii\n", "7bit"), SPEC, id="ascii-7bit-reencoded-utf8-qp"),
    pytest.param(forged_headers(), SPEC, id="forged-headers-removed"),
    pytest.param(forwarded_message(), SPEC, id="message-rfc822-attachment-untouched"),
    pytest.param(long_line_html(), SPEC, id="html-8bit-long-line-to-qp"),
    pytest.param(qp_split_body_tag(), SPEC, id="qp-body-tag-split-by-soft-break"),
    pytest.param(bare_lf(), SPEC, id="bare-lf-canonicalised"),
    pytest.param(odd_parts(), SPEC, id="headerless-padded-empty-header-only-parts"),
    pytest.param(invalid_utf8_8bit(), SPEC, id="invalid-utf8-kept-byte-exact"),
]


# ---------------------------------------------------------------------------------------------------------
# The checker


def decoded_text(part: Message) -> str:
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    charset = part.get_content_charset() or "us-ascii"
    return payload.decode(charset, "surrogateescape").replace("\r\n", "\n")


def is_footer_part(part: Message) -> bool:
    return (
        part.get_content_type() in ("text/plain", "text/html")
        and part.get_content_disposition() != "attachment"
    )


def expected_text(original: str, subtype: str, url: str, spec: FooterSpec) -> str:
    """Independent statement of the footer rule, to compare decoded parts against."""
    substituted = "{{unsubscribe_url}}" in original
    if subtype == "html":
        template = spec.html_imprint_template if substituted else spec.html_template
        imprint = html.escape(spec.imprint).replace("\n", "<br>\n")
    else:
        template = spec.text_imprint_template if substituted else spec.text_template
        imprint = spec.imprint
    footer = template.replace("{url}", url).replace("{imprint}", imprint)
    text = original.replace("{{unsubscribe_url}}", url)
    at = len(text)
    if subtype == "html":
        found = [m.start() for m in re.finditer(r"</body\s*>", text, re.IGNORECASE)]
        at = found[-1] if found else len(text)
    return text[:at] + footer + text[at:]


def header_block(raw: bytes) -> bytes:
    end = raw.find(b"\r\n\r\n")
    return raw if end < 0 else raw[: end + 2]


def fields_of(block: bytes) -> list[bytes]:
    return re.findall(rb"[^ \t\r\n][^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", block)


NEW = (b"list-unsubscribe", b"list-unsubscribe-post", b"feedback-id", b"x-relayd-id")


def name_of(field: bytes) -> bytes:
    return field.split(b":", 1)[0].strip().lower()


def check_message(raw_in: bytes, out: bytes, rcpt: Recipient, spec: FooterSpec) -> int:
    """Assert every invariant of a rendered message; returns the number of footered parts."""
    assert CRLF_ONLY.search(out) is None, "bare CR or LF in output"
    assert max(len(line) for line in out.split(b"\r\n")) <= 998
    raw_in = re.sub(rb"\r\n|\r|\n", b"\r\n", raw_in)
    before = message_from_bytes(raw_in, policy=compat32)
    after = message_from_bytes(out, policy=compat32)
    assert not after.defects

    # Headers: each new field once, right values; the app's fields otherwise byte-exact and in order.
    assert after.get_all("List-Unsubscribe") == [
        f"<{rcpt.url}>,\r\n <mailto:{rcpt.mailto}>"
    ] or after.get_all("List-Unsubscribe") == [f"<{rcpt.url}>, <mailto:{rcpt.mailto}>"]
    assert after.get_all("List-Unsubscribe-Post") == ["List-Unsubscribe=One-Click"]
    assert after.get_all("Feedback-ID") == [FEEDBACK_ID]
    assert after.get_all("X-Relayd-ID") == [rcpt.token]
    assert len(after.get_all("MIME-Version") or []) <= 1
    # (MIME-Version and, for a single text part, the content fields may change: compared in the tree walk)
    content = (*NEW, b"mime-version", b"content-type", b"content-transfer-encoding")
    kept_in = [f for f in fields_of(header_block(raw_in)) if name_of(f) not in content]
    kept_out = [f for f in fields_of(header_block(out)) if name_of(f) not in content]
    assert kept_out == kept_in
    if before.get_content_maintype() == "multipart":
        assert after.get_all("Content-Type") == before.get_all("Content-Type")
    return compare_trees(before, after, rcpt.url, spec, top=True)


def compare_trees(before: Message, after: Message, url: str, spec: FooterSpec, *, top: bool = False) -> int:
    assert after.get_content_type() == before.get_content_type()
    assert after.get_boundary() == before.get_boundary()
    if before.get_content_maintype() == "multipart":
        b_parts, a_parts = before.get_payload(), after.get_payload()
        assert isinstance(b_parts, list) and isinstance(a_parts, list)
        assert len(a_parts) == len(b_parts)
        assert after.preamble == before.preamble
        assert after.epilogue == before.epilogue
        assert after.get_params() == before.get_params()
        if before.get_content_subtype() in ("signed", "encrypted"):
            assert after.as_bytes() == before.as_bytes()
            return 0
        return sum(compare_trees(b, a, url, spec) for b, a in zip(b_parts, a_parts, strict=True))
    if not is_footer_part(before):
        if before.get_content_maintype() == "message":
            assert after.as_bytes() == before.as_bytes() or top
            return 0
        assert after.get_payload(decode=True) == before.get_payload(decode=True)
        assert after.get_payload() == before.get_payload()  # byte-identical, not just equivalent
        assert after.items() == before.items() or top  # top-level fields: checked in check_message
        return 0
    params_b = [p for p in (before.get_params() or [])[1:] if p[0] != "charset"]
    params_a = [p for p in (after.get_params() or [])[1:] if p[0] != "charset"]
    assert params_a == params_b
    original = decoded_text(before)
    text = decoded_text(after)
    assert text == expected_text(original, before.get_content_subtype(), url, spec)
    shown = html.escape(spec.imprint) if before.get_content_subtype() == "html" else spec.imprint
    assert text.count(shown) == 1
    assert text.count(url) == max(1, original.count("{{unsubscribe_url}}"))
    return 1


# ---------------------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize(("raw", "spec"), GOOD)
def test_rewrite_keeps_structure_and_adds_one_footer_per_text_part(raw: bytes, spec: FooterSpec) -> None:
    template = prepare(raw, spec, FEEDBACK_ID)
    out = render(template, R1)
    footered = check_message(raw, out, R1, spec)
    assert footered == template.footer_parts


@pytest.mark.parametrize(("raw", "spec"), GOOD)
def test_two_recipients_get_their_own_urls(raw: bytes, spec: FooterSpec) -> None:
    template = prepare(raw, spec, FEEDBACK_ID)
    out1, out2 = render(template, R1), render(template, R2)
    assert URL_1.encode() not in out2 and URL_2.encode() not in out1
    check_message(raw, out1, R1, spec)
    check_message(raw, out2, R2, spec)
    assert render(template, R1) == out1  # rendering is deterministic and leaves the template alone


def test_forged_headers_removed_and_new_ones_on_top() -> None:
    out = render(prepare(forged_headers(), SPEC, FEEDBACK_ID), R1)
    head = header_block(out)
    assert b"evil.example" not in head and b"forged-token" not in head and b"fake:fake" not in head
    assert head.startswith(b"List-Unsubscribe: <" + URL_1.encode() + b">,\r\n <mailto:")
    names = [name_of(f) for f in fields_of(head)]
    assert names[:4] == list(NEW)
    assert (
        b"DKIM-Signature: v=1; a=rsa-sha256; d=acme.example.test; s=app; h=from:to:subject;\r\n\tbh=AAAA"
        in out
    )


def test_short_list_unsubscribe_stays_on_one_line() -> None:
    out = prepare(plain_8bit(), SPEC, FEEDBACK_ID).render(
        unsubscribe_url="https://u.test/x", unsubscribe_mailto="u@b.test", relayd_id="t"
    )
    assert b"List-Unsubscribe: <https://u.test/x>, <mailto:u@b.test>\r\n" in out


def test_untouched_bytes_are_byte_exact() -> None:
    raw = mixed_with_attachment()
    out = render(prepare(raw, SPEC, FEEDBACK_ID), R1)
    msg = message_from_bytes(raw, policy=compat32)
    boundary = msg.get_boundary()
    assert boundary is not None
    # the attachments' complete raw bytes, headers and base64 lines, appear unchanged
    for chunk in raw.split(b"--" + boundary.encode())[2:4]:
        assert chunk in out
    assert out.endswith(raw[raw.rindex(b"--" + boundary.encode() + b"--") :])


def test_placeholder_substituted_once_and_imprint_still_appended() -> None:
    raw = placeholder_message()
    out = render(prepare(raw, SPEC, FEEDBACK_ID), R2)
    check_message(raw, out, R2, SPEC)
    msg = message_from_bytes(out, policy=compat32)
    texts = [decoded_text(p) for p in msg.walk() if is_footer_part(p)]
    assert len(texts) == 2
    for text in texts:
        assert "{{unsubscribe_url}}" not in text
        assert text.count(URL_2) == 1
        assert "Unsubscribe" not in text  # no second link from the footer template
    assert texts[1].count(html.escape(IMPRINT)) == 1


@pytest.mark.parametrize(
    ("raw", "spec", "charset", "cte"),
    [
        pytest.param(legacy("iso-8859-1", TEXT, "8bit"), SPEC, "iso-8859-1", "8bit", id="latin1-kept"),
        pytest.param(
            legacy("iso-8859-1", TEXT, "8bit"),
            FooterSpec(DEFAULT_TEXT_TEMPLATE, DEFAULT_HTML_TEMPLATE, IMPRINT_EURO),
            "utf-8",
            "8bit",
            id="latin1-euro-to-utf8",
        ),
        pytest.param(
            legacy("iso-2022-jp", JA_TEXT, "7bit"),
            FooterSpec(DEFAULT_TEXT_TEMPLATE, DEFAULT_HTML_TEMPLATE, IMPRINT_JA),
            "iso-2022-jp",
            "7bit",
            id="iso2022jp-kept",
        ),
        pytest.param(
            legacy("iso-2022-jp", JA_TEXT, "7bit"), SPEC, "utf-8", "quoted-printable", id="jp-to-utf8-qp"
        ),
        pytest.param(
            legacy("us-ascii", "hi\n", "7bit"), SPEC, "utf-8", "quoted-printable", id="ascii-to-utf8-qp"
        ),
        pytest.param(plain_ascii_non_mime(), SPEC, "utf-8", "quoted-printable", id="non-mime-to-utf8-qp"),
        pytest.param(long_line_html(), SPEC, "utf-8", "quoted-printable", id="long-8bit-line-to-qp"),
    ],
)
def test_charset_and_transfer_encoding_of_rewritten_part(
    raw: bytes, spec: FooterSpec, charset: str, cte: str
) -> None:
    out = render(prepare(raw, spec, FEEDBACK_ID), R1)
    msg = message_from_bytes(out, policy=compat32)
    assert msg.get_content_charset() == charset
    assert (msg.get("Content-Transfer-Encoding") or "7bit").lower() == cte
    assert msg.get_param("format") == (message_from_bytes(raw, policy=compat32).get_param("format"))
    assert len(msg.get_all("MIME-Version") or []) == 1


def test_qp_lines_stay_short_with_long_urls() -> None:
    out = render(prepare(alternative(), SPEC, FEEDBACK_ID), R2)
    body = out.split(b"\r\n\r\n", 1)[1]
    for line in body.split(b"\r\n"):
        assert len(line) <= 76


def test_signed_multipart_untouched() -> None:
    raw = signed_message()
    template = prepare(raw, SPEC, FEEDBACK_ID)
    assert template.footer_parts == 0
    out = render(template, R1)
    assert out.endswith(raw.split(b"\r\n\r\n", 1)[1])


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        pytest.param(
            b"Content-Type: multipart/mixed\r\n\r\n--x\r\n\r\nhi\r\n--x--\r\n",
            "without boundary",
            id="no-boundary",
        ),
        pytest.param(
            b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\njust text\r\n',
            "never occurs",
            id="boundary-absent",
        ),
        pytest.param(
            b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
            b"--b1\r\nContent-Type: text/plain\r\n\r\ntrunc",
            "close delimiter",
            id="truncated-no-close-delimiter",
        ),
        pytest.param(
            b"From: a@example.test\r\nthis is not a header\r\nSubject: x\r\n\r\nbody\r\n",
            "separator",
            id="no-header-body-separator",
        ),
        pytest.param(
            b" folded\r\nFrom: a@example.test\r\n\r\nbody\r\n", "continuation", id="first-line-continuation"
        ),
        pytest.param(
            # RFC 5322 §4.5 obs-syntax, but the stdlib (and other parsers) end the header there: ambiguous
            b"From: a@example.test\r\nSubject : x\r\n\r\nbody\r\n",
            "separator",
            id="space-before-colon-ambiguous",
        ),
        pytest.param(
            b'Content-Type: multipart/mixed; boundary="b1"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
            b"--b1\r\n\r\nx\r\n--b1--\r\n",
            "7bit/8bit/binary",
            id="multipart-with-base64-cte",
        ),
        pytest.param(
            b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\nnot*base64!\r\n",
            "base64",
            id="invalid-base64-text",
        ),
        pytest.param(
            b"Content-Type: text/plain\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\nbegin 644 x\r\n",
            "Content-Transfer-Encoding",
            id="unknown-cte",
        ),
        pytest.param(
            b"Content-Type: text/plain; charset=x-martian\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\n\xe9\xe8\r\n",
            "unknown charset",
            id="unknown-charset-8bit",
        ),
        pytest.param(
            b"Content-Type: text/plain; charset=us-ascii\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\ncaf\xe9\r\n",
            "not valid",
            id="invalid-ascii-footer-needs-utf8",
        ),
        pytest.param(
            b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n--b1\r\nContent-Type: text/plain\r\n'
            b"Content-Type: text/html\r\n\r\nx\r\n--b1--\r\n",
            "more than one",
            id="duplicate-content-type",
        ),
        pytest.param(
            b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
            b"--b1\r\nContent-Type: text/plain\r\n\r\nx\r\n"
            b"--b1\r\nContent-Type: application/octet-stream\r\n\r\n" + b"z" * 1200 + b"\r\n--b1--\r\n",
            "998",
            id="long-line-in-attachment",
        ),
        pytest.param(b"Subject: " + b"s" * 1200 + b"\r\n\r\nbody\r\n", "998", id="long-header-line"),
    ],
)
def test_broken_mime_raises_mime_error(raw: bytes, reason: str) -> None:
    with pytest.raises(MimeError, match=reason):
        prepare(raw, SPEC, FEEDBACK_ID)


def test_mime_error_is_a_value_error() -> None:
    assert issubclass(MimeError, ValueError)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"unsubscribe_url": "https://x.test/u?a=b"}, id="url-with-equals"),
        pytest.param({"unsubscribe_url": "https://x.test/%41"}, id="url-with-percent"),
        pytest.param({"unsubscribe_url": "https://x.test/\r\nBcc: x"}, id="url-header-injection"),
        pytest.param({"unsubscribe_mailto": "no-at-sign"}, id="mailto-not-address"),
        pytest.param({"relayd_id": "a b"}, id="token-with-space"),
        pytest.param({"unsubscribe_url": "https://x.test/" + "a" * 300}, id="url-too-long"),
    ],
)
def test_render_rejects_unsafe_values(kwargs: dict[str, str]) -> None:
    values = {"unsubscribe_url": URL_1, "unsubscribe_mailto": R1.mailto, "relayd_id": R1.token} | kwargs
    with pytest.raises(ValueError):
        prepare(plain_8bit(), SPEC, FEEDBACK_ID).render(**values)


def test_feedback_id() -> None:
    assert format_feedback_id("c1", "news", "acme", "relayd1") == "c1:news:acme:relayd1"
    with pytest.raises(ValueError):
        format_feedback_id("c:1", "news", "acme", "relayd1")
    with pytest.raises(ValueError):
        prepare(plain_8bit(), SPEC, "bad\r\nBcc: x")


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"text_template": "no link {imprint}"}, id="text-without-url"),
        pytest.param({"html_template": "{url}{url}"}, id="html-url-twice"),
        pytest.param({"text_imprint_template": "{url}"}, id="imprint-template-with-url"),
        pytest.param({"imprint": "bad\x00imprint"}, id="imprint-control-char"),
    ],
)
def test_footer_spec_validation(kwargs: dict[str, str]) -> None:
    values = {"text_template": DEFAULT_TEXT_TEMPLATE, "html_template": DEFAULT_HTML_TEMPLATE, "imprint": "x"}
    with pytest.raises(ValueError):
        FooterSpec(**(values | kwargs))


def test_html_imprint_escaped_and_css_braces_literal() -> None:
    spec = FooterSpec(
        "\n{url}\n{imprint}\n",
        "<style>p {color: red}</style><p><a href='{url}'>out</a> {imprint}</p>",
        "Smith & Sons <Ltd>\nLondon",
    )
    out = render(prepare(html_with_body("8bit"), spec, FEEDBACK_ID), R1)
    text = decoded_text(message_from_bytes(out, policy=compat32))
    assert "Smith &amp; Sons &lt;Ltd&gt;<br>\nLondon" in text.replace("\r\n", "\n")
    assert "p {color: red}" in text


# ---------------------------------------------------------------------------------------------------------
# Properties


_TEXT_CHARS = st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\u2028\u2029\x85")
_LINES = st.lists(st.text(_TEXT_CHARS, max_size=120), min_size=0, max_size=12).map("\n".join)
_CHARSETS = ["utf-8", "iso-8859-1", "windows-1252", "us-ascii", "iso-2022-jp", "shift_jis", "koi8-r"]


@st.composite
def text_leaf(draw: st.DrawFn) -> Message:
    text = draw(_LINES)
    subtype = draw(st.sampled_from(["plain", "html"]))
    if subtype == "html" and draw(st.booleans()):
        text = f"<html><body>{html.escape(text)}</body></html>\n"
    charset = draw(st.sampled_from(_CHARSETS))
    text = text.encode(charset, "replace").decode(charset)
    if draw(st.booleans()):
        part = MIMEText(text, subtype, charset)  # compat32: the charset's own default encoding
        if draw(st.booleans()) and charset != "iso-2022-jp":
            del part["Content-Transfer-Encoding"]
            cs = Charset(charset)
            cs.body_encoding = QP
            part.set_payload(text, cs)
        return part
    msg = EmailMessage()
    if charset in ("us-ascii", "iso-2022-jp"):
        msg.set_content(text, subtype=subtype, charset=charset)
    else:
        cte = draw(st.sampled_from(["quoted-printable", "base64", "8bit"]))
        if cte == "8bit" and max((len(line.encode(charset)) for line in text.split("\n")), default=0) > 900:
            cte = "base64"
        msg.set_content(text, subtype=subtype, charset=charset, cte=cte)
    return msg


attachment_leaf = st.binary(max_size=300).map(lambda data: MIMEApplication(data, "octet-stream"))


def multipart(children: st.SearchStrategy[Message]) -> st.SearchStrategy[Message]:
    def build(args: tuple[str, list[Message]]) -> Message:
        subtype, parts = args
        node = MIMEMultipart(subtype)
        for part in parts:
            node.attach(part)
        return node

    return st.tuples(
        st.sampled_from(["mixed", "alternative", "related"]), st.lists(children, min_size=1, max_size=3)
    ).map(build)


structures = st.recursive(st.one_of(text_leaf(), attachment_leaf), multipart, max_leaves=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(structures)
def test_property_random_structures_rewrite_cleanly(msg: Message) -> None:
    msg["From"] = "a@acme.example.test"
    raw = as_bytes(msg)
    spec = FooterSpec(DEFAULT_TEXT_TEMPLATE, DEFAULT_HTML_TEMPLATE, IMPRINT_EURO)
    template = prepare(raw, spec, FEEDBACK_ID)
    expected_parts = sum(1 for p in message_from_bytes(raw, policy=compat32).walk() if is_footer_part(p))
    assert template.footer_parts == expected_parts
    assert check_message(raw, render(template, R2), R2, spec) == expected_parts


def mutate(raw: bytes, data: st.DataObject) -> bytes:
    op = data.draw(st.sampled_from(["truncate", "delete", "insert", "flip"]))
    at = data.draw(st.integers(0, len(raw)))
    if op == "truncate":
        return raw[:at]
    if op == "delete":
        return raw[:at] + raw[at + data.draw(st.integers(1, 40)) :]
    if op == "insert":
        return (
            raw[:at]
            + data.draw(st.sampled_from([b"\r\n", b"--", b"\r\n\r\n", b"=", b"\xff", b" ", b":"]))
            + raw[at:]
        )
    return raw[:at] + bytes([data.draw(st.integers(0, 255))]) + raw[at + 1 :]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_property_mangled_input_renders_or_raises_mime_error(data: st.DataObject) -> None:
    pool: list[bytes] = [p.values[0] for p in GOOD if isinstance(p.values[0], bytes)]
    raw = data.draw(st.sampled_from([*pool, placeholder_message(), signed_message()]))
    for _ in range(data.draw(st.integers(1, 4))):
        raw = mutate(raw, data)
    try:
        template = prepare(raw, SPEC, FEEDBACK_ID)
    except MimeError:
        return
    out = render(template, R1)
    assert CRLF_ONLY.search(out) is None
    assert max(len(line) for line in out.split(b"\r\n")) <= 998
    parts = footered_parts(message_from_bytes(out, policy=compat32))
    assert len(parts) == template.footer_parts
    for part in parts:
        text = lenient_text(part)
        assert text.count(URL_1) >= 1
        assert text.count(IMPRINT if part.get_content_subtype() == "plain" else html.escape(IMPRINT)) == 1


def footered_parts(node: Message) -> list[Message]:
    """The parts the rewrite footers: text/plain and text/html outside signed, encrypted and message/*."""
    if node.get_content_maintype() == "multipart":
        if node.get_content_subtype() in ("signed", "encrypted"):
            return []
        children = node.get_payload()
        assert isinstance(children, list)
        return [p for child in children if isinstance(child, Message) for p in footered_parts(child)]
    return [node] if is_footer_part(node) else []


def lenient_text(part: Message) -> str:
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    try:
        return payload.decode(part.get_content_charset() or "us-ascii", "surrogateescape")
    except (LookupError, ValueError):
        return payload.decode("ascii", "surrogateescape")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_property_random_bytes_never_raise_anything_but_mime_error(raw: bytes) -> None:
    try:
        template = prepare(raw, SPEC, FEEDBACK_ID)
    except MimeError:
        return
    out = render(template, R1)
    assert CRLF_ONLY.search(out) is None
