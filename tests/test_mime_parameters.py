"""A tenant's message cannot stall a process through the standard library's parameter parser.

``email.message._parseparam`` costs ``;`` count x field length: one Content-Type of 64 KB of ``;`` inside
quotes held the GIL for seconds in each ``get_boundary()`` the rewrite makes. Submission refuses a
Content-Type or Content-Disposition field with more than ``MAX_PARAMETERS`` ``;`` before anything parses it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from relayd.mail.headers import MAX_PARAMETERS, check_parameter_counts
from relayd.mail.rewrite import MimeError
from tests.harness import Relayd, Sink, message


def _folded(value: bytes) -> bytes:
    """``value`` folded into continuation lines of 900 octets (each line stays under 998)."""
    return b"\r\n ".join(value[i : i + 900] for i in range(0, len(value), 900))


def _multipart(content_type: bytes, part_field: bytes = b"Content-Type: text/plain") -> bytes:
    return (
        b"From: App <app@acme.example.test>\r\nTo: bob@example.test\r\nSubject: params\r\n"
        b"MIME-Version: 1.0\r\n" + content_type + b"\r\n\r\n"
        b"--b\r\n" + part_field + b"\r\n\r\nHello.\r\n--b--\r\n"
    )


def test_a_field_with_up_to_the_limit_passes_and_one_more_is_refused() -> None:
    ok = b'Content-Type: multipart/mixed; boundary="b"' + b"; x=1" * (MAX_PARAMETERS - 1)
    check_parameter_counts(_multipart(_folded(ok)))
    with pytest.raises(MimeError, match="Content-Type field has more than"):
        check_parameter_counts(_multipart(_folded(ok + b"; y=2")))


def test_fields_in_parts_folded_lines_and_content_disposition_count_too() -> None:
    many = b'; x="' + b";" * 5000 + b'"'
    with pytest.raises(MimeError, match="Content-Type"):
        check_parameter_counts(
            _multipart(
                b'Content-Type: multipart/mixed; boundary="b"', b"Content-Type: text/plain" + _folded(many)
            )
        )
    with pytest.raises(MimeError, match="content-disposition field"):
        check_parameter_counts(
            _multipart(
                b'Content-Type: multipart/mixed; boundary="b"',
                b"Content-Type: text/plain\r\ncontent-disposition : attachment" + _folded(many),
            )
        )
    # the same characters in a body line are not a field
    check_parameter_counts(_multipart(b'Content-Type: multipart/mixed; boundary="b"') + b" x" + b";" * 5000)


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Relayd, Sink]]:
    with (
        Sink() as sink,
        Relayd(tmp_path_factory.mktemp("params"), routes={"example.test": sink.port}) as relayd,
    ):
        yield relayd, sink


def test_submission_refuses_a_parameter_bomb_with_554_and_keeps_serving(
    peers: tuple[Relayd, Sink], tmp_path: Path
) -> None:
    relayd, sink = peers
    bomb = _folded(b'Content-Type: multipart/mixed; boundary="b"; x="' + b";" * 64 * 1024 + b'"')
    # smtplib's timeout (30 s in the harness) is the hang detector; the old code parsed this for minutes
    code, text = relayd.submit(_multipart(bomb), to=["bob@example.test"])
    assert code == 554 and text.startswith(b"5.6.0"), (code, text)
    assert b"Content-Type field has more than" in text
    code, _ = relayd.submit(message("after the bomb"), to=["bob@example.test"])
    assert code == 250
    assert not any(b'boundary="b"; x=' in m.data for m in sink.messages)
