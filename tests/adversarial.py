"""Hostile bounces and complaints built to make a careless parser backtrack.

Each builder returns a complete message of about ``size`` bytes whose attacker-controlled
text repeats the start of something a parser looks for without ever finishing it: the
first pieces of a multi-piece phrase of :data:`relayd.reports.dsn.patterns.PHRASES` (a lazy
``a.*?b.*?c`` chain over that text is cubic), ``<script `` without a closing tag, ``<``
followed by address characters, SMTP continuation prefixes. They are shared by
``tests/test_redos.py`` (hang detection) and ``bench/adversarial.py`` /
``bench/hostile.py`` (figures), so both measure the same inputs.
"""

from __future__ import annotations

from relayd.reports.dsn.patterns import PHRASES

#: The filler of the headline attack: the first two pieces of "mailbox ... exceeded"-style
#: phrases, never followed by what completes them.
MAILBOX_EXCEEDED = "mailbox exceeded "


def _repeat(unit: str, size: int) -> str:
    """``unit`` repeated to at least ``size`` characters (at least once)."""
    return unit * max(1, -(-size // max(1, len(unit))))


def phrase_prefixes() -> list[str]:
    """For every multi-piece phrase, its pieces but the last, as one repeatable unit.

    ``"mailbox ... does not exist"`` gives ``"mailbox "``; ``"a ... b ... c"`` gives
    ``"a b "``: text made of these units starts each phrase over and over and never
    completes it, the worst case for an ordered-pieces matcher.
    """
    units: dict[str, None] = {}
    for fragments in PHRASES.values():
        for fragment in fragments:
            pieces = fragment.split(" ... ")
            if len(pieces) > 1:
                units.setdefault(" ".join(piece.strip() for piece in pieces[:-1]) + " ", None)
    return list(units)


def dsn(diagnostic: str, *, recipient: str = "victim@example.test", status: str = "5.0.0") -> bytes:
    """A tidy RFC 3464 ``multipart/report`` whose Diagnostic-Code is ``diagnostic``."""
    return (
        "From: MAILER-DAEMON@mx.example.test\n"
        "To: bounce+x@bounces.example.test\n"
        "Subject: Undelivered Mail Returned to Sender\n"
        "MIME-Version: 1.0\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\n'
        "\n"
        "--b\n"
        "Content-Type: text/plain\n"
        "\n"
        f"Delivery to <{recipient}> failed.\n"
        "\n"
        "--b\n"
        "Content-Type: message/delivery-status\n"
        "\n"
        "Reporting-MTA: dns; mx.example.test\n"
        "\n"
        f"Final-Recipient: rfc822; {recipient}\n"
        "Action: failed\n"
        f"Status: {status}\n"
        f"Diagnostic-Code: smtp; {diagnostic}\n"
        "\n"
        "--b--\n"
    ).encode()


def adversarial_dsn(size: int, filler: str = MAILBOX_EXCEEDED) -> bytes:
    """A DSN whose Diagnostic-Code is ``550 `` + ``filler`` repeated to ``size`` bytes."""
    return dsn("550 " + _repeat(filler, size))


def text_bounce(body: str, *, subject: str = "Undelivered Mail Returned to Sender") -> bytes:
    """A free-text bounce (no RFC 3464 part): the heuristic reader's input."""
    return (
        "From: MAILER-DAEMON@mx.example.test\n"
        "To: bounce+x@bounces.example.test\n"
        f"Subject: {subject}\n"
        "\n"
        "This message was created automatically by mail delivery software.\n"
        "\n"
        "  victim@example.test\n"
        f"    {body}\n"
    ).encode()


def html_bounce(html: str) -> bytes:
    """A bounce whose notice is an HTML part holding ``html``."""
    return (
        "From: MAILER-DAEMON@mx.example.test\n"
        "To: bounce+x@bounces.example.test\n"
        "Subject: Undeliverable: hello\n"
        "MIME-Version: 1.0\n"
        'Content-Type: multipart/alternative; boundary="b"\n'
        "\n"
        "--b\n"
        "Content-Type: text/html; charset=utf-8\n"
        "\n"
        f"<p>Delivery to victim@example.test failed: 550 5.1.1 user unknown</p>{html}\n"
        "--b--\n"
    ).encode()


def adversarial_html(size: int) -> bytes:
    """An HTML bounce with ``<script `` repeated and never closed."""
    return html_bounce(_repeat("<script ", size))


def adversarial_addresses(size: int) -> bytes:
    """A DSN whose recipient fields and diagnostic are address-like runs that never finish."""
    run = "<" + "a" * size
    dotted = _repeat("a.", size)
    return (
        "From: MAILER-DAEMON@mx.example.test\n"
        "Subject: Delivery Status Notification (Failure)\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\n'
        "\n"
        "--b\n"
        "Content-Type: text/plain\n"
        "\n"
        f"{run}\n{dotted}\n{_repeat('a@', size)}\n"
        "--b\n"
        "Content-Type: message/delivery-status\n"
        "\n"
        f"Final-Recipient: rfc822; {run}@{dotted}\n"
        f"Original-Recipient: rfc822; {_repeat('a@b', size)}\n"
        "Action: failed\n"
        "Status: 5.0.0\n"
        f"Diagnostic-Code: smtp; 550 {_repeat('a@a-', size)}\n"
        "\n"
        "--b--\n"
    ).encode()


def adversarial_continuations(size: int) -> bytes:
    """A DSN whose one-line diagnostic is thousands of ``550-5.7.1 `` continuation prefixes."""
    return dsn(_repeat("550-5.7.1 550-", size), status="5.7.1")


def adversarial_arf(size: int) -> bytes:
    """An ARF report whose original carries an endless folded X-Relayd-ID and address runs."""
    folded = "\n ".join(["x" * 70] * max(1, size // 72))
    return (
        "From: fbl@isp.example.test\n"
        "To: fbl@bounces.example.test\n"
        "Subject: complaint about message from 192.0.2.1\n"
        "MIME-Version: 1.0\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="b"\n'
        "\n"
        "--b\n"
        "Content-Type: text/plain\n"
        "\n"
        f"{_repeat('spam ', size)}\n"
        "--b\n"
        "Content-Type: message/feedback-report\n"
        "\n"
        "Feedback-Type: abuse\n"
        "User-Agent: test/1.0\n"
        "Version: 1\n"
        f"Original-Rcpt-To: <{'a' * size}\n"
        "\n"
        "--b\n"
        "Content-Type: text/rfc822-headers\n"
        "\n"
        "From: sender@example.test\n"
        f"To: {_repeat('a.', size)}\n"
        f"X-Relayd-ID: {folded}\n"
        "\n"
        "--b--\n"
    ).encode()


def content_type_bomb(size: int) -> bytes:
    """A DSN whose Content-Type ends in a quoted parameter full of ``;``.

    The standard library's parameter parser is quadratic in such a field.
    """
    bomb = '; x="' + ";" * size + '"'
    return adversarial_dsn(64).replace(b'boundary="b"\n', b'boundary="b"' + bomb.encode() + b"\n", 1)


def blank_lines_report(size: int, token: str) -> bytes:
    """A forwarded report of ``size`` blank lines, a line of text, then a quoted ``X-Relayd-ID``.

    The text line stops a quote-prefix pattern that runs over line breaks from every
    blank line start (quadratic), before the header line lets it succeed.
    """
    return b"Subject: spam complaint\n\n" + b"\n" * size + f"x\n> X-Relayd-ID: {token}\n".encode()
