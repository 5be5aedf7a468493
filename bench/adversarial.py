"""Write the adversarial bounces of ``tests/adversarial.py`` to files, for timing by hand.

    .venv/bin/python bench/adversarial.py --out DIR [--sizes 7000,65536,1048576]

Writes ``dsn-<size>.eml`` (Diagnostic-Code ``550 `` + "mailbox exceeded " repeated to the
size) for each size, then time ``relayd dsn classify DIR/dsn-*.eml`` on them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.adversarial import adversarial_dsn

__all__ = ["adversarial_dsn", "main"]  # bench/hostile.py imports adversarial_dsn from here too

SIZES = (7_000, 65_536, 1_048_576)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", required=True, type=Path, help="directory to write the files to")
    parser.add_argument(
        "--sizes",
        default=",".join(str(s) for s in SIZES),
        help="comma-separated Diagnostic-Code sizes in bytes",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for size in (int(s) for s in args.sizes.split(",") if s.strip()):
        path = args.out / f"dsn-{size}.eml"
        path.write_bytes(adversarial_dsn(size))
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
