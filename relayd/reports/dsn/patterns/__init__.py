"""Diagnostic-text patterns per bounce reason: the data half of :mod:`relayd.reports.dsn.reasons`.

Each reason has a list of lower-case fragments. A fragment is a plain substring, or a
sequence of substrings joined by ``" ... "`` that must appear in that order (``"mailbox
... full"``). The phrases are what real MTAs and providers write in their replies; the
collection follows the ideas of sisimai's ``Reason`` modules (BSD-2), re-expressed and
curated here. Add a phrase where it belongs and a corpus or unit test that needs it; the
MTA or provider that emits it is named in a trailing comment when it is specific to one.

Matching is done on a lower-cased, whitespace-collapsed copy of the diagnostic, so
fragments must be lower case and use single spaces.

The text is written by whoever sends us a bounce, so matching must stay linear in its
length: each fragment is an ordered chain of ``str.find`` calls, never a regular
expression with lazy gaps (``a.*?b.*?c`` backtracks in cubic time on text that repeats
``a`` and ``b`` without ever reaching ``c``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from relayd.reports.dsn.patterns import delivery, recipient, refusal

#: Every reason's fragments, in the order of the tables: recipient, refusal, delivery.
PHRASES: Mapping[str, Sequence[str]] = {**recipient.PHRASES, **refusal.PHRASES, **delivery.PHRASES}


@dataclass(frozen=True, slots=True)
class _Matcher:
    """The fragments of one reason: plain substrings, and chains of pieces in order."""

    plain: tuple[str, ...]
    chains: tuple[tuple[str, ...], ...]


def _compile(fragments: Sequence[str]) -> _Matcher | None:
    """Split each fragment at ``" ... "``; None for a reason without fragments."""
    plain: list[str] = []
    chains: list[tuple[str, ...]] = []
    for fragment in fragments:
        pieces = tuple(fragment.split(" ... "))
        if len(pieces) == 1:
            plain.append(fragment)
        else:
            chains.append(pieces)
    if not plain and not chains:
        return None
    return _Matcher(plain=tuple(plain), chains=tuple(chains))


COMPILED: Mapping[str, _Matcher | None] = {
    reason: _compile(fragments) for reason, fragments in PHRASES.items()
}


def _in_order(line: str, pieces: tuple[str, ...]) -> bool:
    """True when ``pieces`` occur in ``line`` in this order, without overlapping.

    Taking the leftmost occurrence of each piece is exact: any later occurrence of a
    piece leaves less text for the pieces after it, so if the leftmost one cannot be
    completed no other can. At most one scan of ``line`` per piece: linear time.
    """
    at = 0
    for piece in pieces:
        found = line.find(piece, at)
        if found < 0:
            return False
        at = found + len(piece)
    return True


def mentions(reason: str, text: str) -> bool:
    """True when the normalised diagnostic ``text`` contains a phrase of ``reason``.

    A chained fragment must fall within one line (the gap never crosses a newline);
    normalised text has none, but the rule holds for any caller.
    """
    matcher = COMPILED.get(reason)
    if not text or matcher is None:
        return False
    if any(fragment in text for fragment in matcher.plain):
        return True
    if not matcher.chains:
        return False
    lines = text.split("\n") if "\n" in text else (text,)
    return any(_in_order(line, pieces) for pieces in matcher.chains for line in lines)
