"""Account passwords: scrypt at today's cost that still logs in, hashes checked at config load, successful
checks remembered (failures never), every failure the same work whatever the account, checks off the event
loop and bounded, and the published example password kept off public listeners."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import tomllib
from pathlib import Path

from relayd.core.passwords import hash_password, verify_password
from tests.harness import PASSWORD, PASSWORD_HASH, RELAYD, Relayd

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_HASH = tomllib.loads((ROOT / "conf" / "relayd.toml").read_text())["accounts"]["acme"]["password_hash"]


def run(*args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RELAYD, *args], input=stdin, capture_output=True, text=True, timeout=timeout)


def account(name: str, line: str) -> str:
    return f'\n[accounts.{name}]\n{line}\ndomains = ["{name}.example.test"]\n'


def test_hash_password_uses_the_owasp_cost_and_that_hash_logs_in(tmp_path: Path) -> None:
    out = run("account", "hash-password", stdin="correct horse\n")
    assert out.returncode == 0, out.stderr
    stored = out.stdout.strip()
    scheme, n, r, p, _, _ = stored.split("$")
    assert (scheme, int(n), int(r), int(p)) == ("scrypt", 2**17, 8, 1)
    with (
        Relayd(
            tmp_path, routes={"example.test": 9}, accounts=account("acme", f'password_hash = "{stored}"')
        ) as d,
        d.smtp() as s,
    ):
        assert s.login("acme", "correct horse")[0] == 235


def test_stored_hashes_are_checked_with_their_own_parameters() -> None:
    # N=2^17 needs 128 MiB: more than hashlib.scrypt's default memory limit of 32 MiB
    assert verify_password("pw", hash_password("pw", n=2**17))
    assert verify_password(PASSWORD, PASSWORD_HASH)  # an older, cheaper hash (N=2^12) still works
    assert not verify_password("wrong", PASSWORD_HASH)


def test_password_hash_problems_are_named_at_config_load(tmp_path: Path) -> None:
    salt, digest = "AAAAAAAAAAAAAAAAAAAAAA==", "A" * 43 + "="
    bad = {
        "plain": 'password_hash = "change-me"',
        "md5": f'password_hash = "md5$16384$8$1${salt}${digest}"',
        "notpow": f'password_hash = "scrypt$10000$8$1${salt}${digest}"',
        "huge": f'password_hash = "scrypt$2097152$8$1${salt}${digest}"',
        "bigr": f'password_hash = "scrypt$16384$1000$1${salt}${digest}"',
        "badsalt": f'password_hash = "scrypt$16384$8$1$not base64!${digest}"',
        "shorthash": f'password_hash = "scrypt$16384$8$1${salt}$AAAA"',
    }
    relayd = Relayd(
        tmp_path, routes={"example.test": 9}, accounts="".join(account(k, v) for k, v in bad.items())
    )
    out = run("check-config", "--config", str(relayd.config))
    assert out.returncode == 2, out.stdout
    lines = out.stderr.strip().splitlines()
    for name in bad:
        assert any(line.startswith(f"{relayd.config}: accounts.{name}.password_hash: ") for line in lines), (
            name,
            lines,
        )
    assert len(lines) == len(bad), lines


def test_empty_password_file_is_refused_at_config_load(tmp_path: Path) -> None:
    pw = tmp_path / "acme.password"
    pw.write_text("\n")
    pw.chmod(0o600)
    relayd = Relayd(tmp_path, routes={"example.test": 9}, accounts=account("acme", f'password_file = "{pw}"'))
    out = run("check-config", "--config", str(relayd.config))
    assert out.returncode == 2
    assert f"{relayd.config}: accounts.acme.password_file: {pw} is empty" in out.stderr


def test_example_password_is_warned_about_and_refused_beyond_loopback(tmp_path: Path) -> None:
    relayd = Relayd(
        tmp_path, routes={"example.test": 9}, accounts=account("acme", f'password_hash = "{EXAMPLE_HASH}"')
    )
    out = run("check-config", "--config", str(relayd.config))
    assert out.returncode == 0, out.stderr
    assert f"{relayd.config}: accounts.acme.password_hash: warning: still the example password" in out.stderr

    public = relayd.config.read_text().replace(
        f'listen = ["127.0.0.1:{relayd.port}"]', f'listen = ["0.0.0.0:{relayd.port}"]'
    )
    relayd.config.write_text(public)
    for command in ("check-config", "serve"):
        out = run(command, "--config", str(relayd.config), timeout=30)
        assert out.returncode == 2, (command, out.stderr)
        assert f"{relayd.config}: accounts.acme.password_hash: still the example password" in out.stderr
        assert f"0.0.0.0:{relayd.port}" in out.stderr


# --- the checker itself ----------------------------------------------------------------------------------


class Counting:
    """The real scrypt check, counting each call and its parameters."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int]] = []

    def __call__(self, h: object, password: str) -> bool:
        from relayd.core.passwords import ScryptHash

        assert isinstance(h, ScryptHash)
        self.calls.append((h.n, h.r, h.p))
        return h.matches(password)


async def test_a_successful_check_is_remembered_and_failures_never_are() -> None:
    from relayd.core.passwords import PasswordChecker, parse_hash

    now = [0.0]
    verify = Counting()
    checker = PasswordChecker(verify=verify, clock=lambda: now[0], ttl=300)
    checker.configure({"acme": parse_hash(PASSWORD_HASH)})
    assert await checker.check("acme", PASSWORD)
    assert await checker.check("acme", PASSWORD)
    assert len(verify.calls) == 1
    for _ in range(3):
        assert not await checker.check("acme", PASSWORD + "-typo")
    assert len(verify.calls) == 4  # each failure costs a full check
    assert not await checker.check("other", PASSWORD)  # remembered for acme only
    assert len(verify.calls) == 5
    now[0] = 301.0  # past the ttl: checked again
    assert await checker.check("acme", PASSWORD)
    assert len(verify.calls) == 6


async def test_a_changed_password_hash_forgets_remembered_logins() -> None:
    from relayd.core.passwords import PasswordChecker, parse_hash

    verify = Counting()
    checker = PasswordChecker(verify=verify)
    checker.configure({"acme": parse_hash(PASSWORD_HASH), "other": parse_hash(PASSWORD_HASH)})
    assert await checker.check("acme", PASSWORD) and await checker.check("other", PASSWORD)
    checker.configure(
        {"acme": parse_hash(hash_password("new password", n=2**12)), "other": parse_hash(PASSWORD_HASH)}
    )
    assert not await checker.check("acme", PASSWORD)  # the old password no longer works, even from memory
    assert await checker.check("acme", "new password")
    calls = len(verify.calls)
    assert await checker.check("other", PASSWORD)  # unchanged account: still remembered
    assert len(verify.calls) == calls


async def test_remembered_logins_are_bounded() -> None:
    from relayd.core.passwords import PasswordChecker, parse_hash

    checker = PasswordChecker(max_entries=3)
    checker.configure({f"a{i}": parse_hash(PASSWORD_HASH) for i in range(6)})
    for i in range(6):
        assert await checker.check(f"a{i}", PASSWORD)
    assert len(checker) == 3


async def test_every_failure_costs_one_check_at_the_same_cost_whatever_the_account() -> None:
    """Unknown names, accounts with only `networks` and `password_file` accounts: one scrypt check with
    the parameters the configured hashes use, as for a wrong password on a real account."""
    from relayd.core.passwords import PasswordChecker, PlainPassword, parse_hash

    verify = Counting()
    checker = PasswordChecker(verify=verify)
    checker.configure({"hashed": parse_hash(PASSWORD_HASH), "filed": PlainPassword(b"file password")})
    real = parse_hash(PASSWORD_HASH)
    for name in ("hashed", "filed", "networks-only", "nobody"):
        verify.calls.clear()
        assert not await checker.check(name, "guess")
        assert verify.calls == [(real.n, real.r, real.p)], name
    verify.calls.clear()
    assert await checker.check("filed", "file password")
    assert len(verify.calls) == 1


async def test_checks_run_off_the_event_loop_at_most_two_at_a_time() -> None:
    from relayd.core.passwords import PasswordChecker, parse_hash

    release = threading.Event()
    lock = threading.Lock()
    state = {"running": 0, "peak": 0}
    threads: set[int] = set()

    def blocking(h: object, password: str) -> bool:
        threads.add(threading.get_ident())
        with lock:
            state["running"] += 1
            state["peak"] = max(state["peak"], state["running"])
        release.wait(30)
        with lock:
            state["running"] -= 1
        return False

    checker = PasswordChecker(verify=blocking)
    checker.configure({"acme": parse_hash(PASSWORD_HASH)})
    tasks = [asyncio.create_task(checker.check("acme", f"guess {i}")) for i in range(6)]
    for _ in range(500):  # the loop keeps running while checks block in their threads
        await asyncio.sleep(0.01)
        if state["running"] == 2:
            break
    for _ in range(10):
        await asyncio.sleep(0.01)  # room for a third check to start, were the bound missing
    assert state["running"] == 2
    release.set()
    assert await asyncio.gather(*tasks) == [False] * 6
    assert state["peak"] == 2
    assert threading.get_ident() not in threads
