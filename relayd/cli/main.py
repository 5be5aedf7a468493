"""The ``relayd`` command line (the contract is in DESIGN.md).

Exit codes: 0 ok, 1 runtime failure, 2 usage or config error. Every ``--json`` output is one object a line.

Each command group is a module of this package with a ``register(sub)`` (relayd.cli.common says what it
does); :data:`GROUPS` lists them in the order ``relayd --help`` shows them, and :func:`main` prints what
their handlers raise.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from relayd.cli import account, arf, consent, desk, dkim, dsn, events, queue, serve, store, suppress
from relayd.core.errors import ConfigError, RelaydError

EXAMPLES = """examples:
  relayd serve --config conf/relayd.toml
  relayd check-config --config conf/relayd.toml
  relayd queue list --config conf/relayd.toml --json
  relayd queue summary --config conf/relayd.toml
  relayd queue hold --domain example.com --config conf/relayd.toml
  relayd dsn classify --json bounce.eml
"""

#: the command groups in the order of ``relayd --help`` (serve: serve and check-config; account: with
#: api-key; desk: inbox and dmarc)
GROUPS: tuple[ModuleType, ...] = (
    serve,
    queue,
    account,
    suppress,
    events,
    consent,
    desk,
    store,
    dkim,
    dsn,
    arf,
)


#: one example per subcommand, shown at the end of its --help (an epilog its group module gives wins)
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
    for group in GROUPS:
        group.register(sub)
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
