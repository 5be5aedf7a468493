"""Read SMTP facts out of free diagnostic text: enhanced code, reply code, command.

Free-text bounces (and many Diagnostic-Code values) carry the remote server's reply
somewhere in prose: ``host mx.example.org said: 550 5.1.1 <a@b>: Recipient address
rejected (in reply to RCPT TO command)``. These helpers find the pieces without being
fooled by IP addresses (``192.0.2.1``), version numbers or dates.

Every pattern here runs in time linear in its input (no unbounded quantifier is followed
by something that can fail after it and send it back over the same text), and each
function reads at most :data:`~relayd.reports.dsn.limits.CONTEXT_LIMIT` characters.
"""

from __future__ import annotations

import re

from relayd.reports.dsn.limits import CONTEXT_LIMIT

# An enhanced status code not embedded in a longer dotted number (an IPv4 address).
_ENHANCED = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?!\.?\d)")
_REPLIED_ENHANCED = re.compile(r"(?<![\d.])([45]\d\d)[ -]+['\"]?([45])\.(\d{1,3})\.(\d{1,3})(?!\.?\d)")
# A reply code where replies sit: line start, after "said:", before an enhanced code.
_REPLY_BEFORE_ENHANCED = re.compile(r"(?<![\d.])([245]\d\d)[ -]+['\"]?[245]\.\d{1,3}\.\d{1,3}(?!\.?\d)")
# Host names are at most 255 characters, address literals under 64: bounded, so that
# "host a [" repeated without a "]" is not rescanned to the end once per "host".
_REPLY_PLACED = re.compile(
    r"(?:^|said:|returned:|error:|was:|reply:|\[|<<<|\(|host \S{1,255} \[[^\]\n]{0,64}\]:|: )"
    r"[ \t]*([245]\d\d)(?=[ -]|$)",
    re.MULTILINE | re.IGNORECASE,
)

#: Phrases that name the SMTP command a reply answered, per MTA style.
_EXPLICIT_COMMANDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "CONN",
        re.compile(
            r"after initial connection|on connect|during the connection|\bgreeting\b|"
            r"refused to talk to me",  # Postfix: the banner was a 4xx/5xx
            re.I,
        ),
    ),
    (
        "EHLO",
        re.compile(r"(?:after|in reply to|did not like our|smtp:)\s*(?:pipelined\s+)?(?:EHLO|HELO)\b", re.I),
    ),
    (
        "STARTTLS",
        re.compile(r"(?:after|in reply to|did not like our|smtp:)\s*(?:pipelined\s+)?STARTTLS\b", re.I),
    ),
    (
        "MAIL",
        re.compile(
            r"(?:after|in reply to|did not like our|smtp:)\s*(?:pipelined\s+)?MAIL(?: FROM)?\b|\[MAIL_FROM\]",
            re.I,
        ),
    ),
    (
        "RCPT",
        re.compile(
            r"(?:after|in reply to|did not like our|smtp:)\s*(?:pipelined\s+)?RCPT(?: TO)?\b|\[RCPT_TO\]|"
            r"does not like recipient|most progress was RCPT TO",
            re.I,
        ),
    ),
    (
        "DATA",
        re.compile(
            r"(?:after|in reply to|did not like our|smtp:)\s*(?:pipelined\s+)?(?:end of )?(?:final )?DATA\b|"
            r"\(DATA\)|\[DATA\]|after end of message|didn't like the message|"
            r"refused to accept your message",
            re.I,
        ),
    ),
)
#: Session transcripts: ">>> RCPT To:<a@b>" (Sendmail) and "In:  RCPT TO:" (Postfix).
_TRANSCRIPT_COMMAND = re.compile(
    r"^[ \t]*(?:>>>|in:)[ \t]*(EHLO|HELO|STARTTLS|AUTH|MAIL|RCPT|DATA|BDAT|QUIT|RSET)\b", re.I | re.M
)
# One run of blanks when there is no "<<<" / "Out:": two adjacent optional runs would try
# every split of a long run of spaces (quadratic).
_TRANSCRIPT_FAILURE = re.compile(r"^[ \t]*(?:(?:<<<|out:)[ \t]*)?[45]\d\d[ -]", re.I | re.M)


def enhanced_code(text: str | None) -> str | None:
    """The remote's enhanced code: one following a reply code, else the first 4.y.z/5.y.z,
    else the first 2.y.z.

    Session transcripts (Postfix "Out: 250 2.0.0 Ok") show success codes before the
    failure, so a failure code anywhere wins over an earlier success code.
    """
    if not text:
        return None
    text = text[:CONTEXT_LIMIT]
    # The remote server's own code sits right after its reply code ("550-5.7.1 ...");
    # a gateway may put its own summary code in front (Amazon SES "5.1.0 - ...").
    for match in _REPLIED_ENHANCED.finditer(text):
        if int(match.group(3)) <= 7:
            return f"{match.group(2)}.{int(match.group(3))}.{int(match.group(4))}"
    success: str | None = None
    for match in _ENHANCED.finditer(text):
        subject, detail = int(match.group(2)), int(match.group(3))
        if subject > 7:
            continue
        code = f"{match.group(1)}.{subject}.{detail}"
        if code[0] != "2":
            return code
        success = success or code
    return success


def reply_code(text: str | None) -> str | None:
    """The SMTP reply code (4xx/5xx) the remote server gave, if the text shows one."""
    if not text:
        return None
    text = text[:CONTEXT_LIMIT]
    match = _REPLY_BEFORE_ENHANCED.search(text)
    if match and match.group(1)[0] in "45":
        return match.group(1)
    for match in _REPLY_PLACED.finditer(text):
        if match.group(1)[0] in "45":
            return match.group(1)
    return None


def smtp_command(text: str | None) -> str | None:
    """The SMTP command a failure answered, when the text says so.

    An explicit phrase ("after RCPT TO", "in reply to end of DATA command") wins; in a
    session transcript, the last command sent before the first 4xx/5xx reply.
    """
    if not text:
        return None
    text = text[:CONTEXT_LIMIT]
    # Postfix and Sendmail fold long lines anywhere ("(in\n    reply to RCPT TO command)"):
    # the explicit phrases are looked for in a copy with every run of blanks made one space.
    flat = " ".join(text.split())
    found: str | None = None
    position = len(flat) + 1
    for name, pattern in _EXPLICIT_COMMANDS:
        match = pattern.search(flat)
        if match and match.start() < position:
            found, position = name, match.start()
    if found:
        return found
    failure = _TRANSCRIPT_FAILURE.search(text)
    limit = failure.start() if failure else len(text)
    last: str | None = None
    for match in _TRANSCRIPT_COMMAND.finditer(text, 0, limit):
        last = match.group(1).upper()
    if failure and last is None and "while talking to" in text[:limit]:
        # Sendmail's transcript: a failure reply before any command is the banner.
        return "CONN"
    if last == "BDAT":
        return "DATA"
    return last if last in {"EHLO", "HELO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA"} else None
