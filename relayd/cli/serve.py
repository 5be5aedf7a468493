"""``relayd serve`` and ``relayd check-config``: run the daemon, or ask whether it would start.

``check-config`` refuses what ``serve`` would refuse (example passwords, unreadable, weak or exposed DKIM
keys) with exit 2 and one ``FILE: key.path: problem`` line each; ``--dns`` also asks whether the published
DNS says what the config says (relayd.cli.doctor), exit 1 on a failed row.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys

from relayd import config as config_mod
from relayd.cli.common import command, load_config
from relayd.core.errors import ConfigError

__all__ = ["cmd_check_config", "cmd_serve", "register"]

#: the levels ``--log-level`` takes (relayd.app.logs)
LOG_LEVELS = ("debug", "info", "warning", "error")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``serve`` and ``check-config`` to ``relayd``'s sub-parsers."""
    sp = command(sub, "serve", cmd_serve, help="run the daemon in the foreground")
    sp.add_argument("--log-level", default="info", choices=list(LOG_LEVELS))

    sp = command(
        sub,
        "check-config",
        cmd_check_config,
        help="validate the config; exit 2 listing every problem",
        epilog="example: relayd check-config --config /etc/relayd/relayd.toml --dns",
    )
    sp.add_argument(
        "--dns",
        action="store_true",
        help="also check SPF, DKIM, DMARC and MX records in DNS (exit 1 on a problem)",
    )


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = load_config(args)
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
    cfg = load_config(args)
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
