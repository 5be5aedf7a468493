"""Signatures per second for relayd.mail.dkim and, for the record, dkimpy, on a 5 KB message.

    .venv/bin/python bench/dkim_sign.py [--seconds 2]

Rows: each algorithm signing whole messages with relayd's Signer; the same with the body hashed once and
only the (per-recipient) header section signed; dual signing (rsa + ed25519, what a domain with both keys
gets); and dkimpy's ``dkim.sign`` with the same keys. One process, one core; keys are generated fresh in a
temporary directory.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import dkim as dkimpy
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from relayd.mail.dkim import DkimKey, Signer, body_hash, keygen, load_key, split_message

DOMAIN = "example.test"


def message_5k() -> bytes:
    headers = (
        b"From: Acme News <news@example.test>\r\n"
        b"To: Bob <bob@example.org>\r\n"
        b"Subject: Our October newsletter\r\n"
        b"Date: Tue, 01 Oct 2024 09:00:00 +0000\r\n"
        b"Message-ID: <20241001090000.1@example.test>\r\n"
        b"List-Id: <news.acme.example.test>\r\n"
        b"List-Unsubscribe: <https://relay.example.test/u/tok123>,\r\n"
        b" <mailto:unsub+tok123@bounces.example.test>\r\n"
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        b"Feedback-ID: oct24:news:acme:relayd\r\n"
        b"X-Relayd-ID: r1.abcdef0123456789\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n"
        b"\r\n"
    )
    line = b"Lorem ipsum dolor sit amet, consectetur  adipiscing elit, sed do eiusmod tempor.\r\n"
    body = line * ((5120 - len(headers)) // len(line) + 1)
    return headers + body


def rate(fn: Callable[[], object], seconds: float) -> float:
    fn()  # warm up
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(10):
            fn()
        n += 10
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - start)


def dkimpy_private(key: DkimKey) -> bytes:
    """dkimpy takes PKCS#1 PEM for rsa and the base64 raw 32-byte seed for ed25519."""
    private = key.private_key
    if isinstance(private, ed25519.Ed25519PrivateKey):
        import base64

        raw = private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return base64.b64encode(raw)
    return private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="time per row (default 2)")
    args = parser.parse_args()

    message = message_5k()
    header_section, body = split_message(message)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        rsa_key = load_key(DOMAIN, "r", keygen(DOMAIN, "r", "rsa", out)[0], "rsa")
        ed_key = load_key(DOMAIN, "e", keygen(DOMAIN, "e", "ed25519", out)[0], "ed25519")

    rows: list[tuple[str, Callable[[], object]]] = []
    bh = body_hash(body)
    for label, key in (("rsa-2048", rsa_key), ("ed25519", ed_key)):
        signer = Signer([key])

        def whole(signer: Signer = signer) -> bytes:
            return signer.sign(message, DOMAIN)

        def headers_only(signer: Signer = signer) -> bytes:
            return signer.sign_with_body_hash(header_section, bh, DOMAIN)

        rows.append((f"relayd {label}: sign(message)", whole))
        rows.append((f"relayd {label}: sign_with_body_hash(headers)", headers_only))
    dual = Signer([rsa_key, ed_key])
    rows.append(("relayd rsa+ed25519 dual: sign(message)", lambda: dual.sign(message, DOMAIN)))
    rows.append(("relayd body_hash(5 KB body) alone", lambda: body_hash(body)))

    for label, key, alg in (("rsa-2048", rsa_key, b"rsa-sha256"), ("ed25519", ed_key, b"ed25519-sha256")):
        private = dkimpy_private(key)
        selector = key.selector.encode()

        def sign_dkimpy(private: bytes = private, selector: bytes = selector, alg: bytes = alg) -> bytes:
            signature: bytes = dkimpy.sign(
                message,
                selector,
                DOMAIN.encode(),
                private,
                canonicalize=(b"relaxed", b"relaxed"),
                signature_algorithm=alg,
            )
            return signature

        try:
            sign_dkimpy()
        except Exception as exc:  # ed25519 in dkimpy needs PyNaCl
            print(f"{'dkimpy ' + label + ': dkim.sign(message)':<48} skipped ({type(exc).__name__}: {exc})")
            continue
        rows.append((f"dkimpy {label}: dkim.sign(message)", sign_dkimpy))

    print(f"message: {len(message)} bytes ({len(body)} bytes body); {args.seconds:g} s per row")
    for label, fn in rows:
        print(f"{label:<48} {rate(fn, args.seconds):>10,.0f} /s")


if __name__ == "__main__":
    main()
