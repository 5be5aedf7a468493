"""relayd.core.address.normalize: canonical forms, rejections, and the never-raise/idempotence properties."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relayd.core.address import IDNA_IMPLEMENTATION, AddressError, normalize


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("alice@example.test", "alice@example.test", id="plain"),
        pytest.param("Alice@Example.TEST", "alice@example.test", id="whole-address-lowercased"),
        pytest.param("  <Bob@Example.test>  ", "bob@example.test", id="brackets-and-space"),
        pytest.param("< bob@example.test >", "bob@example.test", id="space-inside-brackets"),
        pytest.param('"John Doe"@example.test', '"john doe"@example.test', id="quoted-kept"),
        pytest.param('"john"@example.test', "john@example.test", id="quoted-dot-atom-unquoted"),
        pytest.param('"a@b"@example.test', '"a@b"@example.test', id="quoted-at-sign"),
        pytest.param('"a\\"b"@example.test', '"a\\"b"@example.test', id="quoted-escaped-quote"),
        pytest.param('"a\\b"@example.test', "ab@example.test", id="needless-quoted-pair"),
        pytest.param('"a..b"@example.test', '"a..b"@example.test', id="quoted-double-dot"),
        pytest.param("a+news@example.test", "a+news@example.test", id="plus-tag-kept"),
        pytest.param("user@Bücher.example", "user@xn--bcher-kva.example", id="idn-to-alabel"),
        pytest.param("user@XN--BCHER-KVA.example", "user@xn--bcher-kva.example", id="alabel-lowercased"),
        pytest.param("Ünïcode@example.test", "ünïcode@example.test", id="smtputf8-local"),
        pytest.param("u@[192.0.2.1]", "u@[192.0.2.1]", id="ipv4-literal"),
        pytest.param("u@[IPv6:2001:DB8:0:0::1]", "u@[ipv6:2001:db8::1]", id="ipv6-literal"),
        pytest.param("o'brien@example.test", "o'brien@example.test", id="apostrophe"),
        pytest.param("user@localhost", "user@localhost", id="single-label-domain"),
    ],
)
def test_canonical_forms(raw: str, expected: str) -> None:
    assert normalize(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("a+news@example.test", "a@example.test", id="stripped"),
        pytest.param("A+B+C@example.test", "a@example.test", id="first-plus"),
        pytest.param("+all@example.test", "+all@example.test", id="nothing-left-kept"),
        pytest.param("a.+x@example.test", "a.+x@example.test", id="would-leave-trailing-dot"),
        pytest.param('"a b+x"@example.test', '"a b+x"@example.test', id="quoted-not-stripped"),
    ],
)
def test_strip_plus_tags(raw: str, expected: str) -> None:
    assert normalize(raw, strip_plus_tags=True) == expected


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("", id="empty"),
        pytest.param("<>", id="null-path"),
        pytest.param("alice", id="no-at"),
        pytest.param("@example.test", id="empty-local"),
        pytest.param("alice@", id="empty-domain"),
        pytest.param("a..b@example.test", id="double-dot"),
        pytest.param(".a@example.test", id="leading-dot"),
        pytest.param("a b@example.test", id="unquoted-space"),
        pytest.param("a@b@example.test", id="two-ats"),
        pytest.param("a@example.test.", id="trailing-dot-domain"),
        pytest.param("a@exa mple.test", id="space-in-domain"),
        pytest.param("a@ex_ample.test", id="underscore-domain"),
        pytest.param("a@-example.test", id="leading-hyphen"),
        pytest.param("a@xn--zz.test", id="bogus-alabel"),
        pytest.param("@relay.test:a@example.test", id="source-route"),
        pytest.param('"abc@example.test', id="unterminated-quote"),
        pytest.param('"a"b@example.test', id="junk-after-quote"),
        pytest.param('"a\x01"@example.test', id="control-in-quotes"),
        pytest.param("a@[300.1.1.1]", id="bad-ipv4-literal"),
        pytest.param("a@[IPv6:zz::1]", id="bad-ipv6-literal"),
        pytest.param("x" * 65 + "@example.test", id="local-too-long"),
        pytest.param("a@" + ".".join(["x" * 63] * 4), id="address-too-long"),
        pytest.param("a@" + "x" * 64 + ".test", id="label-too-long"),
    ],
)
def test_rejects(raw: str) -> None:
    with pytest.raises(AddressError):
        normalize(raw)


def test_address_error_is_value_error() -> None:
    assert issubclass(AddressError, ValueError)


def test_uses_idna_package() -> None:
    # The venv ships `idna` (IDNA 2008 + UTS 46); the stdlib codec is a fallback only.
    assert IDNA_IMPLEMENTATION == "idna"


def _check_property(raw: str, strip: bool) -> None:
    try:
        once = normalize(raw, strip_plus_tags=strip)
    except AddressError:
        return
    assert normalize(once, strip_plus_tags=strip) == once
    assert normalize(once) == once or strip


_local_chars = st.sampled_from(list("abcXYZ09.+-_!#'\"\\ @()<>[]:;,éÄßİK\u0130\u212a\u00a0\x00\x7f\x85"))
_locals = st.text(_local_chars, min_size=0, max_size=12)
_domains = st.one_of(
    st.sampled_from(
        ["example.test", "EXAMPLE.test", "bücher.example", "xn--bcher-kva.example", "a..b", "[192.0.2.1]"]
    ),
    st.text(st.sampled_from(list("abcÄß.-_0[]:")), max_size=12),
)


@settings(max_examples=500)
@given(st.text(max_size=40), st.booleans())
@example('"a\\\\"@x.test', False)
@example("K@x.test", False)
def test_never_raises_anything_but_address_error_and_idempotent(raw: str, strip: bool) -> None:
    _check_property(raw, strip)


@settings(max_examples=1000)
@given(_locals, _domains, st.booleans(), st.booleans())
def test_idempotent_on_address_like_input(local: str, domain: str, quoted: bool, strip: bool) -> None:
    if quoted:
        local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
    _check_property(f"{local}@{domain}", strip)


@given(st.emails())
def test_valid_emails_normalise(addr: str) -> None:
    try:
        once = normalize(addr)
    except AddressError:
        # st.emails() may build domains the IDNA 2008 rules refuse (e.g. "--" in positions 3-4 of a label).
        return
    assert normalize(once) == once
    assert once == once.lower()
