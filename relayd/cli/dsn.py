"""``relayd dsn classify [--json] FILE...``: classify bounce files (no daemon, no config).

One JSON object per file and line with ``--json`` (the DESIGN.md contract); otherwise a
table a human can read. Exit 0 when every file was read, 1 when one could not be (the
others are still reported).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any, TextIO

from relayd.cli.common import files_command, read_files

if TYPE_CHECKING:
    from relayd.reports.dsn.model import DsnReport

__all__ = ["register", "report_dict", "run"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``dsn classify`` to ``relayd``'s sub-parsers."""
    files_command(
        sub,
        ("dsn", "classify"),
        ("bounce reports", "classify bounce messages (files only; no config needed)"),
        run,
    )


def report_dict(path: str, report: DsnReport) -> dict[str, Any]:
    """The contract's JSON shape for one file."""
    return {
        "file": path,
        "is_dsn": report.is_dsn,
        "recipients": [
            {
                "address": r.address,
                "action": r.action,
                "status": r.status,
                "reason": r.reason,
                "hard": r.hard,
                "diagnostic": r.diagnostic,
            }
            for r in report.recipients
        ],
    }


def run(files: list[str], as_json: bool, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Classify each file and print the result; return the exit code."""
    # imported here, not at start-up: the other commands do without the parsers
    from relayd.reports.dsn.classifier import classify

    out = out or sys.stdout
    err = err or sys.stderr
    if not as_json:
        out.write(f"{'FILE':<40} {'RECIPIENT':<40} {'ACTION':<9} {'STATUS':<8} {'REASON':<16} HARD\n")

    def show(path: str, raw: bytes) -> None:
        report = classify(raw)
        if as_json:
            out.write(json.dumps(report_dict(path, report), ensure_ascii=False) + "\n")
            return
        if not report.recipients:
            out.write(f"{path:<40} {'(not a bounce)' if not report.is_dsn else '(no recipient)'}\n")
        for r in report.recipients:
            hard = "hard" if r.hard else "soft"
            out.write(
                f"{path:<40} {r.address:<40} {r.action:<9} {r.status or '-':<8} {r.reason:<16} {hard}\n"
            )

    return read_files(files, out, err, show)
