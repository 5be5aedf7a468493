"""``relayd suppress add|remove|list|import|export``: the suppression list by hand.

``add`` and ``remove`` take addresses (a malformed one is a usage error, exit 2, before anything is
written); ``import`` reports each bad CSV row as ``FILE:LINE: problem`` and keeps the good ones (exit 1
when any row was rejected); ``export`` writes every entry as CSV, to a file or stdout
(relayd.store.csvio has the format).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from relayd import config as config_mod
from relayd.cli.common import command, group, load_config, report_import, run_on_store, write_export
from relayd.store import Reason, Scope, Store, SuppressionEntry

__all__ = ["cmd_suppress", "register"]

SCOPES = [s.value for s in Scope]
REASONS = [r.value for r in Reason]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``suppress`` and its commands to ``relayd``'s sub-parsers."""
    sup = group(sub, "suppress", help="suppression entries")
    sp = command(
        sup,
        "add",
        cmd_suppress,
        help="suppress addresses",
        epilog="example: relayd suppress add a@example.test --scope global --reason manual --expires 30d",
    )
    sp.add_argument("addresses", nargs="+")
    sp.add_argument("--scope", required=True, choices=SCOPES)
    sp.add_argument("--account")
    sp.add_argument("--list")
    sp.add_argument("--reason", required=True, choices=REASONS)
    sp.add_argument("--expires", help="lifetime, e.g. 30d")
    sp = command(sup, "remove", cmd_suppress, help="remove suppressions of addresses")
    sp.add_argument("addresses", nargs="+")
    sp.add_argument("--scope", choices=SCOPES)
    sp.add_argument("--account")
    sp.add_argument("--list")
    sp = command(
        sup, "list", cmd_suppress, help="list suppressions", epilog="example: relayd suppress list --json"
    )
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--address")
    sp.add_argument("--scope", choices=SCOPES)
    sp.add_argument("--account")
    sp.add_argument("--list")
    sp.add_argument("--reason")
    sp.add_argument("--include-expired", action="store_true")
    sp.add_argument("--limit", type=int, default=1000)
    sp = command(
        sup,
        "import",
        cmd_suppress,
        help="import a CSV (address,scope,account,list,reason,created_at,expires_at)",
    )
    sp.add_argument("file")
    sp = command(sup, "export", cmd_suppress, help="export every suppression as CSV (to FILE or stdout)")
    sp.add_argument("file", nargs="?")


def cmd_suppress(args: argparse.Namespace) -> int:
    from relayd.core.address import AddressError, normalize
    from relayd.store.csvio import export_csv, import_csv

    async def run(store: Store) -> int:
        now = dt.datetime.now(dt.UTC)
        if args.action in ("add", "remove"):
            try:
                addresses = [normalize(a) for a in args.addresses]
            except AddressError as exc:
                print(f"relayd suppress {args.action}: {exc}", file=sys.stderr)
                return 2
        if args.action == "add":
            expires = (
                now + dt.timedelta(seconds=config_mod.parse_duration(args.expires)) if args.expires else None
            )
            try:
                entries = [
                    SuppressionEntry(
                        a,
                        Scope(args.scope),
                        args.account,
                        args.list,
                        Reason(args.reason),
                        "manual",
                        now,
                        expires,
                    )
                    for a in addresses
                ]
            except ValueError as exc:
                print(f"relayd suppress add: {exc}", file=sys.stderr)
                return 2
            n = await store.add(entries)
            print(f"{n} suppression(s) added")
            return 0
        if args.action == "remove":
            scope = Scope(args.scope) if args.scope else None
            n = sum([await store.remove(a, scope, args.account, args.list) for a in addresses])
            print(f"{n} suppression(s) removed")
            return 0
        if args.action == "list":
            entries = await store.list_entries(
                address=normalize(args.address) if args.address else None,
                scope=Scope(args.scope) if args.scope else None,
                account=args.account,
                list_name=args.list,
                reason=Reason(args.reason) if args.reason else None,
                include_expired=args.include_expired,
                limit=args.limit,
            )
            for e in entries:
                if args.json:
                    print(json.dumps(e.as_json()))
                else:
                    print(
                        f"{e.address:<40} {e.scope!s:<8} {e.account or '-':<12} {e.list or '-':<12} "
                        f"{e.reason!s:<18} {e.created_at:%Y-%m-%d %H:%M}  "
                        f"{e.expires_at.strftime('%Y-%m-%d %H:%M') if e.expires_at else '-'}"
                    )
            return 0
        if args.action == "import":
            result = await import_csv(store, Path(args.file))
            return report_import(args.file, result.imported, result.errors)
        if args.action == "export":
            await write_export(args.file, lambda out: export_csv(store, out))
            return 0
        return 2

    return run_on_store(load_config(args), run)
