"""Every subcommand has ``--help`` with an example."""

from __future__ import annotations

import argparse

from relayd.cli.main import build_parser


def _leaves(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [(path, parser)]
    out = []
    for action in subs:
        for name, child in action.choices.items():
            out.extend(_leaves(child, (*path, name)))
    return out


def test_every_subcommand_help_has_an_example() -> None:
    leaves = _leaves(build_parser())
    assert len(leaves) > 20
    missing = [" ".join(path) for path, p in leaves if "example" not in (p.format_help().lower())]
    assert missing == []
