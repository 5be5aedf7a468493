"""Exim's ``X-Failed-Recipients:`` header: the failed addresses named outright.

Exim names them in a header of the bounce; that header is trusted over the party filter
(a failed address may also appear among the bounce's own headers). Each address is
judged on the notice block that names it, else on the whole notice.
"""

from __future__ import annotations

from typing import Final

from relayd.reports.dsn import heuristics, judge
from relayd.reports.dsn.detection import Detection, ParsedMessage

name: Final = "x-failed-recipients"


def detect(parsed: ParsedMessage) -> Detection | None:
    """The header's addresses in header order, or None when there is no such header."""
    failed = heuristics.addresses_in(parsed.headers.get("x-failed-recipients", ""))
    if not failed:
        return None
    hits = heuristics.scan_notice(parsed.notice, parsed.parties - set(failed))
    by_address = {hit.address: hit for hit in hits}
    named = [by_address.get(address) or heuristics.TextHit(address, parsed.notice) for address in failed]
    return judge.text_detection(parsed, named, "text")
