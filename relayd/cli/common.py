"""What the ``relayd`` command groups share: ``--config``, the store and queue it names, the operator's name,
the file loops.

Every command group is a module of this package with one ``register(sub)``: it adds its parser(s) to
``relayd``'s sub-parsers ``sub`` and sets ``fn`` on each command to its handler, ``fn(args) -> exit code``
(0 ok, 1 runtime failure, 2 usage or config error). relayd.cli.main calls the ``register`` functions in the
order ``relayd --help`` lists the groups and prints what a handler raises (``ConfigError``, ``RelaydError``).

The store and the queue are opened per command and closed on the way out, also when the command fails
(the daemon may be running beside it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from relayd import config as config_mod

if TYPE_CHECKING:
    from relayd.queue.shards import QueueShards
    from relayd.store import Store

__all__ = [
    "command",
    "files_command",
    "group",
    "load_config",
    "opened_queue",
    "opened_store",
    "operator_name",
    "print_rejected",
    "read_files",
    "report_import",
    "run_on_queue",
    "run_on_store",
    "with_config",
    "write_export",
]

_T = TypeVar("_T")

# --- parsers -----------------------------------------------------------------------------------------------


def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``--config FILE`` every command but the file-only ones takes."""
    sp.add_argument("--config", required=True, type=Path, help="the TOML config file")
    return sp


def group(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    *,
    dest: str = "action",
    **kwargs: Any,
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """Add ``relayd NAME`` (``kwargs``: its help and epilog) and return the sub-parsers of its commands; the
    command chosen is in ``args.<dest>``."""
    return sub.add_parser(name, **kwargs).add_subparsers(dest=dest, required=True)


def command(
    actions: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    fn: Callable[[argparse.Namespace], int],
    *,
    config: bool = True,
    **kwargs: Any,
) -> argparse.ArgumentParser:
    """Add the command ``name`` run by ``fn`` (``kwargs``: its help and epilog); with ``config``, its first
    option is ``--config``."""
    sp = actions.add_parser(name, **kwargs)
    if config:
        with_config(sp)
    sp.set_defaults(fn=fn)
    return sp


# --- config, store, queue -------------------------------------------------------------------------------


def load_config(args: argparse.Namespace) -> config_mod.Config:
    """The config ``--config`` names; raises ``ConfigError`` listing every problem (printed by main)."""
    return config_mod.load(args.config)


@contextlib.asynccontextmanager
async def opened_store(cfg: config_mod.Config) -> AsyncIterator[Store]:
    """The policy store of ``cfg``, closed on the way out."""
    from relayd.store import open_store

    store = await open_store(cfg.store.backend, cfg.store.path, cfg.store.dsn)
    try:
        yield store
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def opened_queue(cfg: config_mod.Config) -> AsyncIterator[QueueShards]:
    """The queue shards of ``cfg``, opened as the daemon's processes open them, closed on the way out."""
    from relayd.queue.shards import QueueShards

    queue = QueueShards(cfg.queue.path)
    await queue.open()
    try:
        yield queue
    finally:
        await queue.close()


async def _within(
    resource: contextlib.AbstractAsyncContextManager[_T], fn: Callable[[_T], Awaitable[int]]
) -> int:
    async with resource as opened:
        return await fn(opened)


def run_on_store(cfg: config_mod.Config, fn: Callable[[Store], Awaitable[int]]) -> int:
    """Run ``fn`` on the open store of ``cfg`` in a new event loop; its exit code."""
    return asyncio.run(_within(opened_store(cfg), fn))


def run_on_queue(cfg: config_mod.Config, fn: Callable[[QueueShards], Awaitable[int]]) -> int:
    """Run ``fn`` on the open queue of ``cfg`` in a new event loop; its exit code."""
    return asyncio.run(_within(opened_queue(cfg), fn))


def operator_name() -> str:
    """The operator, as far as we can tell (``sudo`` keeps the real user in SUDO_USER), for events."""
    try:
        return os.environ.get("SUDO_USER") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


# --- files -------------------------------------------------------------------------------------------------


async def write_export(file: str | Path | None, write: Callable[[TextIO], Awaitable[int]]) -> None:
    """CSV export to ``file``, or to stdout when none is named; to a file, the row count goes to stderr
    (stdout stays the data alone when it is the data)."""
    if file:
        with open(file, "w", newline="", encoding="utf-8") as out:
            n = await write(out)
        print(f"{n} row(s) exported to {file}", file=sys.stderr)
    else:
        await write(sys.stdout)


def print_rejected(file: str | Path, errors: Iterable[tuple[int, str]]) -> None:
    """Each rejected row of an import as ``FILE:LINE: problem`` on stderr."""
    for line, problem in errors:
        print(f"{file}:{line}: {problem}", file=sys.stderr)


def report_import(file: str | Path, imported: int, errors: Iterable[tuple[int, str]]) -> int:
    """Print each rejected row as ``FILE:LINE: problem`` (stderr) and the counts; exit 1 when any row was
    rejected, as a bad row never spoils the file."""
    rejected = list(errors)
    print_rejected(file, rejected)
    print(f"{imported} row(s) imported, {len(rejected)} rejected")
    return 0 if not rejected else 1


def files_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    names: tuple[str, str],
    helps: tuple[str, str],
    run: Callable[[list[str], bool], int],
) -> None:
    """Add ``relayd GROUP COMMAND [--json] FILE...`` (``names``; ``helps``: their help texts), a command on
    files alone: no daemon, no config. ``run(files, as_json)`` gives the exit code."""
    sp = command(
        group(sub, names[0], help=helps[0]),
        names[1],
        lambda args: run(args.files, args.json),
        config=False,
        help=helps[1],
    )
    sp.add_argument("--json", action="store_true")
    sp.add_argument("files", nargs="+")


def read_files(files: Iterable[str], out: TextIO, err: TextIO, report: Callable[[str, bytes], None]) -> int:
    """Read each file whole and hand it to ``report``; one that cannot be read is a line on ``err`` and
    the others are still reported. Exit 0 when every file was read, else 1."""
    status = 0
    for path in files:
        try:
            with open(path, "rb") as handle:
                raw = handle.read()
        except OSError as exc:
            err.write(f"{path}: cannot read: {exc.strerror or exc}\n")
            status = 1
            continue
        report(path, raw)
    out.flush()
    return status
