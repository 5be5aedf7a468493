"""SIGHUP with new listener certificates: they are re-read, so the reload does not tell the operator to
restart for them (it still does for a key that needs one)."""

from __future__ import annotations

import signal
from pathlib import Path

from tests.harness import Relayd, Sink, wait_until
from tests.test_inbound_tls import CA, served_name

_INBOUND = 'domains = ["bounces.example.test"]'
_RESTART = "takes effect at the next restart"


def _pair(tmp: Path, stem: str, name: str) -> tuple[Path, Path]:
    cert = CA.issue_cert(name, "127.0.0.1")
    cert_path, key_path = tmp / f"{stem}-cert.pem", tmp / f"{stem}-key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(cert_path)
    cert.private_key_pem.write_to_path(key_path)
    key_path.chmod(0o600)  # relayd refuses a TLS key others can read
    return cert_path, key_path


def _reloads(relayd: Relayd) -> int:
    return relayd.log_text().count("reloaded ")


def test_new_certificate_paths_reload_without_a_restart_warning(tmp_path: Path) -> None:
    in_cert, in_key = _pair(tmp_path, "in1", "first.bounces.test")
    sub_cert, sub_key = _pair(tmp_path, "sub1", "first.submit.test")
    with Sink() as sink:
        relayd = Relayd(
            tmp_path,
            routes={"example.test": sink.port},
            submission_extra=f'tls_cert = "{sub_cert}"\ntls_key = "{sub_key}"',
        )
        inbound = f'{_INBOUND}\ntls_cert = "{in_cert}"\ntls_key = "{in_key}"\ngreet_wait = "0s"'
        relayd.config.write_text(relayd.config.read_text().replace(_INBOUND, inbound))
        with relayd:
            assert relayd.proc is not None
            assert served_name(relayd) == "first.bounces.test"
            # a renewal written to new files: both listeners' tls_cert and tls_key change, nothing else
            text = relayd.config.read_text()
            for old, stem, name in (
                ((in_cert, in_key), "in2", "second.bounces.test"),
                ((sub_cert, sub_key), "sub2", "second.submit.test"),
            ):
                new = _pair(tmp_path, stem, name)
                for before, after in zip(old, new, strict=True):
                    text = text.replace(str(before), str(after))
            relayd.config.write_text(text)
            relayd.proc.send_signal(signal.SIGHUP)
            assert wait_until(lambda: served_name(relayd) == "second.bounces.test", timeout=10)
            assert wait_until(lambda: _reloads(relayd) == 1, timeout=10), relayd.log_text()[-2000:]
            assert _RESTART not in relayd.log_text()
            # a key that does need a restart is still named
            relayd.config.write_text(text.replace(_INBOUND, f"{_INBOUND}\nmax_connections = 50"))
            relayd.proc.send_signal(signal.SIGHUP)
            assert wait_until(lambda: _reloads(relayd) == 2, timeout=10), relayd.log_text()[-2000:]
            warnings = [line for line in relayd.log_text().splitlines() if _RESTART in line]
            assert len(warnings) == 1 and "[inbound] changed" in warnings[0], warnings
