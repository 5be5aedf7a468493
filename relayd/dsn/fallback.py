"""flufl.bounce as the last-resort recipient finder (marked ``source="flufl"``).

flufl.bounce knows a few dozen historic formats (AOL, GroupWise, Netscape, SMTP32...)
that our generic reader may miss. It only returns addresses, so we use it for *who*, and
still decide *why* ourselves. Its detectors are old and occasionally choke on odd
input; any exception means "nothing found".
"""

from __future__ import annotations

import logging

from relayd.dsn import heuristics, message

log = logging.getLogger(__name__)


def recipients(raw: bytes) -> list[str]:
    """Addresses flufl.bounce considers failed (temporary or permanent), lower-cased."""
    try:
        from flufl.bounce import all_failures
    except ImportError:  # pragma: no cover - declared dependency
        return []
    msg = message.parse_message(message.normalise_newlines(raw))
    if msg is None:
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
