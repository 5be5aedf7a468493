"""Tokens: the hand-rolled HMAC-SHA256 and base32 used for speed give exactly the stdlib's results."""

from __future__ import annotations

import base64
import hmac
import random

from relayd.core import tokens


def test_b32_matches_the_stdlib_for_every_length() -> None:
    rng = random.Random(1)
    for length in range(0, 41):
        for _ in range(50):
            data = rng.randbytes(length)
            assert tokens._b32(data) == base64.b32encode(data).decode().rstrip("=").lower()


def test_hmac_matches_the_stdlib_for_short_and_long_keys() -> None:
    rng = random.Random(2)
    for key_len in (1, 16, 32, 63, 64, 65, 128):
        key = rng.randbytes(key_len)
        for msg_len in (0, 1, 55, 56, 64, 200):
            msg = rng.randbytes(msg_len)
            assert tokens._hmac_sha256(key, msg) == hmac.digest(key, msg, "sha256")


def test_a_token_verifies_for_its_address_only() -> None:
    secret = b"k" * 32
    token = tokens.make_token(secret, "unsub", "agrasmy74a7h54gd", 3, "Someone@Example.com")
    assert tokens.verify_token(secret, "unsub", token, "someone@example.com") == tokens.TokenRef(
        "agrasmy74a7h54gd", 3
    )
    assert tokens.verify_token(secret, "unsub", token, "other@example.com") is None
    assert tokens.verify_token(secret, "verp", token, "someone@example.com") is None
