"""relayd.mail.dkim: signatures checked by three verifiers that share no code with ours.

- dkimpy (Python; also the reference for canonicalization and body hashes),
- Perl Mail::DKIM (Debian libmail-dkim-perl; the installed 1.20230212 has rsa-sha256 only, so ed25519 is
  checked there only when the installed Mail::DKIM has the algorithm),
- libopendkim (C, Debian libopendkim11), driven through ctypes in a child process with its test-only
  "file" key query method. ``opendkim-testmsg`` cannot be used: it verifies only against live DNS.

Each verifier runs without network: the public keys come from keys generated at test time with
:func:`relayd.mail.dkim.keygen`. Every check also runs on a tampered copy, so a verifier harness that passes
everything cannot go unnoticed.
"""

from __future__ import annotations

import base64
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.canonicalization import Relaxed
from hypothesis import given
from hypothesis import strategies as st

from relayd.mail.dkim import (
    BodyHash,
    DkimKey,
    DkimKeyError,
    Signer,
    _select_headers,
    body_hash,
    canonicalize_body,
    canonicalize_header,
    keygen,
    load_key,
    split_message,
)
from tests import dkimverify
from tests.dkimverify import (
    HAVE_MAIL_DKIM,
    LIBOPENDKIM,
    MAIL_DKIM_ED25519,
    Results,
    needs_mail_dkim,
    needs_opendkim,
)

DOMAIN = "example.test"

# --- keys ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    rsa: DkimKey
    ed25519: DkimKey
    rsa_path: Path
    ed25519_path: Path
    records: dict[str, str]  # "<sel>._domainkey.<domain>" -> TXT text
    records_file: Path  # one "name<TAB>txt" line per key


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    out = tmp_path_factory.mktemp("dkim-keys")
    rsa_path, _ = keygen(DOMAIN, "r2024", "rsa", out)
    ed_path, _ = keygen(DOMAIN, "e2024", "ed25519", out)
    rsa_key = load_key(DOMAIN, "r2024", rsa_path, "rsa")
    ed_key = load_key(DOMAIN, "e2024", ed_path, "ed25519")
    records = {k.dns_name: k.dns_txt() for k in (rsa_key, ed_key)}
    records_file = out / "records.tsv"
    records_file.write_text("".join(f"{name}\t{txt}\n" for name, txt in records.items()))
    return Keys(rsa_key, ed_key, rsa_path, ed_path, records, records_file)


@pytest.fixture(scope="module")
def signer(keys: Keys) -> Signer:
    return Signer([keys.rsa, keys.ed25519])


# --- messages --------------------------------------------------------------------------------------------

_COMMON = (
    b"From: Acme News <news@example.test>\r\n"
    b"To: Bob <bob@example.org>\r\n"
    b"Subject: Our October newsletter\r\n"
    b"Date: Tue, 01 Oct 2024 09:00:00 +0000\r\n"
    b"Message-ID: <20241001090000.1@example.test>\r\n"
    b"List-Id: <news.acme.example.test>\r\n"
    b"List-Unsubscribe: <https://relay.example.test/u/tok123>, <mailto:unsub+tok123@bounces.example.test>\r\n"
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    b"Feedback-ID: oct24:news:acme:relayd\r\n"
    b"X-Relayd-ID: r1.abcdef0123456789\r\n"
)

_B64_PAYLOAD = base64.encodebytes(bytes(range(256)) * 8).replace(b"\n", b"\r\n")

MESSAGES: dict[str, bytes] = {
    "plain": _COMMON
    + b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n"
    b"\r\nHello Bob,\r\n\r\nnews of the month.\r\n\r\n-- \r\nAcme, 1 Road, Town\r\n",
    "multipart_alternative": _COMMON + b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/alternative; boundary="==b1=="\r\n'
    b"\r\n"
    b"This is a multi-part message in MIME format.\r\n"
    b"--==b1==\r\n"
    b'Content-Type: text/plain; charset="utf-8"\r\n'
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"Caf=C3=A9 news =E2=80=93 read it soon.  \r\n"
    b"Unsubscribe: https://relay.example.test/u/tok123\r\n"
    b"--==b1==\r\n"
    b'Content-Type: text/html; charset="utf-8"\r\n'
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b'<html><body><p>Caf=C3=A9 news</p>\t\t<p><a href=3D"https://relay.example.test/u/tok=\r\n'
    b'123">Unsubscribe</a></p></body></html>\r\n'
    b"--==b1==--\r\n"
    b"\r\n",
    "base64_body": _COMMON
    + b"MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
    b"\r\n" + _B64_PAYLOAD,
    "odd_whitespace_folded_headers": b"From:Acme\t News   <news@example.test>  \r\n"
    b"To:\r\n\tbob@example.org,\r\n   carol@example.org\r\n"
    b"Subject:   a  subject\r\n\t  folded\t\tover\r\n three lines   \r\n"
    b"DATE: Tue, 01 Oct 2024 09:00:00 +0000\r\n"
    b"message-id:<x.1@example.test>\r\n"
    b"Content-Type: text/plain;\r\n\tcharset=us-ascii\r\n"
    b"\r\n"
    b"  leading spaces   and\ttabs\t \r\n"
    b"trailing whitespace line \t \r\n"
    b" \t \r\n"
    b"\r\n"
    b"\r\n",
    "empty_body": _COMMON + b"\r\n",
    "headers_only": _COMMON,
    "body_without_final_crlf": _COMMON + b"\r\nfirst line\r\nlast line, no CRLF",
    "body_ends_in_whitespace_without_crlf": _COMMON + b"\r\nfirst line\r\nlast line  \t",
    "long_lines": _COMMON.replace(
        b"To: Bob <bob@example.org>\r\n",
        b"To: " + b",\r\n ".join(b"user%d@example.org" % i for i in range(60)) + b"\r\n",
    )
    + b"\r\n"
    + b"x" * 5000
    + b"\r\n"
    + b"word " * 800
    + b"\r\n",
    "duplicate_headers": b"Received: from a by b; Tue, 01 Oct 2024 09:00:00 +0000\r\n"
    b"Received: from c by d; Tue, 01 Oct 2024 09:00:01 +0000\r\n"
    + _COMMON
    + b"Cc: one@example.org\r\nCc: two@example.org\r\nReply-To: reply@example.test\r\n"
    b"\r\nbody\r\n",
    "existing_dkim_signature": b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=app.example;\r\n"
    b"\ts=app; h=from; bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=; b=AAAA\r\n"
    + _COMMON
    + b"\r\nsigned by the app too\r\n",
    "utf8_headers_8bit_body": _COMMON.replace(
        b"Subject: Our October newsletter", "Subject: Café \u2013 Neuigkeiten für Sie".encode()
    )
    + b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
    + "\r\nGrüße aus Köln\r\n".encode(),
    "dot_lines": _COMMON + b"\r\n.\r\n..leading dots\r\n.\r\n",
}


def delivered(message: bytes) -> bytes:
    """What the receiving MTA sees: CRLF everywhere and a final CRLF (RFC 5321 §4.1.1.4)."""
    message = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    return message if message.endswith(b"\r\n") else message + b"\r\n"


def tamper(message: bytes) -> bytes:
    """Change one body byte (or a signed header byte if the body is empty)."""
    head, body = split_message(message)
    if body.strip():
        i = next(i for i, c in enumerate(body) if c not in b" \t\r\n")
        changed = body[:i] + bytes([body[i] ^ 1]) + body[i + 1 :]
        return head + b"\r\n" + changed
    return message.replace(b"news@example.test", b"newz@example.test", 1)


# --- verifiers -------------------------------------------------------------------------------------------

# The verifiers live in tests/dkimverify.py, shared with the end-to-end tests (tests/test_dkim_e2e.py).


def verify_dkimpy(message: bytes, keys: Keys) -> Results:
    return dkimverify.verify_dkimpy(message, keys.records, DOMAIN)


def verify_mail_dkim(message: bytes, keys: Keys, tmp_path: Path) -> Results:
    return dkimverify.verify_mail_dkim(message, keys.records, DOMAIN, tmp_path)


def verify_opendkim(message: bytes, keys: Keys, tmp_path: Path) -> Results:
    return dkimverify.verify_opendkim(message, keys.records, DOMAIN, tmp_path)


def _sign(signer: Signer, message: bytes) -> bytes:
    return signer.sign(message, DOMAIN) + message


# --- verification across implementations -----------------------------------------------------------------


@pytest.mark.parametrize("name", list(MESSAGES))
def test_dkimpy_verifies_both_signatures(name: str, keys: Keys, signer: Signer) -> None:
    import nacl  # noqa: F401  # dkimpy needs PyNaCl for ed25519

    signed = delivered(_sign(signer, MESSAGES[name]))
    assert verify_dkimpy(signed, keys) == {"r2024": "pass", "e2024": "pass"}
    assert verify_dkimpy(tamper(signed), keys) == {"r2024": "fail", "e2024": "fail"}


@needs_mail_dkim
@pytest.mark.parametrize("name", list(MESSAGES))
def test_mail_dkim_verifies(name: str, keys: Keys, signer: Signer, tmp_path: Path) -> None:
    signed = delivered(_sign(signer, MESSAGES[name]))
    results = verify_mail_dkim(signed, keys, tmp_path)
    assert results["r2024"] == "pass"
    if MAIL_DKIM_ED25519:
        assert results["e2024"] == "pass"
    tampered = verify_mail_dkim(tamper(signed), keys, tmp_path)
    assert tampered["r2024"].startswith("fail")


@needs_opendkim
@pytest.mark.parametrize("name", list(MESSAGES))
def test_opendkim_verifies_both_signatures(name: str, keys: Keys, signer: Signer, tmp_path: Path) -> None:
    signed = delivered(_sign(signer, MESSAGES[name]))
    assert verify_opendkim(signed, keys, tmp_path) == {"r2024": "pass", "e2024": "pass"}
    tampered = verify_opendkim(tamper(signed), keys, tmp_path)
    assert tampered["r2024"].startswith("fail") and tampered["e2024"].startswith("fail")


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda m: m.replace(b"Subject: Our", b"Subject: Your", 1), id="signed_header_changed"),
        pytest.param(lambda m: b"From: evil@example.net\r\n" + m, id="second_from_added_on_top"),
        pytest.param(
            lambda m: m.replace(b"\r\n\r\n", b"\r\nList-Unsubscribe: <https://evil.example>\r\n\r\n", 1),
            id="list_unsubscribe_added_below",
        ),
        pytest.param(lambda m: m.replace(b"\r\n\r\n", b"\r\nX-Other: added\r\n\r\n", 1), id="unsigned_added"),
        pytest.param(lambda m: m + b"\r\n\r\n", id="empty_lines_appended"),
    ],
)
def test_header_changes(change: Callable[[bytes], bytes], keys: Keys, signer: Signer, tmp_path: Path) -> None:
    """Oversigning (RFC 6376 §5.4.2) makes added signed fields break the signature; unsigned fields and
    trailing empty lines (relaxed canonicalization, §3.4.4) do not."""
    import nacl  # noqa: F401  # dkimpy needs PyNaCl for ed25519

    signed = _sign(signer, MESSAGES["plain"])
    changed = change(signed)
    expect_pass = b"X-Other" in changed or changed.endswith(b"\r\n\r\n\r\n")
    want = "pass" if expect_pass else "fail"
    assert verify_dkimpy(changed, keys) == {"r2024": want, "e2024": want}
    if LIBOPENDKIM is not None:
        results = verify_opendkim(changed, keys, tmp_path)
        assert {k: v.split(":")[0] for k, v in results.items()} == {"r2024": want, "e2024": want}


def test_bare_lf_message_is_signed_as_delivered(keys: Keys, signer: Signer, tmp_path: Path) -> None:
    """A message with bare LF is signed in the CRLF form that an SMTP client sends (RFC 5321 §2.3.8)."""
    import nacl  # noqa: F401  # dkimpy needs PyNaCl for ed25519

    lf = MESSAGES["odd_whitespace_folded_headers"].replace(b"\r\n", b"\n")
    signed = delivered(signer.sign(lf, DOMAIN) + lf)
    assert verify_dkimpy(signed, keys) == {"r2024": "pass", "e2024": "pass"}
    if HAVE_MAIL_DKIM:
        assert verify_mail_dkim(signed, keys, tmp_path)["r2024"] == "pass"


def test_space_before_colon(keys: Keys, signer: Signer, tmp_path: Path) -> None:
    """``Subject : x`` (RFC 5322 §4.5.3 obs-optional): relaxed canonicalization drops the WSP before the
    colon (RFC 6376 §3.4.2) and the field is signed as ``subject``. dkimpy refuses to parse such a header,
    so Mail::DKIM and libopendkim judge."""
    message = MESSAGES["plain"].replace(b"Subject: Our", b"Subject : Our", 1)
    signed = _sign(signer, message)
    assert b"subject:subject" in signed.replace(b"\r\n\t", b"")
    if HAVE_MAIL_DKIM:
        assert verify_mail_dkim(signed, keys, tmp_path)["r2024"] == "pass"
    if LIBOPENDKIM is not None:
        assert verify_opendkim(signed, keys, tmp_path) == {"r2024": "pass", "e2024": "pass"}


# --- body hash once, many header sections ----------------------------------------------------------------


def test_body_hash_once_for_many_recipients(keys: Keys, signer: Signer, tmp_path: Path) -> None:
    import nacl  # noqa: F401  # dkimpy needs PyNaCl for ed25519

    head, body = split_message(MESSAGES["multipart_alternative"])
    bh = signer.body_hash(body)
    assert bh == body_hash(body)
    for n in range(3):
        rcpt_head = head.replace(b"bob@example.org", b"rcpt%d@example.org" % n).replace(
            b"tok123", b"tok%d" % n
        )
        sig = signer.sign_with_body_hash(rcpt_head, bh, DOMAIN)
        message = sig + rcpt_head + b"\r\n" + body
        assert sig == signer.sign(rcpt_head + b"\r\n" + body, DOMAIN, timestamp=_t(sig))
        assert verify_dkimpy(message, keys) == {"r2024": "pass", "e2024": "pass"}
        if HAVE_MAIL_DKIM:
            assert verify_mail_dkim(message, keys, tmp_path)["r2024"] == "pass"


def _t(signature_fields: bytes) -> int:
    tags = dkimpy.util.parse_tag_value(signature_fields.split(b":", 1)[1].split(b"DKIM-Signature:")[0])
    return int(tags[b"t"])


# --- agreement with dkimpy's canonicalization and body hash -----------------------------------------------


@pytest.mark.parametrize("name", list(MESSAGES))
def test_body_hash_matches_dkimpy(name: str, keys: Keys) -> None:
    message = delivered(MESSAGES[name])
    der = keys.rsa.private_key.private_bytes(  # dkimpy wants PKCS#1 for rsa
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    theirs = dkimpy.sign(message, b"r2024", DOMAIN.encode(), der, canonicalize=(b"relaxed", b"relaxed"))
    their_bh = dkimpy.util.parse_tag_value(theirs.split(b":", 1)[1])[b"bh"]
    assert body_hash(split_message(message)[1]).b64 == their_bh


_body_bytes = st.lists(
    st.sampled_from([b"a", b"b", b" ", b"\t", b"  \t ", b"\r\n", b"\r\n\r\n", b" \r\n", b"."]), max_size=40
).map(b"".join)


@given(_body_bytes)
def test_canonicalize_body_matches_dkimpy(body: bytes) -> None:
    # Compared on the delivered form: SMTP ends every message with CRLF (see body_ends_in_whitespace).
    on_wire = body if not body or body.endswith(b"\r\n") else body + b"\r\n"
    assert canonicalize_body(body) == Relaxed.canonicalize_body(on_wire)


@given(
    st.sampled_from([b"Subject", b"SUBJECT", b"x-Relayd-ID", b"Subject \t"]),
    st.lists(st.sampled_from([b"a", b"b", b" ", b"\t", b"\r\n ", b"\r\n\t", b":"]), max_size=30).map(
        b"".join
    ),
)
def test_canonicalize_header_matches_dkimpy(name: bytes, value: bytes) -> None:
    [(their_name, their_value)] = Relaxed.canonicalize_headers([(name, value)])
    assert canonicalize_header(name + b":" + value) == their_name + b":" + their_value


def test_canonicalize_body_edge_cases() -> None:
    assert canonicalize_body(b"") == b""
    assert canonicalize_body(b"\r\n\r\n") == b""
    assert canonicalize_body(b" \t\r\n") == b""
    assert canonicalize_body(b"a  b\t\tc \r\n\r\n") == b"a b c\r\n"
    assert canonicalize_body(b"a\r\n \t") == b"a\r\n"
    assert canonicalize_body(b"a") == b"a\r\n"
    # RFC 6376 §3.4.6 example, body part
    assert canonicalize_body(b" C \r\nD \t E\r\n\r\n\r\n") == b" C\r\nD E\r\n"
    assert body_hash(b"").b64 == b"47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="


def test_canonicalize_header_rfc_example() -> None:
    # RFC 6376 §3.4.6 example, header part
    assert canonicalize_header(b"A: X") == b"a:X\r\n"
    assert canonicalize_header(b"B : Y\t\r\n\tZ  ") == b"b:Y Z\r\n"


# --- signature field shape -------------------------------------------------------------------------------


def test_signature_field_shape(keys: Keys, signer: Signer) -> None:
    sig = signer.sign(MESSAGES["duplicate_headers"], DOMAIN, timestamp=1_700_000_000)
    fields = [b"DKIM-Signature:" + f for f in sig.split(b"DKIM-Signature:")[1:]]
    assert len(fields) == 2
    for field_ in fields:
        assert field_.endswith(b"\r\n")
        lines = field_[:-2].split(b"\r\n")
        assert all(len(line) <= 78 for line in lines)
        assert all(line.startswith(b"\t") for line in lines[1:])
        tags = dkimpy.util.parse_tag_value(field_.split(b":", 1)[1])
        assert tags[b"c"] == b"relaxed/relaxed"
        assert tags[b"d"] == b"example.test"
        assert tags[b"t"] == b"1700000000"
        assert b"l" not in tags
        h = [n.strip() for n in tags[b"h"].split(b":")]
        assert b"dkim-signature" not in h and b"received" not in h
        assert h[:2] == [b"from", b"from"]
        assert h.count(b"cc") == 3  # two instances, oversigned once
    assert fields[0].split(b"a=", 1)[1].startswith(b"rsa-sha256;")
    assert fields[1].split(b"a=", 1)[1].startswith(b"ed25519-sha256;")


def test_layouts_give_the_signature_folded_afresh(keys: Keys, signer: Signer) -> None:
    """The folded header kept per name list (``_Layout``) is the header folded for each copy on its own:
    a timestamp of another width, which takes the fold-afresh path, gives the same shape, and the fast
    path's fields verify with dkimpy for every copy of a message whose per-recipient fields differ."""
    message = MESSAGES["duplicate_headers"]
    for n in range(3):  # several copies through one cached layout
        copy = message.replace(b"\r\n\r\n", f"\r\nList-Unsubscribe: <https://u.test/{n}>\r\n\r\n".encode(), 1)
        signed = signer.sign(copy, DOMAIN, timestamp=1_700_000_000 + n) + copy
        assert set(verify_dkimpy(signed, keys).values()) == {"pass"}, n
    key = signer._keys_for(DOMAIN)[0]
    assert key.layouts, "the name list's layout is kept"
    names, canonical = _select_headers(split_message(message)[0])
    bh = body_hash(split_message(message)[1])
    fast = key.signature_field(names, canonical, bh, 1_700_000_000)
    key.layouts.clear()
    afresh = key._header(names, b"1700000000", bh.b64)
    assert fast.startswith(afresh) and b"\x00" not in fast and b"\x01" not in fast


def test_existing_signature_is_kept_and_not_signed(signer: Signer) -> None:
    message = MESSAGES["existing_dkim_signature"]
    sig = signer.sign(message, DOMAIN)
    for field_ in sig.split(b"DKIM-Signature:")[1:]:
        h = dkimpy.util.parse_tag_value(field_)[b"h"]
        assert b"dkim-signature" not in h.lower()
    signed = sig + message
    assert signed.count(b"DKIM-Signature:") == 3
    assert signed.endswith(message)


def test_no_key_for_domain(signer: Signer) -> None:
    assert signer.sign(MESSAGES["plain"], "other.test") == b""
    assert signer.sign_with_body_hash(b"From: a@other.test\r\n", body_hash(b""), "other.test") == b""
    assert signer.domains() == {DOMAIN}


def test_domain_match_is_case_insensitive(signer: Signer) -> None:
    assert signer.sign(MESSAGES["plain"], "Example.TEST.", timestamp=1) == signer.sign(
        MESSAGES["plain"], DOMAIN, timestamp=1
    )


def test_rsa_signatures_are_deterministic(keys: Keys) -> None:
    only_rsa = Signer([keys.rsa])
    one = only_rsa.sign(MESSAGES["plain"], DOMAIN, timestamp=5)
    assert one == only_rsa.sign(MESSAGES["plain"], DOMAIN, timestamp=5)
    assert one.count(b"DKIM-Signature:") == 1


def test_default_timestamp_is_now(signer: Signer) -> None:
    before = int(time.time())
    t = _t(signer.sign(MESSAGES["plain"], DOMAIN))
    assert before <= t <= int(time.time())


def test_duplicate_selector_is_refused(keys: Keys) -> None:
    with pytest.raises(DkimKeyError, match="same selector"):
        Signer([keys.rsa, keys.rsa])


def test_split_message() -> None:
    assert split_message(b"A: 1\r\nB: 2\r\n\r\nbody\r\n") == (b"A: 1\r\nB: 2\r\n", b"body\r\n")
    assert split_message(b"A: 1\r\n") == (b"A: 1\r\n", b"")
    assert split_message(b"A: 1") == (b"A: 1\r\n", b"")
    assert split_message(b"\r\nbody") == (b"", b"body")
    assert split_message(b"A: 1\r\n\r\n") == (b"A: 1\r\n", b"")


# --- keys ------------------------------------------------------------------------------------------------


def test_keygen_writes_private_file_and_record(tmp_path: Path) -> None:
    path, record = keygen("Example.Test", "sel", "ed25519", tmp_path / "keys")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert record.startswith('sel._domainkey.example.test. IN TXT "v=DKIM1; k=ed25519; p=')
    p = record.split("p=", 1)[1].rstrip('"')
    assert len(base64.b64decode(p)) == 32  # RFC 8463 §4.2: the raw public key
    key = load_key("example.test", "sel", path, "ed25519")
    assert p == key.public_key_b64()


def test_keygen_rsa_record_is_split_into_dns_strings(keys: Keys) -> None:
    line = keys.rsa.zone_line()
    strings = line.split(" IN TXT ", 1)[1]
    parts = [s.strip('"') for s in strings.split('" "')]
    assert len(parts) > 1 and all(len(s) <= 255 for s in parts)
    assert "".join(parts) == keys.rsa.dns_txt()
    assert isinstance(keys.rsa.private_key, rsa.RSAPrivateKey)
    assert keys.rsa.private_key.key_size == 2048


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    path, _ = keygen(DOMAIN, "sel", "ed25519", tmp_path)
    before = path.read_bytes()
    with pytest.raises(DkimKeyError, match="already exists"):
        keygen(DOMAIN, "sel", "ed25519", tmp_path)
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("domain", "selector", "algorithm", "match"),
    [
        (DOMAIN, "sel", "dsa", "algorithm 'dsa'"),
        (DOMAIN, "bad selector", "rsa", "not a valid selector"),
        ("exa mple.test", "sel", "rsa", "not a valid domain"),
    ],
)
def test_keygen_rejects_bad_input(
    domain: str, selector: str, algorithm: str, match: str, tmp_path: Path
) -> None:
    with pytest.raises(DkimKeyError, match=match):
        keygen(domain, selector, algorithm, tmp_path)


def test_load_key_errors(keys: Keys, tmp_path: Path) -> None:
    with pytest.raises(DkimKeyError, match="cannot read"):
        load_key(DOMAIN, "sel", tmp_path / "missing.pem", "rsa")
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not a key\n")
    with pytest.raises(DkimKeyError, match="not a PEM private key"):
        load_key(DOMAIN, "sel", garbage, "rsa")
    with pytest.raises(DkimKeyError, match="algorithm is rsa but the file holds an ed25519 key"):
        load_key(DOMAIN, "sel", keys.ed25519_path, "rsa")
    with pytest.raises(DkimKeyError, match="algorithm is ed25519 but the file holds an rsa key"):
        load_key(DOMAIN, "sel", keys.rsa_path, "ed25519")
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(DkimKeyError, match="encrypted"):
        load_key(DOMAIN, "sel", encrypted, "ed25519")
    assert issubclass(DkimKeyError, ValueError)


def test_load_key_accepts_pkcs1_rsa(keys: Keys, tmp_path: Path) -> None:
    pkcs1 = tmp_path / "pkcs1.pem"
    pkcs1.write_bytes(
        keys.rsa.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    os.chmod(pkcs1, 0o600)
    key = load_key(DOMAIN, "r2024", pkcs1, "rsa")
    assert key.public_key_b64() == keys.rsa.public_key_b64()


def test_load_key_rejects_short_rsa(tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    assert openssl is not None, "the openssl CLI is needed (.ci/run installs it)"
    short = tmp_path / "short.pem"
    subprocess.run([openssl, "genrsa", "-out", str(short), "512"], check=True, capture_output=True)
    with pytest.raises(DkimKeyError, match="512 bits"):
        load_key(DOMAIN, "sel", short, "rsa")


def test_body_hash_value_type() -> None:
    bh = body_hash(b"hello\r\n")
    assert isinstance(bh, BodyHash) and len(bh.digest) == 32
