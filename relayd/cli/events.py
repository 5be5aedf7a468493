"""``relayd events [--json] [--since 1h]``: what policy and feedback did.

A report recorded again is one event with a count (``count``, ``last_seen``), so a mailbox provider
repeating itself does not bury the rest.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json

from relayd import config as config_mod
from relayd.cli.common import command, load_config, run_on_store
from relayd.store import Store

__all__ = ["cmd_events", "register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``events`` to ``relayd``'s sub-parsers."""
    sp = command(
        sub,
        "events",
        cmd_events,
        help="what policy and feedback did",
        epilog="example: relayd events --json --since 1h",
    )
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--since", default="1d")
    sp.add_argument("--account")
    sp.add_argument("--kind")
    sp.add_argument("--limit", type=int, default=1000)


def cmd_events(args: argparse.Namespace) -> int:
    async def run(store: Store) -> int:
        since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=config_mod.parse_duration(args.since))
        for ev in await store.events(since, limit=args.limit, account=args.account, kind=args.kind):
            row = {
                "at": ev.at.isoformat(),
                "kind": ev.kind,
                "account": ev.account,
                "list": ev.list,
                "address": ev.address,
                "reason": ev.reason,
                "queue_id": ev.queue_id,
                "evidence": json.loads(ev.evidence or "{}"),
                "count": ev.count,  # a report recorded again is counted on its first event
                "last_seen": ev.last_seen.isoformat() if ev.last_seen else None,
            }
            if args.json:
                print(json.dumps(row))
            else:
                times = f" x{ev.count}" if ev.count > 1 else ""
                print(
                    f"{row['at'][:19]}  {ev.kind:<14} {ev.account or '-':<12} {ev.address or '-':<36} "
                    f"{ev.reason or ''}{times}"
                )
        return 0

    return run_on_store(load_config(args), run)
