"""``relayd dkim keygen --domain D --selector S [--algorithm rsa|ed25519]``: a signing key and its record.

The private key is written with mode 0600 (an existing file is never overwritten: relayd.mail.dkim); the
``[[dkim]]`` lines to add go to stderr and the DNS TXT record alone to stdout, so it can be piped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from relayd.cli.common import command, group
from relayd.mail.dkim import ALGORITHMS, DkimKeyError, keygen

__all__ = ["cmd_dkim_keygen", "register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``dkim keygen`` to ``relayd``'s sub-parsers."""
    dk = group(sub, "dkim", help="DKIM keys")
    sp = command(
        dk,
        "keygen",
        cmd_dkim_keygen,
        config=False,
        help="write a signing key, print its DNS TXT record",
        epilog="example: relayd dkim keygen --domain acme.example.test --selector s1",
    )
    sp.add_argument("--domain", required=True)
    sp.add_argument("--selector", required=True)
    sp.add_argument("--algorithm", default="rsa", choices=list(ALGORITHMS))
    sp.add_argument("--out-dir", default="var/dkim")


def cmd_dkim_keygen(args: argparse.Namespace) -> int:
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
