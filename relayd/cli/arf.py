"""``relayd arf parse [--json] FILE...``: parse complaint reports (no daemon, no config).

One JSON object per file and line with ``--json`` (the DESIGN.md contract), otherwise
one readable line per file. Exit 0 when every file was read, 1 when one could not be.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any, TextIO

from relayd.cli.common import files_command, read_files

if TYPE_CHECKING:
    from relayd.reports.arf.model import ArfReport

__all__ = ["FIELDS", "register", "report_dict", "run"]

FIELDS = (
    "is_arf",
    "feedback_type",
    "original_rcpt",
    "original_mail_from",
    "reported_domain",
    "source_ip",
    "arrival_date",
    "original_message_id",
    "relayd_id",
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``arf parse`` to ``relayd``'s sub-parsers."""
    files_command(
        sub,
        ("arf", "parse"),
        ("complaint reports", "parse ARF complaint reports (files only; no config needed)"),
        run,
    )


def report_dict(path: str, report: ArfReport) -> dict[str, Any]:
    """The contract's JSON shape for one file."""
    data: dict[str, Any] = {"file": path}
    for name in FIELDS:
        data[name] = getattr(report, name)
    return data


def run(files: list[str], as_json: bool, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Parse each file and print the result; return the exit code."""
    # imported here, not at start-up: the other commands do without the parsers
    from relayd.reports.arf.parse import parse

    out = out or sys.stdout
    err = err or sys.stderr

    def show(path: str, raw: bytes) -> None:
        report = parse(raw)
        if as_json:
            out.write(json.dumps(report_dict(path, report), ensure_ascii=False) + "\n")
        elif not report.is_arf:
            out.write(f"{path}: not a complaint report\n")
        else:
            out.write(
                f"{path}: {report.feedback_type} rcpt={report.original_rcpt or '-'} "
                f"from={report.original_mail_from or '-'} ip={report.source_ip or '-'} "
                f"relayd_id={report.relayd_id or '-'}\n"
            )

    return read_files(files, out, err, show)
