"""The shared bounce corpus through the real ``relayd dsn classify --json`` command.

The CLI runs once over every dsn/ and other/ file (and once over CRLF copies of them);
each labelled recipient is then one test that asserts the recipient was found and its
hard/soft verdict. Reasons are measured, not asserted per file: the labels are sisimai's
judgement and its own releases disagree on about one file in twenty (see
``shared/corpus/README.md``); ``test_agreement`` prints the three figures and guards
them against regressions.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.corpus import CORPUS

pytestmark = pytest.mark.skipif(not (CORPUS / "labels.jsonl").exists(), reason="bounce corpus not present")

#: Where our verdict differs from the label and we believe ours; each names the
#: disagreement. Recipient extraction has no exceptions.
HARD_SOFT_DISAGREEMENTS: dict[str, str] = {
    "dsn/lhost-ezweb-02.eml": "label says suspend for '550 user unknown (in reply to RCPT TO command)'; "
    "we read it as the mailbox not existing",
    "dsn/lhost-interscanmss-03.eml": "InterScan's notice only says 'Unable to deliver message to <addr>'; "
    "the label's userunknown comes from a sisimai module rule for that product",
    "dsn/lhost-opensmtpd-12.eml": "a *delayed* report ('No MX found', Status 4.0.0); the label makes it a "
    "hard notaccept, we keep a temporary report soft",
    "dsn/lhost-sendmail-41.eml": "'554 ... This user doesn't have a yahoo.com account' after DATA with no "
    "RCPT evidence: sisimai's own rule says filtered, its Sendmail module overrides it",
    "dsn/rfc3464-42.eml": "Gmail's 'The email account that you tried to reach does not exist' is a "
    "missing mailbox to us; the label says filtered",
    "dsn/rhost-messagelabs-03.eml": "'542 <addr> Rejected' names no cause; the label's userunknown is a "
    "MessageLabs-specific rule",
    "dsn/lhost-messagingserver-09.eml": "'550 <addr>: User unknown' with Status 5.0.0 and no command: "
    "sisimai's rule makes that filtered elsewhere (rfc3464-57), its module userunknown here",
    "dsn/rfc3464-58.eml": "same text as rfc3464-57 bar the echoed address; the labels disagree",
    "dsn/rhost-gsuite-09.eml": "same text as rhost-gsuite-08 bar the echoed address; the labels disagree",
}


@dataclass(frozen=True)
class Case:
    file: str
    kind: str
    address: str
    aliases: tuple[str, ...]
    hard: bool
    reason: str


def _labels() -> list[dict[str, Any]]:
    path = CORPUS / "labels.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


LABELS = [label for label in _labels() if label["kind"] in {"dsn", "other"}]
CASES = [
    Case(
        file=label["file"],
        kind=label["kind"],
        address=rcpt["address"],
        aliases=tuple(rcpt.get("aliases", ())),
        hard=bool(rcpt["hard"]),
        reason=rcpt["reason"],
    )
    for label in LABELS
    if label["kind"] == "dsn"
    for rcpt in label["recipients"]
]


def _case_id(case: Case) -> str:
    return f"{Path(case.file).stem}:{case.address}"


def run_cli(files: list[Path]) -> dict[str, dict[str, Any]]:
    """Run ``python -m relayd dsn classify --json`` once; results keyed by path."""
    proc = subprocess.run(
        [sys.executable, "-m", "relayd", "dsn", "classify", "--json", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert len(results) == len(files)
    return {result["file"]: result for result in results}


def _to_crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@pytest.fixture(scope="module")
def outputs() -> dict[str, dict[str, Any]]:
    """CLI output per corpus-relative file name (LF files as stored)."""
    files = [CORPUS / label["file"] for label in LABELS]
    by_path = run_cli(files)
    return {label["file"]: by_path[str(CORPUS / label["file"])] for label in LABELS}


@pytest.fixture(scope="module")
def crlf_outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """CLI output for CRLF copies (mail as read off the wire)."""
    root = tmp_path_factory.mktemp("crlf")
    paths = {}
    for label in LABELS:
        target = root / label["file"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(_to_crlf((CORPUS / label["file"]).read_bytes()))
        paths[label["file"]] = target
    by_path = run_cli(list(paths.values()))
    return {name: by_path[str(path)] for name, path in paths.items()}


def _find(output: dict[str, Any], case: Case) -> dict[str, Any] | None:
    names = {case.address, *case.aliases}
    return next((r for r in output["recipients"] if r["address"] in names), None)


def _params() -> Iterator[Any]:
    for case in CASES:
        marks = []
        if case.file in HARD_SOFT_DISAGREEMENTS:
            marks.append(pytest.mark.xfail(strict=True, reason=HARD_SOFT_DISAGREEMENTS[case.file]))
        yield pytest.param(case, id=_case_id(case), marks=marks)


@pytest.mark.parametrize("case", list(_params()))
def test_recipient_and_hardness(case: Case, outputs: dict[str, dict[str, Any]]) -> None:
    output = outputs[case.file]
    assert output["is_dsn"], output
    found = _find(output, case)
    assert found is not None, f"{case.address} not among {[r['address'] for r in output['recipients']]}"
    assert found["hard"] == case.hard, found


@pytest.mark.parametrize(
    "name", [label["file"] for label in LABELS if label["kind"] == "other"], ids=lambda n: Path(n).stem
)
def test_other_is_not_a_bounce(name: str, outputs: dict[str, dict[str, Any]]) -> None:
    assert outputs[name]["is_dsn"] is False
    assert outputs[name]["recipients"] == []


def test_crlf_copies_agree(
    outputs: dict[str, dict[str, Any]], crlf_outputs: dict[str, dict[str, Any]]
) -> None:
    differing = [
        name for name in outputs if {**outputs[name], "file": None} != {**crlf_outputs[name], "file": None}
    ]
    assert differing == []


def soft_reported_hard(outputs: dict[str, dict[str, Any]]) -> list[str]:
    """Labelled-soft recipients we call hard: the costly mistake (suppressed for good)."""
    mistakes = []
    for case in CASES:
        result = _find(outputs[case.file], case)
        if result is not None and result["hard"] and not case.hard:
            mistakes.append(f"{case.file}:{case.address} ({case.reason} reported {result['reason']})")
    return mistakes


def agreement(outputs: dict[str, dict[str, Any]]) -> tuple[float, float, float]:
    """(recipient, hard/soft, reason) agreement with the labels, as fractions."""
    found = hard = reason = 0
    for case in CASES:
        result = _find(outputs[case.file], case)
        if result is None:
            continue
        found += 1
        hard += result["hard"] == case.hard
        same = {"onhold": "undefined"}
        reason += same.get(result["reason"], result["reason"]) == same.get(case.reason, case.reason)
    total = len(CASES)
    return found / total, hard / total, reason / total


def test_agreement(outputs: dict[str, dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    recipient, hard, reason = agreement(outputs)
    with capsys.disabled():
        print(
            f"\ncorpus agreement over {len(CASES)} labelled recipients: "
            f"recipient {recipient:.1%}, hard/soft {hard:.1%}, reason {reason:.1%} (onhold == undefined)"
        )
        mistakes = soft_reported_hard(outputs)
        print(f"soft reported hard: {len(mistakes)}", *mistakes, sep="\n  ")
    assert recipient >= 0.98
    assert hard >= 0.95
    assert reason >= 0.85


def test_cli_reports_unreadable_file(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "relayd", "dsn", "classify", "--json", str(tmp_path / "missing.eml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "missing.eml" in proc.stderr
