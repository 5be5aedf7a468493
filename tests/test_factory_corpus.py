"""The factory corpus (real DSNs from Postfix, Exim, Sendmail and OpenSMTPD) through the CLI.

``tests/corpus_factory/`` made these bounces with private instances of the MTAs and scripted
next hops, so every label is known by construction (see its README). As over the shared
corpus, the real ``relayd dsn classify --json`` command runs once over every file; each
labelled recipient is one test asserting that the recipient was found and its hard/soft
verdict, and ``test_agreement`` prints and guards the recipient / hard-soft / reason figures,
per MTA family as well, and the count of soft bounces reported hard (the costly mistake: it
suppresses a deliverable address for good).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.test_dsn_corpus import run_cli

CORPUS = Path(__file__).resolve().parent / "corpus_factory" / "corpus"

#: (family, wording of the next hop) where our hard/soft verdict differs from the label and
#: we keep ours; each says why. OpenSMTPD quotes the reply without naming the command it
#: answered, and a "no such user" that may have answered DATA is a content filter speaking
#: (sisimai's rule, which the shared corpus's labels follow): we stay soft without a code.
HARD_SOFT_DISAGREEMENTS: dict[tuple[str, str], str] = {
    ("factory-opensmtpd", "550 No such user here"): "no enhanced code, no SMTP command named",
    (
        "factory-opensmtpd",
        "550 Requested action not taken: mailbox unavailable (no such recipient)",
    ): "no enhanced code, no SMTP command named",
}


@dataclass(frozen=True)
class Case:
    file: str
    family: str
    scenario: str
    wording: str | None
    address: str
    hard: bool
    reason: str


def _labels() -> list[dict[str, Any]]:
    return [json.loads(line) for line in (CORPUS / "labels.jsonl").read_text().splitlines() if line.strip()]


LABELS = _labels()
CASES = [
    Case(
        file=label["file"],
        family=label["family"],
        scenario=label["scenario"],
        wording=label.get("wording"),
        address=rcpt["address"],
        hard=bool(rcpt["hard"]),
        reason=rcpt["reason"],
    )
    for label in LABELS
    for rcpt in label["recipients"]
]


@pytest.fixture(scope="module")
def outputs() -> dict[str, dict[str, Any]]:
    """CLI output per corpus-relative file name."""
    by_path = run_cli([CORPUS / label["file"] for label in LABELS])
    return {label["file"]: by_path[str(CORPUS / label["file"])] for label in LABELS}


def _find(output: dict[str, Any], case: Case) -> dict[str, Any] | None:
    return next((r for r in output["recipients"] if r["address"] == case.address), None)


def test_corpus_is_large_and_varied() -> None:
    families = Counter(case.family for case in CASES)
    assert len(CASES) >= 300
    assert len(families) >= 4, families


def _params() -> list[Any]:
    params = []
    for case in CASES:
        why = HARD_SOFT_DISAGREEMENTS.get((case.family, case.wording or ""))
        marks = [pytest.mark.xfail(strict=True, reason=why)] if why else []
        params.append(pytest.param(case, id=f"{Path(case.file).stem}:{case.address}", marks=marks))
    return params


@pytest.mark.parametrize("case", _params())
def test_recipient_and_hardness(case: Case, outputs: dict[str, dict[str, Any]]) -> None:
    output = outputs[case.file]
    assert output["is_dsn"], output
    found = _find(output, case)
    assert found is not None, f"{case.address} not among {[r['address'] for r in output['recipients']]}"
    assert found["hard"] == case.hard, (case.scenario, found)


def agreement(outputs: dict[str, dict[str, Any]], cases: list[Case]) -> dict[str, float]:
    """Recipient, hard/soft and reason agreement as fractions, and soft-reported-hard count."""
    found = hard = reason = soft_as_hard = 0
    for case in cases:
        result = _find(outputs[case.file], case)
        if result is None:
            continue
        found += 1
        hard += result["hard"] == case.hard
        reason += result["reason"] == case.reason
        soft_as_hard += result["hard"] and not case.hard
    total = len(cases)
    return {
        "recipient": found / total,
        "hard": hard / total,
        "reason": reason / total,
        "soft_as_hard": float(soft_as_hard),
    }


def _line(name: str, figures: dict[str, float], count: int) -> str:
    return (
        f"{name} ({count} recipients): recipient {figures['recipient']:.1%}, "
        f"hard/soft {figures['hard']:.1%}, reason {figures['reason']:.1%}, "
        f"soft reported hard {int(figures['soft_as_hard'])}"
    )


def test_agreement(outputs: dict[str, dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    overall = agreement(outputs, CASES)
    families = sorted({case.family for case in CASES})
    with capsys.disabled():
        print("\n" + _line("factory corpus", overall, len(CASES)))
        for family in families:
            subset = [case for case in CASES if case.family == family]
            print("  " + _line(family, agreement(outputs, subset), len(subset)))
        misses = Counter(
            (case.reason, (_find(outputs[case.file], case) or {}).get("reason"))
            for case in CASES
            if (_find(outputs[case.file], case) or {}).get("reason") != case.reason
        )
        for (label, got), count in misses.most_common():
            print(f"  reason {label} reported {got}: {count}")
    assert overall["recipient"] >= 0.99
    assert overall["hard"] >= 0.98
    assert overall["reason"] >= 0.95
    assert overall["soft_as_hard"] == 0
