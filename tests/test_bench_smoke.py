"""bench/e2e.py still runs: relayd half, small numbers, figures printed, signatures verified.

No timing is asserted (the figures depend on the machine); only that a run completes, every message reaches
the sink and the DKIM check of the kept messages passes. Postfix is left out (it needs root and a few
seconds more); ``bench/e2e.py --quick`` covers it by hand.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dkimverify import HAVE_MAIL_DKIM

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_e2e_relayd_only_prints_figures() -> None:
    assert shutil.which("smtp-source"), "smtp-source (Debian postfix) is needed; .ci/run installs it"
    assert HAVE_MAIL_DKIM, "Perl Mail::DKIM is needed; .ci/run installs libmail-dkim-perl"
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "e2e.py"),
        "--quick",
        "--relayd-only",
        "--no-scale",
        "--suppressions",
        "20000",
        "--messages",
        "200",
        "--messages-b",
        "30",
        "--verify",
        "5",
        "--paced-seconds",
        "2",
        "--paced-rate",
        "20",
        "5",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    saturated, _, paced = out.partition("250 latency at the same offered load")
    rows = {
        m.group(1): m.group(0)
        for m in re.finditer(r"^relayd\s+(A 1 rcpt|B 10 rcpt)\s+\d+\s+\d+.*$", saturated, re.M)
    }
    assert set(rows) == {"A 1 rcpt", "B 10 rcpt"}, out
    assert not any("INCOMPLETE" in row or "smtp-source:" in row for row in rows.values()), out
    for row in rows.values():
        accepted, delivered = (int(x) for x in row.split()[5:7])
        assert accepted > 0 and delivered > 0, row
    # DKIM of every transaction kept: profile A's copies, and each of profile B's (pipelined) copies
    assert "relayd: profile A: 5/5 transactions verified" in out, out
    assert "relayd: profile B: 50/50 transactions verified" in out, out
    # the open-loop runs: every message offered was accepted, each with a latency figure
    paced_rows = re.findall(
        r"^relayd\s+(A 1 rcpt|B 10 rcpt)\s+(\d+)\s+(\d+)\s+\d+\s+[\d.]+ms\s.*$", paced, re.M
    )
    assert [(p, int(rate), int(n)) for p, rate, n in paced_rows] == [
        ("A 1 rcpt", 20, 40),
        ("B 10 rcpt", 5, 20),
    ], paced
    assert "INCOMPLETE" not in paced, paced
