"""Each bounce detector on its own, called directly on small real messages from the corpora.

One table of (detector, file, what it finds), one of messages a detector claims as no
bounce, and one of messages that are not its format, with readable ids; then the
registry itself: every module of :mod:`relayd.reports.dsn.detectors` is in it once, in
the declared order, and :func:`relayd.reports.dsn.classify` reports the first verdict.
"""

from __future__ import annotations

import json
import pkgutil
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from relayd.reports.dsn import classify, detectors
from relayd.reports.dsn.detection import NOT_A_BOUNCE, Detector, ParsedMessage, read
from relayd.reports.dsn.detectors import (
    DETECTORS,
    amazon_ses,
    delivery_status,
    failed_recipients_header,
    flufl_bounce,
    notice_text,
    returned_original,
    unsignalled,
)
from tests.corpus import CORPUS

FACTORY = Path(__file__).resolve().parent / "corpus_factory" / "corpus"

pytestmark = pytest.mark.skipif(not (CORPUS / "labels.jsonl").exists(), reason="bounce corpus not present")

#: The declared order: most authoritative first, the returned message's To: last.
ORDER = ("rfc3464", "amazon-ses", "unsignalled", "x-failed-recipients", "text", "flufl", "original")


def _path(where: str) -> Path:
    """``shared:dsn/x.eml`` in the shared corpus, ``factory:dsn/x.eml`` in the factory corpus."""
    corpus, _, name = where.partition(":")
    return (CORPUS if corpus == "shared" else FACTORY) / name


def _labels(where: str) -> dict[str, Any]:
    corpus, _, name = where.partition(":")
    labels = (CORPUS if corpus == "shared" else FACTORY) / "labels.jsonl"
    for line in labels.read_text().splitlines():
        label = json.loads(line) if line.strip() else {}
        if label.get("file") == name:
            return label
    raise LookupError(name)


def _parsed(where: str) -> ParsedMessage:
    parsed = read(_path(where).read_bytes())
    assert parsed is not None
    return parsed


# (detector, file, source, [(recipient, status, action), ...] in the order found)
FINDS: list[tuple[ModuleType, str, str, list[tuple[str, str | None, str]]]] = [
    (delivery_status, "shared:dsn/rfc3464-29.eml", "rfc3464", [("kijitora@example.com", "5.5.0", "failed")]),
    (
        delivery_status,  # three Final-Recipient blocks, in report order
        "factory:dsn/opensmtpd-001.eml",
        "rfc3464",
        [
            ("jonas4001@users.example.net", "5.1.1", "failed"),
            ("ines4001@users.example.net", "5.1.1", "failed"),
            ("hugo.p4001@users.example.net", "5.1.1", "failed"),
        ],
    ),
    (
        amazon_ses,
        "shared:dsn/lhost-amazonses-09.eml",
        "json",
        [("bounce@simulator.amazonses.com", "5.1.1", "failed")],
    ),
    (
        failed_recipients_header,
        "shared:dsn/lhost-exim-07.eml",
        "text",
        [("shiba@example.com", None, "failed")],
    ),
    (
        failed_recipients_header,  # in the header's order
        "factory:dsn/exim-002.eml",
        "text",
        [
            ("paula2002@users.example.net", "5.1.1", "failed"),
            ("oskar2002@users.example.net", "5.1.1", "failed"),
        ],
    ),
    (notice_text, "shared:dsn/lhost-qmail-07.eml", "text", [("kijitora@example.jp", "4.4.1", "failed")]),
    (flufl_bounce, "shared:dsn/lhost-qmail-07.eml", "flufl", [("kijitora@example.jp", "4.4.1", "failed")]),
    (
        returned_original,
        "shared:dsn/lhost-v5sendmail-01.eml",
        "original",
        [("kijitora@example.com", None, "failed")],
    ),
]


@pytest.mark.parametrize(
    ("detector", "where", "source", "expected"),
    FINDS,
    ids=[f"{detector.name}-{where.rsplit('/', 1)[1]}" for detector, where, _, _ in FINDS],
)
def test_detector_finds_the_recipients_of_its_format(
    detector: Detector, where: str, source: str, expected: list[tuple[str, str | None, str]]
) -> None:
    found = detector.detect(_parsed(where))
    assert found is not None
    assert [(r.address, r.status, r.action) for r in found.recipients] == expected
    assert {r.source for r in found.recipients} == {source}
    labelled = {item["address"] for item in _labels(where)["recipients"]}
    assert {r.address for r in found.recipients} <= labelled


def test_amazon_ses_names_its_reporting_mta_and_notes_the_format() -> None:
    found = amazon_ses.detect(_parsed("shared:dsn/lhost-amazonses-09.eml"))
    assert found is not None
    assert (found.reporting_mta, found.notes) == ("amazonses.com", ("amazon-ses-json",))
    assert (found.recipients[0].reason, found.recipients[0].hard) == ("userunknown", True)


def test_rfc3464_reports_the_reporting_mta() -> None:
    found = delivery_status.detect(_parsed("factory:dsn/opensmtpd-001.eml"))
    assert found is not None
    assert found.reporting_mta == "relay-opensmtpd.example.test"
    assert found.notes == ()


# (detector, file): its format, and no bounce in it
CLAIMS: list[tuple[ModuleType, str]] = [
    (amazon_ses, "shared:other/lhost-amazonses-11.eml"),  # an SES Complaint notification
    (unsignalled, "shared:other/rfc3834-01.eml"),  # an RFC 3834 auto-reply
    (unsignalled, "shared:other/is-not-bounce-01.eml"),  # plain mail
]


@pytest.mark.parametrize(
    ("detector", "where"),
    CLAIMS,
    ids=[f"{detector.name}-{where.rsplit('/', 1)[1]}" for detector, where in CLAIMS],
)
def test_detector_claims_its_format_as_no_bounce(detector: Detector, where: str) -> None:
    assert detector.detect(_parsed(where)) == NOT_A_BOUNCE
    assert not classify(_path(where).read_bytes()).is_dsn


# (detector, file that is not its format)
NOT_ITS_FORMAT: list[tuple[ModuleType, str]] = [
    (delivery_status, "shared:dsn/lhost-qmail-07.eml"),  # prose, no delivery-status part
    (amazon_ses, "shared:dsn/rfc3464-29.eml"),
    (unsignalled, "shared:dsn/lhost-qmail-07.eml"),  # a bounce: the screen lets it through
    (failed_recipients_header, "shared:dsn/lhost-qmail-07.eml"),
    (notice_text, "shared:other/rfc3834-01.eml"),
    (flufl_bounce, "shared:other/rfc3834-01.eml"),
    (returned_original, "shared:dsn/lhost-qmail-07.eml"),  # returns no message headers
]


@pytest.mark.parametrize(
    ("detector", "where"),
    NOT_ITS_FORMAT,
    ids=[f"{detector.name}-{where.rsplit('/', 1)[1]}" for detector, where in NOT_ITS_FORMAT],
)
def test_detector_returns_nothing_for_another_format(detector: Detector, where: str) -> None:
    assert detector.detect(_parsed(where)) is None


def test_every_detector_is_tested_on_its_own() -> None:
    tested = {detector.name for detector, *_ in FINDS} | {detector.name for detector, _ in CLAIMS}
    assert tested == set(ORDER)
    assert {detector.name for detector, _ in NOT_ITS_FORMAT} == set(ORDER)


def test_the_registry_names_every_detector_module_once_in_order() -> None:
    modules = sorted(info.name for info in pkgutil.iter_modules(detectors.__path__))
    registered = [
        detector.__name__.rsplit(".", 1)[1] for detector in DETECTORS if isinstance(detector, ModuleType)
    ]
    assert len(registered) == len(DETECTORS)
    assert sorted(registered) == modules
    assert len(set(registered)) == len(registered)
    assert tuple(detector.name for detector in DETECTORS) == ORDER


def _corpus_files() -> list[Path]:
    return sorted(CORPUS.glob("*/*.eml")) + sorted(FACTORY.glob("*/*.eml"))


def test_classify_reports_the_first_verdict_of_the_registry() -> None:
    for path in _corpus_files():
        raw = path.read_bytes()
        parsed = read(raw)
        assert parsed is not None
        verdict = next((found for d in DETECTORS if (found := d.detect(parsed)) is not None), None)
        report = classify(raw)
        if verdict is None:
            assert (report.is_dsn, report.recipients) == (parsed.is_report, ()), path.name
        else:
            assert report.recipients == verdict.recipients, path.name
            assert report.is_dsn == bool(verdict.recipients), path.name
