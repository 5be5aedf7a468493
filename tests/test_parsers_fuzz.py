"""classify() and parse() never raise: arbitrary bytes and mutated corpus samples."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relayd.reports.arf import ArfReport, parse
from relayd.reports.dsn import DsnReport, classify
from tests.test_dsn_corpus import CORPUS

SAMPLES = sorted(CORPUS.glob("*/*.eml")) if CORPUS.exists() else []
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check(raw: bytes) -> None:
    assert isinstance(classify(raw), DsnReport)
    assert isinstance(parse(raw), ArfReport)


@FAST
@given(st.binary(max_size=4096))
def test_arbitrary_bytes(raw: bytes) -> None:
    _check(raw)


@FAST
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=2000))
def test_header_shaped_text(body: str) -> None:
    _check(f"Content-Type: multipart/report; report-type=delivery-status; boundary=b\n\n--b\n{body}".encode())


def _sample(index: int) -> bytes:
    return SAMPLES[index % len(SAMPLES)].read_bytes() if SAMPLES else b"Subject: x\n\nbody\n"


@FAST
@given(st.integers(min_value=0, max_value=10_000), st.floats(min_value=0.0, max_value=1.0))
def test_truncated_samples(index: int, fraction: float) -> None:
    raw = _sample(index)
    _check(raw[: int(len(raw) * fraction)])


@FAST
@given(
    st.integers(min_value=0, max_value=10_000),
    st.lists(st.tuples(st.integers(min_value=0), st.binary(min_size=1, max_size=16)), max_size=8),
)
def test_spliced_junk(index: int, edits: list[tuple[int, bytes]]) -> None:
    raw = bytearray(_sample(index))
    for position, junk in edits:
        at = position % (len(raw) + 1)
        raw[at:at] = junk
    _check(bytes(raw))


@FAST
@given(
    st.integers(min_value=0, max_value=10_000), st.sampled_from(["utf-7", "x-unknown", "utf-16", "ebcdic"])
)
def test_wrong_charsets(index: int, charset: str) -> None:
    raw = _sample(index).replace(b"charset=", f"charset={charset};x=".encode())
    _check(raw.replace(b"us-ascii", charset.encode()).replace(b"UTF-8", charset.encode()))


def test_huge_attachment_like_part() -> None:
    part = b"A" * 2_000_000
    raw = (
        b"From: MAILER-DAEMON@example.org\nSubject: Undeliverable\n"
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\n\n"
        b"--b\nContent-Type: text/plain\n\nfailed: a@example.org\n"
        b"--b\nContent-Type: message/delivery-status\nContent-Transfer-Encoding: base64\n\n"
        + part
        + b"\n--b\nContent-Type: message/rfc822\n\n"
        + b"X-Long: "
        + part
        + b"\n\nbody\n--b--\n"
    )
    _check(raw)


def test_deeply_nested_multiparts() -> None:
    raw = b"Content-Type: multipart/mixed; boundary=b0\n\n"
    for depth in range(60):
        raw += f"--b{depth}\nContent-Type: multipart/mixed; boundary=b{depth + 1}\n\n".encode()
    _check(raw)


def test_samples_as_crlf_and_without_headers() -> None:
    for path in SAMPLES[:40]:
        raw = path.read_bytes()
        _check(raw.replace(b"\n", b"\r\n"))
        _check(raw.split(b"\n\n", 1)[-1])
