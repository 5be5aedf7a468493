"""The ``relayd`` command line (the contract is in DESIGN.md).

Exit codes: 0 ok, 1 runtime failure, 2 usage or config error. Every ``--json`` output is one object a line.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import getpass
import json
import os
import shutil
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from relayd import config as config_mod
from relayd.cli import apikey as apikey_cli
from relayd.cli import consent as consent_cli
from relayd.cli import desk as desk_cli
from relayd.cli import queue as queue_cli
from relayd.core.errors import ConfigError, RelaydError

EXAMPLES = """examples:
  relayd serve --config conf/relayd.toml
  relayd check-config --config conf/relayd.toml
  relayd queue list --config conf/relayd.toml --json
  relayd queue summary --config conf/relayd.toml
  relayd queue hold --domain example.com --config conf/relayd.toml
  relayd dsn classify --json bounce.eml
"""


def _load(args: argparse.Namespace) -> config_mod.Config:
    return config_mod.load(args.config)


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _load(args)
    config_mod.refuse_example_passwords(cfg)
    from relayd.app import logs

    logs.setup(args.log_level, cfg.server.log_format)
    if cfg.server.workers > 1:
        # before anything imports prometheus_client: workers write their samples to files that /metrics
        # (in whichever worker answers) adds up
        metrics_dir = cfg.queue.path / "metrics"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        from relayd.app.supervisor import supervise

        return supervise(cfg, args.config)
    from relayd.app.daemon import serve
    from relayd.app.eventloop import run_event_loop

    run_event_loop(serve(cfg, args.config))
    return 0


def _dkim_problems(cfg: config_mod.Config) -> list[str]:
    """Load every [[dkim]] key as serve would (unreadable, weak or exposed keys are errors here too)."""
    from relayd.mail.dkim import DkimKeyError, load_key

    problems = []
    for i, d in enumerate(cfg.dkim):
        try:
            load_key(d.domain, d.selector, d.key_file, d.algorithm)
        except DkimKeyError as exc:
            problems.append(f"{cfg.source}: dkim[{i}].key_file: {exc}")
    return problems


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args)
    for line in config_mod.warnings(cfg):
        print(line, file=sys.stderr)
    config_mod.refuse_example_passwords(cfg)  # what serve would refuse is an error here too
    problems = _dkim_problems(cfg)
    if problems:
        raise ConfigError(problems)
    print(f"{args.config}: ok")
    if not args.dns:
        return 0
    from relayd.cli import doctor

    checks = asyncio.run(doctor.run_checks(cfg))
    print(doctor.format_table(checks), end="")
    return 0 if all(c.ok for c in checks) else 1


def _with_store(
    args: argparse.Namespace, fn: Callable[[Any, config_mod.Config], Coroutine[Any, Any, int]]
) -> int:
    from relayd.store import open_store

    cfg = _load(args)

    async def main() -> int:
        store = await open_store(cfg.store.backend, cfg.store.path, cfg.store.dsn)
        try:
            return await fn(store, cfg)
        finally:
            await store.close()

    return asyncio.run(main())


def _entry_json(e: Any) -> dict[str, Any]:
    return {
        "address": e.address,
        "scope": str(e.scope),
        "account": e.account,
        "list": e.list,
        "reason": str(e.reason),
        "source": e.source,
        "created_at": e.created_at.isoformat(),
        "expires_at": e.expires_at.isoformat() if e.expires_at else None,
    }


def cmd_suppress(args: argparse.Namespace) -> int:
    from relayd.core.address import AddressError, normalize
    from relayd.store import Reason, Scope, SuppressionEntry
    from relayd.store.csvio import export_csv, import_csv

    async def run(store: Any, cfg: config_mod.Config) -> int:
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
            entries = await store.list(
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
                    print(json.dumps(_entry_json(e)))
                else:
                    print(
                        f"{e.address:<40} {e.scope!s:<8} {e.account or '-':<12} {e.list or '-':<12} "
                        f"{e.reason!s:<18} {e.created_at:%Y-%m-%d %H:%M}  "
                        f"{e.expires_at.strftime('%Y-%m-%d %H:%M') if e.expires_at else '-'}"
                    )
            return 0
        if args.action == "import":
            result = await import_csv(store, Path(args.file))
            for line, problem in result.errors:
                print(f"{args.file}:{line}: {problem}", file=sys.stderr)
            print(f"{result.imported} row(s) imported, {len(result.errors)} rejected")
            return 0 if not result.errors else 1
        if args.action == "export":
            if args.file:
                with open(args.file, "w", newline="", encoding="utf-8") as out:
                    n = await export_csv(store, out)
                print(f"{n} row(s) exported to {args.file}", file=sys.stderr)
            else:
                n = await export_csv(store, sys.stdout)
            return 0
        return 2

    return _with_store(args, run)


def cmd_account(args: argparse.Namespace) -> int:
    from relayd.queue.shards import QueueShards
    from relayd.store import SuspendReason

    async def run(store: Any, cfg: config_mod.Config) -> int:
        if args.action == "list":
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
                    else f"{name:<16} {'SUSPENDED' if row['suspended'] else 'active':<10} "
                    + ", ".join(acct.domains)
                )
            return 0
        if args.name not in cfg.accounts:
            print(f"relayd account {args.action}: no account {args.name!r} in {args.config}", file=sys.stderr)
            return 2
        if args.action == "show":
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
            from relayd.feedback import reputation

            window = cfg.policy.thresholds.window
            rates = await reputation.rates(store, args.name, dt.datetime.now(dt.UTC), window=window)
            info["rates"] = rates.figures()
            if args.json:
                print(json.dumps(info, default=str))
            else:
                for key, value in info.items():
                    print(f"{key:<10} {value}")
            return 0
        queue = QueueShards(cfg.queue.path)
        await queue.open()
        try:
            if args.action == "suspend":
                await store.suspend(args.name, SuspendReason(args.reason), args.details)
                n = await queue.hold_account(args.name)
                print(f"account {args.name} suspended; {n} queued recipient(s) held")
            else:
                await store.reinstate(args.name)
                n = await queue.release_account(args.name)
                print(f"account {args.name} reinstated; {n} held recipient(s) released")
        finally:
            await queue.close()
        return 0

    return _with_store(args, run)


def cmd_events(args: argparse.Namespace) -> int:
    async def run(store: Any, cfg: config_mod.Config) -> int:
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

    return _with_store(args, run)


def cmd_store_transfer(args: argparse.Namespace) -> int:
    from relayd.store.transfer import export_store, import_store

    async def run(store: Any, cfg: config_mod.Config) -> int:
        if args.action == "export":
            if args.file:
                with open(args.file, "w", encoding="utf-8") as out:
                    result = await export_store(store, out)
            else:
                result = await export_store(store, sys.stdout)
        else:
            with open(args.file, encoding="utf-8") as src:
                result = await import_store(store, src)
            for line, problem in result.errors:
                print(f"{args.file}:{line}: {problem}", file=sys.stderr)
        summary = ", ".join(f"{n} {kind}" for kind, n in sorted(result.counts.items())) or "nothing"
        print(f"{args.action}ed {summary}", file=sys.stderr)
        return 1 if result.errors else 0

    return _with_store(args, run)


def cmd_store_migrate(args: argparse.Namespace) -> int:
    async def run(store: Any, cfg: config_mod.Config) -> int:
        version = await store.migrate()
        print(f"{cfg.store.backend} store at schema version {version}")
        return 0

    return _with_store(args, run)


def cmd_dkim_keygen(args: argparse.Namespace) -> int:
    from relayd.mail.dkim import DkimKeyError, keygen

    try:
        path, record = keygen(args.domain, args.selector, args.algorithm, Path(args.out_dir))
    except DkimKeyError as exc:
        print(f"relayd dkim keygen: {exc}", file=sys.stderr)
        return 1
    print(f"# private key written to {path} (mode 0600); add to the config:", file=sys.stderr)
    print(
        f'# [[dkim]]\n# domain = "{args.domain}"\n# selector = "{args.selector}"\n'
        f'# key_file = "{path}"\n# algorithm = "{args.algorithm}"',
        file=sys.stderr,
    )
    print(record)
    return 0


def cmd_hash_password(args: argparse.Namespace) -> int:
    from relayd.core.passwords import hash_password

    password = sys.stdin.readline().rstrip("\n") if not sys.stdin.isatty() else getpass.getpass("password: ")
    if not password:
        print("empty password", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0


def cmd_dsn_classify(args: argparse.Namespace) -> int:
    from relayd.cli import dsn as command

    return int(command.run(args.files, args.json))


def cmd_arf_parse(args: argparse.Namespace) -> int:
    from relayd.cli import arf as command

    return int(command.run(args.files, args.json))


#: one example per subcommand, shown at the end of its --help (those given inline above win)
SUBCOMMAND_EXAMPLES = {
    "serve": "relayd serve --config /etc/relayd/relayd.toml --log-level info",
    "queue list": "relayd queue list --state deferred --domain example.com --older-than 2h --config FILE",
    "queue summary": "relayd queue summary --config conf/relayd.toml   (like qshape; --json for scripts)",
    "queue cat": "relayd queue cat agrarjeztjjtitkc --headers --config conf/relayd.toml",
    "queue show": "relayd queue show agrarjeztjjtitkc --config conf/relayd.toml",
    "queue hold": "relayd queue hold --domain example.com --config conf/relayd.toml",
    "queue release": "relayd queue release --domain example.com --config conf/relayd.toml",
    "queue retry": "relayd queue retry --domain example.com --config conf/relayd.toml   (no selector: all)",
    "queue drop": "relayd queue drop --recipient a@example.com --config conf/relayd.toml",
    "account hash-password": "echo 'change-me' | relayd account hash-password",
    "account list": "relayd account list --json --config conf/relayd.toml",
    "suppress remove": "relayd suppress remove a@example.test --scope global --config conf/relayd.toml",
    "suppress import": "relayd suppress import suppressions.csv --config conf/relayd.toml",
    "suppress export": "relayd suppress export backup.csv --config conf/relayd.toml",
    "consent import": "relayd consent import consents.csv --config conf/relayd.toml",
    "consent export": "relayd consent export --account acme --list news --config conf/relayd.toml",
    "consent show": "relayd consent show a@example.test --json --config conf/relayd.toml",
    "store migrate": "relayd store migrate --config conf/relayd.toml",
    "dsn classify": "relayd dsn classify --json bounce1.eml bounce2.eml",
    "arf parse": "relayd arf parse --json complaint.eml",
}


def _add_examples(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> None:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for action in subs:
        for name, child in action.choices.items():
            _add_examples(child, (*path, name))
    example = SUBCOMMAND_EXAMPLES.get(" ".join(path))
    if not subs and example and not parser.epilog:
        parser.epilog = f"example: {example}"


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

    sp = with_config(
        sub.add_parser(
            "check-config",
            help="validate the config; exit 2 listing every problem",
            epilog="example: relayd check-config --config /etc/relayd/relayd.toml --dns",
        )
    )
    sp.add_argument(
        "--dns",
        action="store_true",
        help="also check SPF, DKIM, DMARC and MX records in DNS (exit 1 on a problem)",
    )
    sp.set_defaults(fn=cmd_check_config)

    q = sub.add_parser("queue", help="inspect and act on the queue").add_subparsers(
        dest="action", required=True
    )
    queue_cli.register(q, with_config)

    acct = sub.add_parser("account", help="accounts: state, suspension, rates").add_subparsers(
        dest="action", required=True
    )
    sp = acct.add_parser("hash-password", help="read a password on stdin, print its password_hash value")
    sp.set_defaults(fn=cmd_hash_password)
    sp = with_config(acct.add_parser("list", help="accounts and whether they are suspended"))
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_account)
    for name, helptext in (
        ("show", "one account: domains, lists, suspension, complaint and bounce rates"),
        ("suspend", "suspend an account: MAIL FROM refused, its queued mail held"),
        ("reinstate", "lift a suspension: held mail is released"),
    ):
        sp = with_config(acct.add_parser(name, help=helptext, epilog=f"example: relayd account {name} acme"))
        sp.add_argument("name")
        sp.add_argument("--json", action="store_true")
        if name == "suspend":
            sp.add_argument(
                "--reason",
                default="manual",
                choices=["manual", "complaint_rate", "hard_bounce_rate", "spamtrap"],
            )
            sp.add_argument("--details", default="suspended by an operator")
        sp.set_defaults(fn=cmd_account)
    apikey_cli.register(acct, with_config)

    sup = sub.add_parser("suppress", help="suppression entries").add_subparsers(dest="action", required=True)
    sp = with_config(
        sup.add_parser(
            "add",
            help="suppress addresses",
            epilog="example: relayd suppress add a@example.test --scope global --reason manual --expires 30d",
        )
    )
    sp.add_argument("addresses", nargs="+")
    sp.add_argument("--scope", required=True, choices=["global", "account", "list"])
    sp.add_argument("--account")
    sp.add_argument("--list")
    sp.add_argument(
        "--reason",
        required=True,
        choices=[
            "hard_bounce",
            "soft_bounce_limit",
            "complaint",
            "unsubscribe",
            "spamtrap",
            "manual",
            "discard",
        ],
    )
    sp.add_argument("--expires", help="lifetime, e.g. 30d")
    sp.set_defaults(fn=cmd_suppress)
    sp = with_config(sup.add_parser("remove", help="remove suppressions of addresses"))
    sp.add_argument("addresses", nargs="+")
    sp.add_argument("--scope", choices=["global", "account", "list"])
    sp.add_argument("--account")
    sp.add_argument("--list")
    sp.set_defaults(fn=cmd_suppress)
    sp = with_config(
        sup.add_parser("list", help="list suppressions", epilog="example: relayd suppress list --json")
    )
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--address")
    sp.add_argument("--scope", choices=["global", "account", "list"])
    sp.add_argument("--account")
    sp.add_argument("--list")
    sp.add_argument("--reason")
    sp.add_argument("--include-expired", action="store_true")
    sp.add_argument("--limit", type=int, default=1000)
    sp.set_defaults(fn=cmd_suppress)
    sp = with_config(
        sup.add_parser(
            "import", help="import a CSV (address,scope,account,list,reason,created_at,expires_at)"
        )
    )
    sp.add_argument("file")
    sp.set_defaults(fn=cmd_suppress)
    sp = with_config(sup.add_parser("export", help="export every suppression as CSV (to FILE or stdout)"))
    sp.add_argument("file", nargs="?")
    sp.set_defaults(fn=cmd_suppress)

    sp = with_config(
        sub.add_parser(
            "events", help="what policy and feedback did", epilog="example: relayd events --json --since 1h"
        )
    )
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--since", default="1d")
    sp.add_argument("--account")
    sp.add_argument("--kind")
    sp.add_argument("--limit", type=int, default=1000)
    sp.set_defaults(fn=cmd_events)

    consent_cli.register(sub)
    desk_cli.register(sub)

    st = sub.add_parser("store", help="the policy store").add_subparsers(dest="action", required=True)
    sp = with_config(st.add_parser("migrate", help="create or upgrade the schema"))
    sp.set_defaults(fn=cmd_store_migrate)
    sp = with_config(
        st.add_parser(
            "export",
            help="write the whole store (suppressions, accounts, events, sent ledger, consent) as JSON Lines",
            epilog="example: relayd store export state.jsonl --config sqlite.toml",
        )
    )
    sp.add_argument("file", nargs="?")
    sp.set_defaults(fn=cmd_store_transfer)
    sp = with_config(
        st.add_parser(
            "import",
            help="load an export into this config's store (e.g. SQLite -> PostgreSQL)",
            epilog="example: relayd store import state.jsonl --config postgresql.toml",
        )
    )
    sp.add_argument("file")
    sp.set_defaults(fn=cmd_store_transfer)

    dk = sub.add_parser("dkim", help="DKIM keys").add_subparsers(dest="action", required=True)
    sp = dk.add_parser(
        "keygen",
        help="write a signing key, print its DNS TXT record",
        epilog="example: relayd dkim keygen --domain acme.example.test --selector s1",
    )
    sp.add_argument("--domain", required=True)
    sp.add_argument("--selector", required=True)
    sp.add_argument("--algorithm", default="rsa", choices=["rsa", "ed25519"])
    sp.add_argument("--out-dir", default="var/dkim")
    sp.set_defaults(fn=cmd_dkim_keygen)

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
    _add_examples(p)
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
