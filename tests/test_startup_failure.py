"""A start-up that fails ends the process with its error.

A listen address already in use made ``relayd serve`` log the error and then hang for ever at exit: the
stores opened before the listeners kept their aiosqlite threads, which the interpreter waits for. Under
systemd the service then neither ran nor failed.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from tests.harness import RELAYD, Relayd


@pytest.mark.parametrize("listener", ["submission", "inbound", "http"])
def test_a_listen_address_in_use_ends_the_process_with_exit_1(tmp_path: Path, listener: str) -> None:
    relayd = Relayd(tmp_path, routes={"example.test": 9})
    port = {"submission": relayd.port, "inbound": relayd.inbound_port, "http": relayd.http_port}[listener]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        proc = subprocess.Popen(
            [*RELAYD, "serve", "--config", str(relayd.config)],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            out, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 1
    assert b"address already in use" in out
    assert b"BrokenPipeError" not in out  # the report parser child was closed, not left to find out
