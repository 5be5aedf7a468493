"""Signing end to end: what a real ``relayd serve`` delivers verifies with independent verifiers.

Keys come from ``relayd dkim keygen`` at test time (one rsa and one ed25519 selector for acme.example.test:
dual signing, RFC 8463 §1); the public keys are taken from the zone lines it prints, so the verifiers get
exactly what an operator would publish. Every delivered copy, after relayd injected the unsubscribe
footer and imprint per recipient, must carry both signatures and each must pass:

- Perl Mail::DKIM is required (a missing install fails the test). The installed 1.20230212 has no
  ed25519-sha256, so it judges the rsa signature only (and ed25519 too where the installed version has it);
- dkimpy (with PyNaCl) and libopendkim (required as well) judge both signatures.

A tampered copy must fail with each verifier, so a verifier harness that passes everything is noticed.
"""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from email import message_from_bytes
from email.policy import compat32
from pathlib import Path

import dkim as dkimpy
import pytest

from tests.dkimverify import (
    MAIL_DKIM_ED25519,
    needs_mail_dkim,
    needs_opendkim,
    records_from_zone_lines,
    verify_dkimpy,
    verify_mail_dkim,
    verify_opendkim,
)
from tests.harness import PASSWORD_HASH, RELAYD, Received, Relayd, Sink, submit_each, wait_until

DOMAIN = "acme.example.test"
RSA, ED25519 = "rsa2026", "ed2026"
IMPRINT = "ACME Ltd, 1 Test Street"

HEAD = (
    "From: ACME News <news@acme.example.test>\r\n"
    "To: Subscriber <subscriber@example.test>\r\n"
    "Subject: {name}\r\n"
    "Date: Mon, 23 Nov 2026 12:00:00 +0000\r\n"
    "Message-ID: <{name}.dkim@acme.example.test>\r\n"
    "List-Id: <news.acme.example.test>\r\n"
    "X-Campaign-ID: dkim-e2e\r\n"
    "MIME-Version: 1.0\r\n"
)


def _head(name: str) -> bytes:
    return HEAD.format(name=name).encode()


def _b64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


MESSAGES: dict[str, bytes] = {
    "plain": _head("plain")
    + b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    + "Hello,\r\n\r\nnews of the month. Gr\u00fc\u00dfe!\r\n".encode(),
    "multipart_alternative": _head("multipart_alternative")
    + b'Content-Type: multipart/alternative; boundary="==b1=="\r\n\r\n'
    b"This is a multi-part message in MIME format.\r\n"
    b"--==b1==\r\n"
    b'Content-Type: text/plain; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n'
    b"Caf=C3=A9 news =E2=80=93 read it soon.  \r\n"
    b"--==b1==\r\n"
    b'Content-Type: text/html; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n'
    b"<html><body><p>Caf=C3=A9 news</p>\t\t<p>read it soon</p></body></html>\r\n"
    b"--==b1==--\r\n",
    "base64": _head("base64")
    + b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    + _b64(("A base64 body \u2713 with a line long enough to wrap. " * 4 + "\r\n").encode() * 6),
}


@dataclass(frozen=True)
class Setup:
    relayd: Relayd
    sink: Sink
    records: dict[str, str]
    workdir: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("dkim-e2e")
    keys, zone = tmp / "keys", []
    dkim_config = ""
    for selector, algorithm in ((RSA, "rsa"), (ED25519, "ed25519")):
        out = subprocess.run(
            [*RELAYD, "dkim", "keygen", "--domain", DOMAIN, "--selector", selector, "--algorithm", algorithm,
             "--out-dir", str(keys)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        zone.append(out.stdout)
        dkim_config += (
            f'\n[[dkim]]\ndomain = "{DOMAIN}"\nselector = "{selector}"\n'
            f'key_file = "{keys}/{DOMAIN}.{selector}.{algorithm}.pem"\nalgorithm = "{algorithm}"\n'
        )
    records = records_from_zone_lines("".join(zone).splitlines())
    assert set(records) == {f"{RSA}._domainkey.{DOMAIN}", f"{ED25519}._domainkey.{DOMAIN}"}
    accounts = f"""
[accounts.acme]
password_hash = "{PASSWORD_HASH}"
domains = ["acme.example.test"]
imprint = "{IMPRINT}"

[accounts.other]
password_hash = "{PASSWORD_HASH}"
domains = ["other.example.test"]
imprint = "{IMPRINT}"
signing_domain = "{DOMAIN}"
"""
    with (
        Sink() as sink,
        Relayd(tmp, routes={"example.test": sink.port}, extra=dkim_config, accounts=accounts) as r,
    ):
        workdir = tmp / "verify"
        workdir.mkdir()
        yield Setup(r, sink, records, workdir)


def deliver(setup: Setup, raw: bytes, to: list[str], *, user: str = "acme") -> list[Received]:
    sender = f"app@{user}.example.test"
    tx = submit_each(setup.relayd, raw, to=to, sender=sender, user=user)
    assert tx.data is not None and tx.data[0] == 250, tx
    sink = setup.sink
    assert wait_until(lambda: all(any(r in m.rcpt_tos for m in sink.messages) for r in to))
    return [next(m for m in sink.messages if r in m.rcpt_tos) for r in to]


def signatures(data: bytes) -> dict[str, dict[bytes, bytes]]:
    """The DKIM-Signature tags of each signature, by selector."""
    d = dkimpy.DKIM(data)
    sigs = [dkimpy.util.parse_tag_value(v) for n, v in d.headers if n.lower() == b"dkim-signature"]
    return {t[b"s"].decode(): t for t in sigs}


def tamper(data: bytes) -> bytes:
    """Change the first letter of the body."""
    head, sep, body = data.partition(b"\r\n\r\n")
    i = next(i for i, c in enumerate(body) if chr(c).isalpha())
    return head + sep + body[:i] + bytes([body[i] ^ 1]) + body[i + 1 :]


def check_copy(setup: Setup, data: bytes) -> None:
    """Both signatures present, d= the signing domain, List-Unsubscribe signed; every verifier passes."""
    sigs = signatures(data)
    assert sorted(sigs) == sorted([RSA, ED25519])
    assert sigs[RSA][b"a"] == b"rsa-sha256" and sigs[ED25519][b"a"] == b"ed25519-sha256"
    for tags in sigs.values():
        assert tags[b"d"] == DOMAIN.encode()
        signed = {h.strip().lower() for h in tags[b"h"].split(b":")}
        # RFC 8058 §4: the one-click fields must be covered by the signature
        assert {b"from", b"list-unsubscribe", b"list-unsubscribe-post"} <= signed, signed
    both = {RSA: "pass", ED25519: "pass"}
    assert verify_dkimpy(data, setup.records, DOMAIN) == both
    assert verify_opendkim(data, setup.records, DOMAIN, setup.workdir) == both
    mail_dkim = verify_mail_dkim(data, setup.records, DOMAIN, setup.workdir)
    assert mail_dkim[RSA] == "pass", mail_dkim
    if MAIL_DKIM_ED25519:  # not in the installed Mail::DKIM 1.20230212; dkimpy and libopendkim judge it above
        assert mail_dkim[ED25519] == "pass", mail_dkim


def footer_texts(data: bytes) -> list[str]:
    """Decoded text parts of a delivered copy."""
    out = []
    for part in message_from_bytes(data, policy=compat32).walk():
        if part.get_content_maintype() == "text":
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            out.append(payload.decode(part.get_content_charset() or "us-ascii"))
    return out


# --- tests ------------------------------------------------------------------------------------------------


@needs_mail_dkim
@needs_opendkim
@pytest.mark.parametrize("name", list(MESSAGES))
def test_delivered_copies_pass_rsa_and_ed25519_with_three_verifiers(setup: Setup, name: str) -> None:
    to = [f"dkim-{name}-{i}@example.test" for i in range(2)]
    copies = deliver(setup, MESSAGES[name], to)
    for copy in copies:
        # the footer and imprint were injected before signing: the signature covers what is delivered
        texts = footer_texts(copy.data)
        assert texts and all(t.count(IMPRINT) == 1 and t.count("/u/") == 1 for t in texts), texts
        check_copy(setup, copy.data)
    # per-recipient content, per-recipient signature
    assert copies[0].data.split(b"\r\n\r\n", 1)[1] != copies[1].data.split(b"\r\n\r\n", 1)[1]


@needs_mail_dkim
@needs_opendkim
def test_tampered_copy_fails_every_verifier(setup: Setup) -> None:
    [copy] = deliver(setup, MESSAGES["plain"], ["dkim-tamper@example.test"])
    check_copy(setup, copy.data)
    bad = tamper(copy.data)
    assert verify_dkimpy(bad, setup.records, DOMAIN) == {RSA: "fail", ED25519: "fail"}
    opendkim = verify_opendkim(bad, setup.records, DOMAIN, setup.workdir)
    assert opendkim[RSA].startswith("fail") and opendkim[ED25519].startswith("fail"), opendkim
    assert verify_mail_dkim(bad, setup.records, DOMAIN, setup.workdir)[RSA].startswith("fail")


@needs_mail_dkim
@needs_opendkim
def test_account_signing_domain_signs_a_from_domain_without_key(setup: Setup) -> None:
    raw = MESSAGES["plain"].replace(b"news@acme.example.test", b"news@other.example.test")
    [copy] = deliver(setup, raw, ["dkim-signing-domain@example.test"], user="other")
    check_copy(setup, copy.data)  # d=acme.example.test, the account's signing_domain
