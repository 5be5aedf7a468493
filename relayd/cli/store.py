"""``relayd store migrate|export|import``: the policy store's schema, and moving it between backends.

``export`` and ``import`` use relayd.store.transfer's JSON Lines (SQLite -> PostgreSQL, or a backup); a
line ``import`` cannot use is reported as ``FILE:LINE: problem`` and the command exits 1.
"""

from __future__ import annotations

import argparse
import sys

from relayd.cli.common import command, group, load_config, print_rejected, run_on_store
from relayd.store import Store

__all__ = ["cmd_store_migrate", "cmd_store_transfer", "register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``store`` and its commands to ``relayd``'s sub-parsers."""
    st = group(sub, "store", help="the policy store")
    command(st, "migrate", cmd_store_migrate, help="create or upgrade the schema")
    sp = command(
        st,
        "export",
        cmd_store_transfer,
        help="write the whole store (suppressions, accounts, events, sent ledger, consent) as JSON Lines",
        epilog="example: relayd store export state.jsonl --config sqlite.toml",
    )
    sp.add_argument("file", nargs="?")
    sp = command(
        st,
        "import",
        cmd_store_transfer,
        help="load an export into this config's store (e.g. SQLite -> PostgreSQL)",
        epilog="example: relayd store import state.jsonl --config postgresql.toml",
    )
    sp.add_argument("file")


def cmd_store_transfer(args: argparse.Namespace) -> int:
    from relayd.store.transfer import export_store, import_store

    async def run(store: Store) -> int:
        if args.action == "export":
            if args.file:
                with open(args.file, "w", encoding="utf-8") as out:
                    result = await export_store(store, out)
            else:
                result = await export_store(store, sys.stdout)
        else:
            with open(args.file, encoding="utf-8") as src:
                result = await import_store(store, src)
            print_rejected(args.file, result.errors)
        summary = ", ".join(f"{n} {kind}" for kind, n in sorted(result.counts.items())) or "nothing"
        print(f"{args.action}ed {summary}", file=sys.stderr)
        return 1 if result.errors else 0

    return run_on_store(load_config(args), run)


def cmd_store_migrate(args: argparse.Namespace) -> int:
    cfg = load_config(args)

    async def run(store: Store) -> int:
        version = await store.migrate()
        print(f"{cfg.store.backend} store at schema version {version}")
        return 0

    return run_on_store(cfg, run)
