"""Every ``relayd`` command group is a module of relayd.cli with a ``register(sub)``, wired into the root
parser; options that name an enum's members take exactly its values."""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import re
import subprocess
import sys
from types import ModuleType

import pytest

import relayd.cli
from relayd.cli.main import GROUPS, build_parser
from relayd.desk.inbox import Kind
from relayd.mail.dkim import ALGORITHMS
from relayd.queue.store import View
from relayd.store import Reason, Scope, SuspendReason

#: modules of relayd.cli that hold no command group
_NOT_GROUPS = {"main", "common"}


def _group_modules() -> list[ModuleType]:
    """The plain modules of relayd.cli (packages such as ``doctor`` are what a command uses, not commands)."""
    found = [
        m.name for m in pkgutil.iter_modules(relayd.cli.__path__) if not m.ispkg and m.name not in _NOT_GROUPS
    ]
    return [importlib.import_module(f"relayd.cli.{name}") for name in sorted(found)]


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action


def _parser(*path: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        parser = _subparsers(parser).choices[name]
    return parser


def _choices(path: tuple[str, ...], option: str) -> list[str]:
    (action,) = [a for a in _parser(*path)._actions if option in a.option_strings]
    assert action.choices is not None
    return list(action.choices)


def _root_commands() -> list[str]:
    return list(_subparsers(build_parser()).choices)


def test_the_package_holds_the_groups_main_registers() -> None:
    modules = _group_modules()
    assert {m.__name__.rsplit(".", 1)[1] for m in modules} >= {
        "serve",
        "queue",
        "account",
        "apikey",
        "suppress",
        "events",
        "consent",
        "desk",
        "store",
        "dkim",
        "dsn",
        "arf",
    }
    # api-key is a command of ``relayd account``: account registers it, main registers the rest
    assert {m.__name__ for m in modules} == {g.__name__ for g in GROUPS} | {"relayd.cli.apikey"}


@pytest.mark.parametrize("module", _group_modules(), ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_every_group_module_registers_its_parsers(module: ModuleType) -> None:
    register = getattr(module, "register", None)
    assert callable(register), f"{module.__name__} has no register()"
    signature = inspect.signature(register)
    assert len(signature.parameters) == 1  # the sub-parsers to add to, nothing else
    assert signature.return_annotation in (None, "None")
    parser = argparse.ArgumentParser(prog="t")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    assert sub.choices, f"{module.__name__}.register() added no parser"
    if module.__name__ == "relayd.cli.apikey":
        assert list(sub.choices) == ["api-key"]
    else:  # whatever a group adds is a command of ``relayd`` itself
        assert set(sub.choices) <= set(_root_commands())


def test_relayd_help_lists_every_group_in_order() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "relayd", "--help"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    expected = [
        "serve",
        "check-config",
        "queue",
        "account",
        "suppress",
        "events",
        "consent",
        "inbox",
        "dmarc",
        "store",
        "dkim",
        "dsn",
        "arf",
    ]
    assert _root_commands() == expected
    assert "{" + ",".join(expected) + "}" in out
    # one line per group, indented four: "    serve               run the daemon in the foreground"
    listed = [line.split()[0] for line in out.splitlines() if re.match(r"    [a-z]", line)]
    assert listed == expected


@pytest.mark.parametrize(
    "path",
    [
        (),
        ("serve",),
        ("check-config",),
        ("queue",),
        ("queue", "list"),
        ("account",),
        ("account", "suspend"),
        ("account", "api-key"),
        ("account", "api-key", "revoke"),
        ("suppress",),
        ("suppress", "add"),
        ("events",),
        ("consent",),
        ("consent", "import"),
        ("inbox",),
        ("inbox", "list"),
        ("dmarc",),
        ("store",),
        ("store", "migrate"),
        ("dkim",),
        ("dkim", "keygen"),
        ("dsn",),
        ("dsn", "classify"),
        ("arf",),
        ("arf", "parse"),
    ],
    ids=lambda p: " ".join(p) or "relayd",
)
def test_each_help_parses_and_exits_0(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*path, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: relayd {' '.join(path)}".rstrip())


def test_enum_backed_choices_are_the_enum_values() -> None:
    assert _choices(("suppress", "add"), "--scope") == [s.value for s in Scope]
    assert _choices(("suppress", "remove"), "--scope") == [s.value for s in Scope]
    assert _choices(("suppress", "list"), "--scope") == [s.value for s in Scope]
    assert _choices(("suppress", "add"), "--reason") == [r.value for r in Reason]
    assert sorted(_choices(("account", "suspend"), "--reason")) == sorted(r.value for r in SuspendReason)
    assert _choices(("account", "suspend"), "--reason")[0] == "manual"  # the default, listed first
    assert _choices(("dkim", "keygen"), "--algorithm") == list(ALGORITHMS)
    assert _choices(("inbox", "list"), "--kind") == [k.value for k in Kind]
    assert _choices(("queue", "list"), "--state") == [v.value for v in View if v is not View.PENDING]


def test_a_value_outside_the_enum_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["suppress", "add", "a@example.test", "--scope", "global", "--reason", "bored", "--config", "x"]
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(args)
    assert exit_.value.code == 2
    assert "invalid choice: 'bored'" in capsys.readouterr().err
