"""The ``relayd`` command line (the contract is in DESIGN.md).

Exit codes: 0 ok, 1 runtime failure, 2 usage or config error. Every ``--json`` output is one object a line.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import getpass
import json
import logging
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from relayd import config as config_mod
from relayd.errors import ConfigError, RelaydError

EXAMPLES = """examples:
  relayd serve --config conf/relayd.toml
  relayd check-config --config conf/relayd.toml
  relayd queue list --config conf/relayd.toml --json
  relayd dsn classify --json bounce.eml
"""


def _load(args: argparse.Namespace) -> config_mod.Config:
    return config_mod.load(args.config)


def _run_async(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _load(args)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's per-command chatter
    from relayd.daemon import serve

    async def main() -> int:
        await serve(cfg)
        return 0

    return _run_async(main())


def cmd_check_config(args: argparse.Namespace) -> int:
    _load(args)
    print(f"{args.config}: ok")
    return 0


def _fmt_time(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _with_queue(args: argparse.Namespace, fn: Callable[[Any], Coroutine[Any, Any, int]]) -> int:
    from relayd.queue.store import QueueStore

    cfg = _load(args)

    async def main() -> int:
        store = QueueStore(cfg.queue.path / "queue.db")
        await store.open()
        try:
            return await fn(store)
        finally:
            await store.close()

    return asyncio.run(main())


def _message_json(row: Any) -> dict[str, Any]:
    return {
        "queue_id": row.queue_id,
        "account": row.account,
        "mail_from": row.mail_from,
        "list": row.list_name,
        "created_at": _fmt_time(row.created_at),
        "size": row.size,
        "recipients": [
            {
                "address": r.address,
                "state": r.state,
                "attempts": r.attempts,
                "next_attempt": _fmt_time(r.next_attempt) if r.state == "queued" else None,
                "last_reply": r.last_reply,
            }
            for r in row.recipients
        ],
    }


def cmd_queue(args: argparse.Namespace) -> int:
    async def run(store: Any) -> int:
        if args.action == "list":
            rows = await store.list_messages(state=args.state, limit=args.limit)
            for row in rows:
                if args.json:
                    print(json.dumps(_message_json(row)))
                else:
                    states = ",".join(sorted({r.state for r in row.recipients}))
                    print(
                        f"{row.queue_id}  {_fmt_time(row.created_at)}  {row.account:<12} {row.size:>8}  "
                        f"{len(row.recipients):>3} rcpt  {states}  <{row.mail_from}>"
                    )
            return 0
        if args.action == "show":
            code = 0
            for qid in args.queue_id:
                row = await store.show(qid)
                if row is None:
                    print(f"{qid}: no such message", file=sys.stderr)
                    code = 1
                    continue
                print(json.dumps(_message_json(row), indent=None if args.json else 2))
            return code
        if args.action == "retry":
            targets = args.queue_id or [None]
            n = sum([await store.retry_now(qid) for qid in targets])
            print(f"{n} recipient(s) due now")
            return 0
        if args.action == "drop":
            if not args.queue_id:
                print("relayd queue drop: name at least one queue id", file=sys.stderr)
                return 2
            n = sum([await store.drop(qid) for qid in args.queue_id])
            print(f"{n} recipient(s) dropped")
            return 0
        return 2

    return _with_queue(args, run)


def cmd_hash_password(args: argparse.Namespace) -> int:
    from relayd.passwords import hash_password

    password = sys.stdin.readline().rstrip("\n") if not sys.stdin.isatty() else getpass.getpass("password: ")
    if not password:
        print("empty password", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0


def cmd_dsn_classify(args: argparse.Namespace) -> int:
    from relayd.dsn import command

    return int(command.run(args.files, args.json))


def cmd_arf_parse(args: argparse.Namespace) -> int:
    from relayd.arf import command

    return int(command.run(args.files, args.json))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="relayd",
        description="SMTP relay and policy daemon for permission-based bulk mail",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", required=True, type=Path, help="the TOML config file")
        return sp

    sp = with_config(sub.add_parser("serve", help="run the daemon in the foreground"))
    sp.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sp.set_defaults(fn=cmd_serve)

    sp = with_config(sub.add_parser("check-config", help="validate the config; exit 2 listing every problem"))
    sp.set_defaults(fn=cmd_check_config)

    q = sub.add_parser("queue", help="inspect and act on the queue").add_subparsers(
        dest="action", required=True
    )
    sp = with_config(
        q.add_parser("list", help="list queued messages", epilog="example: relayd queue list --json")
    )
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--state", choices=["queued", "held", "delivered", "failed", "expired", "dropped"])
    sp.add_argument("--limit", type=int, default=1000)
    sp.set_defaults(fn=cmd_queue)
    for name, helptext in (
        ("show", "show messages and their recipients"),
        ("retry", "make deferred recipients due now (all, or of the named messages)"),
        ("drop", "drop the unfinished recipients of the named messages"),
    ):
        sp = with_config(q.add_parser(name, help=helptext))
        sp.add_argument("queue_id", nargs="*")
        sp.add_argument("--json", action="store_true")
        sp.set_defaults(fn=cmd_queue)

    acct = sub.add_parser("account", help="accounts").add_subparsers(dest="action", required=True)
    sp = acct.add_parser("hash-password", help="read a password on stdin, print its password_hash value")
    sp.set_defaults(fn=cmd_hash_password)

    dsn = sub.add_parser("dsn", help="bounce reports").add_subparsers(dest="action", required=True)
    sp = dsn.add_parser("classify", help="classify bounce messages (files only; no config needed)")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("files", nargs="+")
    sp.set_defaults(fn=cmd_dsn_classify)

    arf = sub.add_parser("arf", help="complaint reports").add_subparsers(dest="action", required=True)
    sp = arf.add_parser("parse", help="parse ARF complaint reports (files only; no config needed)")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("files", nargs="+")
    sp.set_defaults(fn=cmd_arf_parse)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return 2
    except RelaydError as exc:
        print(f"relayd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1


if __name__ == "__main__":
    sys.exit(main())
