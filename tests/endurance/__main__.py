"""``python -m tests.endurance --messages 20000``: the full endurance run by hand (see run.py); exit 1 if
anything accepted was lost or a database fails its integrity check."""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
from pathlib import Path

from tests.endurance.run import Plan, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.endurance", description=__doc__)
    parser.add_argument("--messages", type=int, help="how many messages (default 20000; --quick: 2500)")
    parser.add_argument("--clients", type=int, help="concurrent submitting clients")
    parser.add_argument("--seed", type=int, help="random seed (default: a fresh one, printed)")
    parser.add_argument("--quick", action="store_true", help="the CI variant: fewer messages, faster faults")
    parser.add_argument("--dir", type=Path, help="state directory (default: a new temp dir, kept)")
    parser.add_argument("--json", action="store_true", help="also print the ledger as one JSON line")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    plan = Plan.quick(seed) if args.quick else Plan(seed=seed)
    changes = {k: v for k, v in (("messages", args.messages), ("clients", args.clients)) if v is not None}
    plan = dataclasses.replace(plan, **changes)
    ledger = run(plan, args.dir)
    print(ledger.render())
    if args.json:
        print(ledger.as_json())
    ok = ledger.lost == 0 and not ledger.anomalies and all(v == "ok" for v in ledger.integrity.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
