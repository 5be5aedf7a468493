"""The generic free-text reader: failed addresses written in the notice.

Exim, qmail, old Sendmail, Postfix without DSN, Gmail's and Yahoo's old notices, Lotus
Notes, Exchange 2003... write prose; :func:`relayd.reports.dsn.heuristics.scan_notice`
finds the recipients in it, each with the notice block about it, leaving out the
parties to the bounce.
"""

from __future__ import annotations

from typing import Final

from relayd.reports.dsn import heuristics, judge
from relayd.reports.dsn.detection import Detection, ParsedMessage

name: Final = "text"


def detect(parsed: ParsedMessage) -> Detection | None:
    """The recipients the notice names, in order of first mention, or None if it names none."""
    return judge.text_detection(parsed, heuristics.scan_notice(parsed.notice, parsed.parties), "text")
