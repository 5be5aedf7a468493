"""Classification throughput over the shared corpus: ``python bench/dsn_classify.py [DIR]``.

Reads every ``*.eml`` under DIR (default ``../shared/corpus``) once, then classifies
the whole set repeatedly for about two seconds and prints messages per second for
``relayd.reports.dsn.classify`` and ``relayd.reports.arf.parse``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from relayd.reports.arf import parse
from relayd.reports.dsn import classify


def _rate(fn: Callable[[bytes], object], messages: list[bytes], seconds: float = 2.0) -> float:
    done = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for raw in messages:
            fn(raw)
        done += len(messages)
    return done / (time.perf_counter() - start)


def main(argv: list[str]) -> int:
    default = Path(__file__).resolve().parents[2] / "shared" / "corpus"
    root = Path(argv[1]) if len(argv) > 1 else default
    messages = [path.read_bytes() for path in sorted(root.glob("**/*.eml"))]
    if not messages:
        print(f"no .eml files under {root}", file=sys.stderr)
        return 1
    size = sum(map(len, messages)) / len(messages)
    print(f"{len(messages)} messages, {size / 1024:.1f} KiB average, from {root}")
    print(f"dsn classify: {_rate(classify, messages):8.0f} classifications/s")
    print(f"arf parse:    {_rate(parse, messages):8.0f} parses/s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
