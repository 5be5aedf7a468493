"""The returned message's To: and Cc:, when a notice is clearly a bounce but names nobody.

The weakest evidence, tried last (``source="original"``): the message came back, so
its addressees (other than the parties to the bounce) are taken as the recipients.
"""

from __future__ import annotations

from typing import Final

from relayd.reports.dsn import heuristics, judge, message
from relayd.reports.dsn.detection import Detection, ParsedMessage

name: Final = "original"


def detect(parsed: ParsedMessage) -> Detection | None:
    """The original's addressees in sorted order, or None without a returned message."""
    if parsed.original is None:
        return None
    fields = " ".join(message.header_text(parsed.original.get(field)) for field in ("to", "cc"))
    targets = set(heuristics.addresses_in(fields))
    hits = [heuristics.TextHit(address, parsed.notice) for address in sorted(targets - parsed.parties)]
    return judge.text_detection(parsed, hits, "original")
