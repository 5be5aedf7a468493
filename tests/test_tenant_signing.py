"""A tenant can't write or sign as another: the header From and Sender must be the account's own domains,
and DKIM ``d=`` is chosen among them only.

End to end through a real ``relayd serve`` with accounts that each hold a DKIM key made by ``relayd dkim
keygen`` (acme and beta: exact domains; gamma, in a daemon of its own: ``allow_subdomains``), delivering
to an aiosmtpd sink; the delivered copies are verified with dkimpy against the published records. Plus
the config key and :func:`relayd.policy.render.signing_domain` on its own.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dkim as dkimpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.config import Config
from relayd.mail.dkim import Signer, keygen, load_key
from relayd.policy.render import signing_domain
from tests.dkimverify import records_from_zone_lines, verify_dkimpy
from tests.harness import (
    PASSWORD,
    PASSWORD_HASH,
    RELAYD,
    Received,
    Relayd,
    Sink,
    cli_json,
    config_text,
    free_port,
    submit_each,
    wait_until,
)

ACME, BETA, GAMMA = "acme.example.test", "beta.example.test", "gamma.example.test"
SELECTOR = "s2026"

ACCOUNTS = f"""
[accounts.acme]
password_hash = "{PASSWORD_HASH}"
domains = ["{ACME}"]

[accounts.beta]
password_hash = "{PASSWORD_HASH}"
domains = ["{BETA}"]

"""

#: its own daemon: the key is new, and the other tests also run against a relayd without it
GAMMA_ACCOUNT = f"""
[accounts.gamma]
password_hash = "{PASSWORD_HASH}"
domains = ["{GAMMA}"]
allow_subdomains = true

[accounts.beta]
password_hash = "{PASSWORD_HASH}"
domains = ["{BETA}"]
"""


@dataclass(frozen=True)
class Setup:
    relayd: Relayd
    sink: Sink
    records: dict[str, str]


def start(tmp: Path, accounts: str) -> Iterator[Setup]:
    keys, zone, dkim_config = tmp / "keys", [], ""
    for domain in (ACME, BETA, GAMMA):
        out = subprocess.run(
            [*RELAYD, "dkim", "keygen", "--domain", domain, "--selector", SELECTOR, "--algorithm", "ed25519",
             "--out-dir", str(keys)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        zone.append(out.stdout)
        dkim_config += (
            f'\n[[dkim]]\ndomain = "{domain}"\nselector = "{SELECTOR}"\n'
            f'key_file = "{keys}/{domain}.{SELECTOR}.ed25519.pem"\nalgorithm = "ed25519"\n'
        )
    records = records_from_zone_lines("".join(zone).splitlines())
    assert len(records) == 3
    with (
        Sink() as sink,
        Relayd(tmp, routes={"example.test": sink.port}, extra=dkim_config, accounts=accounts) as r,
    ):
        yield Setup(r, sink, records)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """acme and beta, each with a key of its own (gamma's key is there too, with no account)."""
    yield from start(tmp_path_factory.mktemp("tenants"), ACCOUNTS)


@pytest.fixture(scope="module")
def gamma(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """gamma, whose subdomains are its own (allow_subdomains), and beta."""
    yield from start(tmp_path_factory.mktemp("gamma"), GAMMA_ACCOUNT)


def message(from_: str, subject: str, *, extra: str = "") -> bytes:
    return (
        f"From: {from_}\r\n{extra}To: Reader <reader@example.test>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject}@tenants.example.test>\r\nDate: Mon, 23 Nov 2026 12:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello.\r\n"
    ).encode()


def send(setup: Setup, raw: bytes, rcpt: str, user: str = "acme", domain: str = ACME) -> tuple[int, str]:
    tx = submit_each(setup.relayd, raw, to=[rcpt], sender=f"app@{domain}", user=user)
    assert tx.data is not None, tx
    return tx.data


def delivered(setup: Setup, rcpt: str) -> Received:
    sink = setup.sink
    assert wait_until(lambda: any(rcpt in m.rcpt_tos for m in sink.messages))
    return next(m for m in sink.messages if rcpt in m.rcpt_tos)


def signed_by(data: bytes) -> list[bytes]:
    """The d= of every DKIM-Signature of a delivered copy."""
    d = dkimpy.DKIM(data)
    sigs = [dkimpy.util.parse_tag_value(v) for n, v in d.headers if n.lower() == b"dkim-signature"]
    return [tags[b"d"] for tags in sigs]


def queued_addresses(setup: Setup) -> set[str]:
    """Every recipient in the queue: unfinished (the default of ``queue list``) and finished."""
    unfinished = cli_json(setup.relayd, "queue", "list")
    return {r["recipient"] for r in unfinished + cli_json(setup.relayd, "queue", "list", "--state", "done")}


# --- refused: another tenant's domain -----------------------------------------------------------------------


def test_from_of_another_tenant_is_refused_naming_the_header_and_nothing_is_queued(setup: Setup) -> None:
    rcpt = "spoof-from@example.test"
    reply = send(setup, message("CEO <ceo@beta.example.test>", "spoof-from"), rcpt)
    assert reply == (
        550,
        "5.7.1 From: <ceo@beta.example.test>: beta.example.test is not a sending domain of account acme",
    )
    assert rcpt not in queued_addresses(setup)
    ok = "after-spoof@example.test"  # the session and the account still work
    assert send(setup, message("App <app@acme.example.test>", "after-spoof"), ok)[0] == 250
    delivered(setup, ok)
    assert not any(rcpt in m.rcpt_tos for m in setup.sink.messages)


def test_sender_of_another_tenant_is_refused_naming_the_header(setup: Setup) -> None:
    raw = message("App <app@acme.example.test>", "spoof-sender", extra="Sender: ceo@beta.example.test\r\n")
    assert send(setup, raw, "spoof-sender@example.test") == (
        550,
        "5.7.1 Sender: <ceo@beta.example.test>: beta.example.test is not a sending domain of account acme",
    )


def test_subdomain_is_refused_without_allow_subdomains(setup: Setup) -> None:
    reply = send(setup, message("x@news.acme.example.test", "sub-acme"), "sub-acme@example.test")
    assert reply[0] == 550 and reply[1].startswith("5.7.1 From: <x@news.acme.example.test>:")
    with setup.relayd.smtp() as s:  # MAIL FROM is judged by the same function
        s.login("acme", PASSWORD)
        assert s.mail("app@news.acme.example.test")[0] == 553


# --- accepted and signed with the account's own key ---------------------------------------------------------


@pytest.mark.parametrize(("user", "domain"), [("acme", ACME), ("beta", BETA)])
def test_own_from_is_signed_with_the_own_domain_and_verifies(setup: Setup, user: str, domain: str) -> None:
    rcpt = f"own-{user}@example.test"
    assert send(setup, message(f"News <news@{domain}>", f"own-{user}"), rcpt, user, domain)[0] == 250
    data = delivered(setup, rcpt).data
    assert signed_by(data) == [domain.encode()]
    assert verify_dkimpy(data, setup.records, domain) == {SELECTOR: "pass"}


def test_from_domain_is_matched_case_insensitively_and_signed(setup: Setup) -> None:
    rcpt = "upper@example.test"
    assert send(setup, message("CEO@ACME.EXAMPLE.TEST", "upper"), rcpt)[0] == 250
    data = delivered(setup, rcpt).data
    assert signed_by(data) == [ACME.encode()]
    assert verify_dkimpy(data, setup.records, ACME) == {SELECTOR: "pass"}


def test_subdomain_is_accepted_with_allow_subdomains_and_signed_by_its_parent(gamma: Setup) -> None:
    setup = gamma
    rcpt = "sub-gamma@example.test"
    raw = message("News <news@news.gamma.example.test>", "sub-gamma")
    assert send(setup, raw, rcpt, "gamma", "news.gamma.example.test")[0] == 250  # MAIL FROM too
    data = delivered(setup, rcpt).data
    assert signed_by(data) == [GAMMA.encode()]  # relaxed alignment with the parent's key (RFC 7489)
    assert verify_dkimpy(data, setup.records, GAMMA) == {SELECTOR: "pass"}


def test_subdomain_of_allow_subdomains_account_is_still_only_its_own(gamma: Setup) -> None:
    setup = gamma
    reply = send(
        setup, message("x@news.beta.example.test", "sub-beta-by-gamma"), "sbg@example.test", "gamma", GAMMA
    )
    assert reply[0] == 550 and "is not a sending domain of account gamma" in reply[1]


# --- the ways a From can try to name two domains ------------------------------------------------------------

OWN_SENDER = "Sender: app@acme.example.test\r\n"
A, A2, B = "x@acme.example.test", "y@acme.example.test", "ceo@beta.example.test"


@pytest.mark.parametrize(
    ("from_", "extra", "code", "start"),
    [
        pytest.param(f'"{B}" <{A}>', "", 250, "", id="display_name_is_an_address"),
        pytest.param(f"{A} ({B})", "", 250, "", id="comment_is_an_address"),
        pytest.param(f"=?utf-8?q?ceo=40beta.example.test?= <{A}>", "", 250, "", id="encoded_word_name"),
        pytest.param("=?utf-8?b?Y2VvQGJldGEuZXhhbXBsZS50ZXN0?=", "", 550, "5.6.0", id="encoded_word_only"),
        pytest.param(f"{A}, {B}", OWN_SENDER, 550, f"5.7.1 From: <{B}>", id="list_with_other_tenant"),
        pytest.param(f"{A}, {A2}", OWN_SENDER, 250, "", id="own_list_with_sender"),
        pytest.param(f"{A}, {A2}", "", 550, "5.6.0", id="list_without_sender"),
        pytest.param(f"Team: {A}, {B};", OWN_SENDER, 550, f"5.7.1 From: <{B}>", id="group_with_other_tenant"),
        pytest.param("undisclosed-recipients:;", "", 550, "5.6.0", id="empty_group"),
        pytest.param(f"{B} <{A}>", OWN_SENDER, 550, f"5.7.1 From: <{B}>", id="bare_address_as_display_name"),
        pytest.param(f"{B} <{A}>", "", 550, "5.6.0", id="bare_address_as_display_name_no_sender"),
        pytest.param(f"{A}@beta.example.test", "", 550, "5.6.0", id="two_at_signs"),
        pytest.param(f"<@beta.example.test:{A}>", "", 550, "5.6.0", id="obsolete_route"),
        pytest.param(f'"{A} <{A}>', "", 550, "5.6.0", id="unclosed_quote"),
        pytest.param(A, f"From: {B}\r\n", 550, "5.6.0", id="two_from_fields"),
        pytest.param(A, f"Sender: {A}, {A2}\r\n", 550, "5.6.0", id="sender_of_two_addresses"),
    ],
)  # fmt: skip
def test_from_tricks(
    setup: Setup, from_: str, extra: str, code: int, start: str, request: pytest.FixtureRequest
) -> None:
    name = request.node.callspec.id
    got = send(setup, message(from_, f"trick-{name}", extra=extra), f"trick-{name}@example.test")
    assert got[0] == code and got[1].startswith(start), got


# --- the parts on their own ---------------------------------------------------------------------------------

_PIECES = ["x", "@", ACME, BETA, '"', "(", ")", "<", ">", ",", ":", ";", " ", "\\", "=?utf-8?q?", "?=", "["]


@settings(max_examples=1000)
@given(st.lists(st.sampled_from(_PIECES), max_size=30))
def test_from_parser_never_raises_and_finds_only_domains_written_outside_quotes(pieces: list[str]) -> None:
    from relayd.mail.author import parse_mailboxes  # here: the tests above also run without it

    value = "".join(pieces)
    found = parse_mailboxes(value)
    if found is not None:
        assert found
        for mailbox in found:
            assert mailbox.address.rpartition("@")[2] == mailbox.domain and mailbox.domain in value


def test_signing_domain_is_never_a_domain_the_account_does_not_own(tmp_path: Path) -> None:
    keys = []
    for domain in (ACME, BETA):
        keygen(domain, SELECTOR, "ed25519", tmp_path)
        keys.append(load_key(domain, SELECTOR, tmp_path / f"{domain}.{SELECTOR}.ed25519.pem", "ed25519"))
    signer = Signer(keys)
    cfg = Config.model_validate(
        {
            "accounts": {
                "acme": {"domains": [ACME], "networks": ["127.0.0.1/32"]},
                "signed": {
                    "domains": ["signed.example.test"],
                    "networks": ["127.0.0.2/32"],
                    "signing_domain": ACME,
                },
            }
        }
    )  # fmt: skip
    assert signing_domain(cfg, signer, "acme", ACME) == ACME
    assert signing_domain(cfg, signer, "acme", "Acme.Example.Test.") == ACME
    assert signing_domain(cfg, signer, "acme", BETA) is None  # beta's key is there, but not acme's
    assert signing_domain(cfg, signer, "acme", "news.acme.example.test") is None  # no allow_subdomains
    assert signing_domain(cfg, signer, "signed", BETA) == ACME  # only the operator's signing_domain
    assert signing_domain(cfg, signer, "removed", ACME) is None


def test_allow_subdomains_must_be_a_boolean(tmp_path: Path) -> None:
    accounts = (
        f'[accounts.acme]\npassword_hash = "{PASSWORD_HASH}"\ndomains = ["{ACME}"]\n'
        'allow_subdomains = "yes please"\n'
    )
    path = tmp_path / "relayd.toml"
    path.write_text(config_text(tmp_path, port=free_port(), accounts=accounts))
    out = subprocess.run(
        [*RELAYD, "check-config", "--config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert f"{path}: accounts.acme.allow_subdomains:" in out.stdout + out.stderr
