"""``relayd account hash-password|list|show|suspend|reinstate`` and ``relayd account api-key ...``.

``suspend`` refuses the account's MAIL FROM from then on and holds its queued recipients (``held_by =
'suspension'``); ``reinstate`` lifts both, leaving an operator's own holds alone (relayd.cli.queue). An
account that is not in the config is a usage error (exit 2).
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import sys
from typing import Any

from relayd import config as config_mod
from relayd.cli import apikey
from relayd.cli.common import command, group, load_config, opened_queue, run_on_store
from relayd.store import Store, SuspendReason

__all__ = ["SUSPEND_REASONS", "cmd_account", "cmd_hash_password", "register"]

#: what ``suspend --reason`` takes, ``manual`` (its default) first
SUSPEND_REASONS = [r.value for r in sorted(SuspendReason, key=lambda r: r is not SuspendReason.MANUAL)]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``account`` and its commands (``api-key`` among them) to ``relayd``'s sub-parsers."""
    acct = group(sub, "account", help="accounts: state, suspension, rates")
    command(
        acct,
        "hash-password",
        cmd_hash_password,
        config=False,
        help="read a password on stdin, print its password_hash value",
    )
    sp = command(acct, "list", cmd_account, help="accounts and whether they are suspended")
    sp.add_argument("--json", action="store_true")
    for name, helptext in (
        ("show", "one account: domains, lists, suspension, complaint and bounce rates"),
        ("suspend", "suspend an account: MAIL FROM refused, its queued mail held"),
        ("reinstate", "lift a suspension: held mail is released"),
    ):
        sp = command(acct, name, cmd_account, help=helptext, epilog=f"example: relayd account {name} acme")
        sp.add_argument("name")
        sp.add_argument("--json", action="store_true")
        if name == "suspend":
            sp.add_argument("--reason", default="manual", choices=SUSPEND_REASONS)
            sp.add_argument("--details", default="suspended by an operator")
    apikey.register(acct)


def cmd_hash_password(args: argparse.Namespace) -> int:
    from relayd.core.passwords import hash_password

    password = sys.stdin.readline().rstrip("\n") if not sys.stdin.isatty() else getpass.getpass("password: ")
    if not password:
        print("empty password", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0


def cmd_account(args: argparse.Namespace) -> int:
    cfg = load_config(args)

    async def run(store: Store) -> int:
        if args.action == "list":
            return await _list(args, cfg, store)
        if args.name not in cfg.accounts:
            print(f"relayd account {args.action}: no account {args.name!r} in {args.config}", file=sys.stderr)
            return 2
        if args.action == "show":
            return await _show(args, cfg, store)
        async with opened_queue(cfg) as queue:
            if args.action == "suspend":
                await store.suspend(args.name, SuspendReason(args.reason), args.details)
                n = await queue.hold_account(args.name)
                print(f"account {args.name} suspended; {n} queued recipient(s) held")
            else:
                await store.reinstate(args.name)
                n = await queue.release_account(args.name)
                print(f"account {args.name} reinstated; {n} held recipient(s) released")
        return 0

    return run_on_store(cfg, run)


async def _list(args: argparse.Namespace, cfg: config_mod.Config, store: Store) -> int:
    states = {s.account: s for s in await store.list_account_states()}
    for name, acct in cfg.accounts.items():
        st = states.get(name)
        row = {
            "account": name,
            "domains": acct.domains,
            "suspended": bool(st and st.suspended),
            "reason": str(st.reason) if st and st.suspended and st.reason else None,
        }
        print(
            json.dumps(row)
            if args.json
            else f"{name:<16} {'SUSPENDED' if row['suspended'] else 'active':<10} " + ", ".join(acct.domains)
        )
    return 0


async def _show(args: argparse.Namespace, cfg: config_mod.Config, store: Store) -> int:
    from relayd.feedback import reputation

    st = await store.get_account_state(args.name)
    acct = cfg.accounts[args.name]
    info: dict[str, Any] = {
        "account": args.name,
        "domains": acct.domains,
        "lists": sorted(acct.lists),
        "suspended": bool(st and st.suspended),
        "reason": str(st.reason) if st and st.reason else None,
        "details": st.details if st else "",
        "since": st.since.isoformat() if st else None,
    }
    window = cfg.policy.thresholds.window
    rates = await reputation.rates(store, args.name, dt.datetime.now(dt.UTC), window=window)
    info["rates"] = rates.figures()
    if args.json:
        print(json.dumps(info, default=str))
    else:
        for key, value in info.items():
            print(f"{key:<10} {value}")
    return 0
