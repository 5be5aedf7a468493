"""Recipients and diagnostics of bounces that carry no RFC 3464 part.

Exim, qmail, old Sendmail, Postfix without DSN, DragonFly, Gmail's and Yahoo's old
notices, Lotus Notes/Domino, Exchange 2003, mobile gateways... all write prose. What
they share is enough for one generic reader:

* the failed address is written in the notice (alone on a line, in ``<...>``, or after
  "delivering your mail to"), and the words after it, up to the next failed address,
  are about it (Exim's indented block, qmail's paragraph, Sendmail's reason line);
* addresses of the parties themselves (the bounce's To/From, the original From, the
  MAIL FROM in a transcript) and addresses in summary header lines ("To: ...") are not
  failed recipients;
* when the notice names nobody, the returned message's To: is the recipient.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Set
from dataclasses import dataclass

from relayd.reports.dsn.limits import NOTICE_LIMIT

_ADDRESS = re.compile(
    r"(?<![A-Za-z0-9!#$%&'*+/=?^_`{|}~.-])"
    r"([A-Za-z0-9!#$%&'*+/=?^_`{|}~-][A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]*"
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+)"
)
#: Notice lines that quote the message's own headers, not failed recipients.
_SUMMARY_LINE = re.compile(
    r"^\s*(?:from|to|cc|bcc|reply-to|sender|return-path|subject|date|sent|message-id|"
    r"in-reply-to|references|received|x-[a-z-]+|envelope-to|delivered-to)\s*:",
    re.IGNORECASE,
)
#: The word just before an address (and its ``:``, ``=``, bracket) that marks it as the
#: sender or an id, not a recipient. Searched only over the few characters that end at
#: the word (see :func:`_after_sender_word`); at most 15 of them plus one for ``\b``.
_SENDER_WORD = re.compile(
    r"(?:mail from|envelope-from|envelope sender|message-id|message id|queue id|return-path|"
    r"\bfrom|\bsender|\bid)\Z",
    re.IGNORECASE,
)
_SENDER_WORD_WINDOW = 16
_LOCAL_PARTS_NEVER = frozenset({"mailer-daemon", "mailer_daemon", "mail-daemon", "noreply", "no-reply"})


@dataclass(frozen=True, slots=True)
class TextHit:
    """A recipient found in a notice, with the notice text that concerns it."""

    address: str
    context: str


def addresses_in(text: str) -> list[str]:
    """All address-shaped strings in ``text``, lower-cased, in order, deduplicated."""
    seen: dict[str, None] = {}
    for match in _ADDRESS.finditer(text or ""):
        seen.setdefault(match.group(1).strip(".").lower(), None)
    return list(seen)


def _skip_space_back(text: str, end: int) -> int:
    """The start of the whitespace run that ends at ``end``."""
    while end and text[end - 1].isspace():
        end -= 1
    return end


def _after_sender_word(text: str, end: int) -> bool:
    """True when ``text[:end]`` ends in a sender or id word, then ``:``/``=`` and an
    opening bracket, each optional, with any whitespace between (``MAIL FROM: <``).

    Read backwards from ``end``: the cost is the whitespace skipped plus a fixed
    window, never the length of the line (a regex ending in optional whitespace,
    punctuation and whitespace again, searched over the line, backtracks in cubic time
    on a long run of spaces).
    """
    end = _skip_space_back(text, end)
    if end and text[end - 1] in "<([":
        end = _skip_space_back(text, end - 1)
    if end and text[end - 1] in ":=":
        end = _skip_space_back(text, end - 1)
    return _SENDER_WORD.search(text, max(0, end - _SENDER_WORD_WINDOW), end) is not None


def scan_notice(notice: str, exclude: Set[str]) -> list[TextHit]:
    """Failed recipients named in a free-text notice, each with its context block.

    An address's block runs from the line of its first mention to the line before the
    first mention of the next recipient; a lone recipient gets the whole notice (Lotus
    Notes writes the reason *before* the address). At most
    :data:`~relayd.reports.dsn.limits.NOTICE_LIMIT` characters of the notice are read.
    """
    lines = notice[:NOTICE_LIMIT].split("\n")
    first_line: dict[str, int] = {}
    summary_only: dict[str, int] = {}
    for index, line in enumerate(lines):
        summary: bool | None = None
        for match in _ADDRESS.finditer(line):
            address = match.group(1).strip(".").lower()
            if address in exclude or address.split("@", 1)[0] in _LOCAL_PARTS_NEVER:
                continue
            if _skip_space_back(line, match.start()) == 0:
                # Nothing but blanks before it: the word may end the line above.
                previous = lines[index - 1] if index else ""
                if _after_sender_word(previous, len(previous)):
                    continue
            elif _after_sender_word(line, match.start()):
                continue
            if summary is None:
                summary = _SUMMARY_LINE.match(line) is not None
            if summary:
                summary_only.setdefault(address, index)
                continue
            first_line.setdefault(address, index)
    chosen = first_line or summary_only
    if not chosen:
        return []
    # Exim's delay warning cuts the echoed reply short ("452 4.2.2 <user@example.ex"): an
    # address that only begins another one is that one, truncated, not a recipient. In
    # sorted order such a prefix sits right before an address that extends it.
    names = sorted(chosen)
    for shorter, longer in itertools.pairwise(names):
        if longer.startswith(shorter):
            del chosen[shorter]
    ordered = sorted(chosen.items(), key=lambda item: item[1])
    if len(ordered) == 1:
        return [TextHit(ordered[0][0], notice)]
    hits = []
    for position, (address, start) in enumerate(ordered):
        end = ordered[position + 1][1] if position + 1 < len(ordered) else len(lines)
        if end <= start:
            end = start + 1
        hits.append(TextHit(address, "\n".join(lines[start:end])))
    return hits


_CODE = re.compile(r"(?<![\d.])[45]\d\d(?![\d.])|(?<![\d.])[45]\.\d{1,3}\.\d{1,3}(?!\.?\d)|#[45]\.\d")


def focus(context: str) -> str:
    """The paragraph of a notice block that carries the remote reply.

    From the first line showing a reply or status code to the next blank line; without
    any code, the paragraph that starts at the block's first line.
    """
    lines = context.split("\n")
    start = next((i for i, line in enumerate(lines) if _CODE.search(line)), None)
    if start is None:
        start = 0
        while start < len(lines) and not lines[start].strip():
            start += 1
    end = start + 1
    while end < len(lines) and lines[end].strip():
        end += 1
    if end - start == 1 and start + 1 < len(lines):
        # A lone address line: the reason is in the paragraph after it (Gmail, Domino).
        end = start + 1
        while end < len(lines) and not lines[end].strip():
            end += 1
        while end < len(lines) and lines[end].strip():
            end += 1
    return "\n".join(line.strip() for line in lines[start:end] if line.strip())
