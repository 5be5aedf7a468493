"""flufl.bounce as the last-resort recipient finder (marked ``source="flufl"``).

flufl.bounce knows a few dozen historic formats (AOL, GroupWise, Netscape, SMTP32...)
that our generic reader may miss. It only returns addresses, so we use it for *who*, and
still decide *why* ourselves. Its detectors are old and occasionally choke on odd
input; any exception means "nothing found".

Its regular expressions were written for trusted, tidy notices and some backtrack badly
on long hostile lines, so it only ever sees a bounded copy of the message: the first
:data:`~relayd.reports.dsn.limits.FALLBACK_LIMIT` bytes, each line cut to
:data:`~relayd.reports.dsn.limits.FALLBACK_LINE_LIMIT`, at most
:data:`~relayd.reports.dsn.limits.MAX_PARTS` MIME parts. The notices it knows are short.
"""

from __future__ import annotations

import logging
from typing import Final

from relayd.reports.dsn import heuristics, judge, limits, message
from relayd.reports.dsn.detection import Detection, ParsedMessage

log = logging.getLogger(__name__)

name: Final = "flufl"


def detect(parsed: ParsedMessage) -> Detection | None:
    """flufl.bounce's failed addresses other than the parties, each judged on the whole notice."""
    hits = [
        heuristics.TextHit(address, parsed.notice)
        for address in recipients(parsed.raw)
        if address not in parsed.parties
    ]
    return judge.text_detection(parsed, hits, "flufl")


def recipients(raw: bytes) -> list[str]:
    """Addresses flufl.bounce considers failed (temporary or permanent), lower-cased."""
    from flufl.bounce import all_failures

    msg = message.parse_message(bounded_copy(raw))
    if msg is None or sum(1 for _ in msg.walk()) > limits.MAX_PARTS:
        return []
    try:
        temporary, permanent = all_failures(msg)
    except Exception:
        log.debug("flufl.bounce failed", exc_info=True)
        return []
    out: list[str] = []
    for item in (*permanent, *temporary):
        text = item.decode("latin-1") if isinstance(item, bytes) else str(item)
        for address in heuristics.addresses_in(text):
            if address not in out:
                out.append(address)
    return out


def bounded_copy(raw: bytes) -> bytes:
    """The start of ``raw`` with LF line ends and every line cut to the line limit."""
    head = message.normalise_newlines(raw[: limits.FALLBACK_LIMIT])
    return b"\n".join(line[: limits.FALLBACK_LINE_LIMIT] for line in head.split(b"\n"))
