"""Config validation: every problem at once, each naming the file, the dotted key and the problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from relayd import config

ROOT = Path(__file__).resolve().parent.parent


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relayd", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def test_example_config_is_valid() -> None:
    out = _check(ROOT / "conf" / "relayd.toml")
    assert out.returncode == 0, out.stderr
    cfg = config.load(ROOT / "conf" / "relayd.toml")
    assert cfg.submission.listen == ["127.0.0.1:2525"]
    assert cfg.queue.retry_schedule == [60.0, 300.0, 900.0, 3600.0, 14400.0]
    assert cfg.queue.max_age == 5 * 86400
    assert cfg.submission.max_message_size == 25_000_000


def test_all_mistakes_are_listed_with_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("""
[submission]
listen = ["127.0.0.1:99999"]
max_message_size = "lots"
max_recipents = 5

[queue]
max_age = "5 fortnights"

[delivery]
mode = "smarthost"

[accounts.acme]
domains = ["acme.example.test"]
""")
    out = _check(bad)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    expected = [
        "submission.listen[0]: bad port",
        "submission.max_message_size: expected a size",
        "submission.max_recipents: unknown key",
        "queue.max_age: expected a duration",
        "delivery: mode 'smarthost' needs smarthost",
        "accounts.acme: an account needs password_hash, password_file or networks",
    ]
    for want in expected:
        assert any(line.startswith(f"{bad}: ") and want in line for line in lines), (want, lines)
    assert len(lines) == len(expected), lines
    # `relayd serve` refuses to start on the same file, with the same messages
    serve = subprocess.run(
        [sys.executable, "-m", "relayd", "serve", "--config", str(bad)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert serve.returncode == 2
    assert serve.stderr.strip().splitlines() == lines


def test_syntax_error_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.toml"
    bad.write_text("[server\nhostname = 1\n")
    out = _check(bad)
    assert out.returncode == 2
    assert out.stderr.startswith(f"{bad}: (syntax): ")


def test_durations_and_sizes() -> None:
    assert config.parse_duration("30s") == 30
    assert config.parse_duration("15m") == 900
    assert config.parse_duration("5d") == 432000
    assert config.parse_size("25MB") == 25_000_000
    assert config.parse_size("1KiB") == 1024
    assert config.parse_hostport("[::1]:2525") == ("::1", 2525)
