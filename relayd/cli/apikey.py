"""``relayd account api-key create|list|revoke ACCOUNT``: the keys of the tenant API (relayd.edge.web.api).

``create`` prints the key once, on standard output alone (so ``KEY=$(relayd account api-key create acme
...)`` works) and says on standard error which id it has; relayd keeps only its SHA-256 (relayd.edge.apikeys),
so a lost key cannot be shown again: revoke it and create another. ``list`` shows ids, names and dates,
never keys. ``revoke ACCOUNT ID...`` (or ``--all``) stops keys at once on every node: the web listener
reads the key's row for each request. Each create and revoke is an event (``api_key_created``,
``api_key_revoked``) with who did it.

Wiring: relayd.cli.account calls :func:`register` with the ``account`` sub-parsers; :func:`run` is the
command.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from relayd.cli.common import command, group, load_config, operator_name, run_on_store
from relayd.edge import apikeys
from relayd.store.models import ApiKey, Event, utcnow
from relayd.store.protocols import Store

__all__ = ["key_json", "register", "run"]


def key_json(key: ApiKey) -> dict[str, Any]:
    """One key as ``list --json`` prints it: never the key or its hash."""
    return {
        "id": key.key_id,
        "account": key.account,
        "name": key.name,
        "created_at": key.created_at.isoformat().replace("+00:00", "Z"),
        "revoked_at": key.revoked_at.isoformat().replace("+00:00", "Z") if key.revoked_at else None,
    }


def register(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``api-key create|list|revoke`` under ``relayd account`` (``actions``: the account parser's
    sub-parsers)."""
    keys = group(
        actions,
        "api-key",
        dest="key_action",
        help="keys of the tenant HTTP API (/api/v1): create (shown once), list, revoke",
    )
    sp = command(
        keys,
        "create",
        run,
        help="make a key for ACCOUNT and print it once (relayd stores only its SHA-256)",
        epilog="example: relayd account api-key create acme --name billing-app --config relayd.toml",
    )
    sp.add_argument("account")
    sp.add_argument("--name", default="", help="what the key is for, shown by list")
    sp.add_argument("--json", action="store_true", help="print {id, account, name, created_at, key}")
    sp = command(
        keys,
        "list",
        run,
        help="the keys of ACCOUNT: id, name, created, revoked (never the keys)",
        epilog="example: relayd account api-key list acme --json --config relayd.toml",
    )
    sp.add_argument("account")
    sp.add_argument("--json", action="store_true")
    sp = command(
        keys,
        "revoke",
        run,
        help="revoke keys of ACCOUNT by id (or --all): refused with 401 from the next request on",
        epilog="example: relayd account api-key revoke acme 3f9a1c2b7d4e --config relayd.toml",
    )
    sp.add_argument("account")
    sp.add_argument("key_ids", nargs="*", metavar="ID")
    sp.add_argument("--all", action="store_true", help="every valid key of ACCOUNT")


async def _run(args: argparse.Namespace, store: Store) -> int:
    now = utcnow()
    who = json.dumps({"who": "cli", "user": operator_name()})
    if args.key_action == "create":
        new = await apikeys.create(store, args.account, args.name, now)
        await store.record_event(
            Event(now, "api_key_created", account=args.account, reason=new.record.key_id, evidence=who)
        )
        if args.json:
            print(json.dumps({**key_json(new.record), "key": new.secret}))
        else:
            print(new.secret)
            print(
                f"api key {new.record.key_id} for account {args.account}: shown once, relayd keeps only "
                "its SHA-256",
                file=sys.stderr,
            )
        return 0
    keys = await store.list_api_keys(args.account)
    if args.key_action == "list":
        for key in keys:
            if args.json:
                print(json.dumps(key_json(key)))
            else:
                state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "valid"
                print(f"{key.key_id}  {key.created_at:%Y-%m-%d %H:%M}  {state:<24} {key.name}")
        return 0
    if not args.key_ids and not args.all:
        print("relayd account api-key revoke: name key ids, or --all", file=sys.stderr)
        return 2
    own = {k.key_id: k for k in keys}
    chosen = [k.key_id for k in keys if k.revoked_at is None] if args.all else args.key_ids
    status = 0
    for key_id in chosen:
        if key_id not in own:  # another account's key is "no such key" too
            print(f"{key_id}: no such key of account {args.account}", file=sys.stderr)
            status = 1
            continue
        if await store.revoke_api_key(key_id, now):
            await store.record_event(
                Event(now, "api_key_revoked", account=args.account, reason=key_id, evidence=who)
            )
            print(f"api key {key_id} revoked")
        else:
            print(f"api key {key_id} was revoked before")
    return status


def run(args: argparse.Namespace) -> int:
    """The command (exit 0 ok, 1 an unknown key id, 2 an unknown account or no id given)."""
    cfg = load_config(args)
    if args.account not in cfg.accounts:
        print(f"relayd account api-key: no account {args.account!r} in {args.config}", file=sys.stderr)
        return 2
    return run_on_store(cfg, lambda store: _run(args, store))
