"""Several relayd nodes sharing their policy state in a real PostgreSQL act as one.

Each node is a real ``relayd serve`` process with its own local queue; they share the store (and the
server secret, as the README tells operators to do, so a token minted by one node verifies on another).
"""

from __future__ import annotations

import itertools
import os
import shutil
import smtplib
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest_pg import PostgresUnavailable, scratch_database
from tests.harness import PASSWORD, Relayd, Sink, message, wait_until

_n = itertools.count()


@pytest.fixture
def shared_dsn() -> Iterator[str]:
    try:
        cm = scratch_database(f"relayd_multinode_{os.getpid()}_{next(_n)}")
        dsn = cm.__enter__()
    except PostgresUnavailable as exc:
        pytest.fail(f"multi-node tests need PostgreSQL: {exc}", pytrace=False)
    try:
        yield dsn
    finally:
        cm.__exit__(None, None, None)


ACCOUNTS = """
[accounts.acme]
password_hash = "{hash}"
domains = ["acme.example.test"]

[accounts.acme.lists.news]
caps = {{ day = 1 }}
"""


def _nodes(tmp: Path, dsn: str, sink: Sink, **extra: str) -> tuple[Relayd, Relayd]:
    from tests.harness import PASSWORD_HASH

    store = f'backend = "postgresql"\ndsn = "{dsn}"'
    accounts = ACCOUNTS.format(hash=PASSWORD_HASH)
    (tmp / "a").mkdir()
    (tmp / "b").mkdir()
    a = Relayd(tmp / "a", routes={"example.test": sink.port}, store=store, accounts=accounts, **extra)
    b = Relayd(tmp / "b", routes={"example.test": sink.port}, store=store, accounts=accounts, **extra)
    a.start()
    shutil.copy(tmp / "a" / "secret.key", tmp / "b" / "secret.key")  # one secret for the whole cluster
    os.chmod(tmp / "b" / "secret.key", 0o600)
    b.start()
    return a, b


def _news(subject: str) -> bytes:
    return message(subject).replace(b"MIME-Version", b"List-Id: <news.acme.example.test>\r\nMIME-Version", 1)


def _rcpt(node: Relayd, rcpt: str) -> tuple[int, bytes]:
    with node.smtp() as s:
        s.login("acme", PASSWORD)
        s.mail("app@acme.example.test")
        return s.rcpt(rcpt)


def test_suppression_through_node_a_blocks_node_b_within_a_second(
    tmp_path: Path, shared_dsn: str, sink: Sink
) -> None:
    a, b = _nodes(tmp_path, shared_dsn, sink)
    try:
        assert _rcpt(b, "soon-gone@example.test")[0] == 250
        out = a.cli("suppress", "add", "soon-gone@example.test", "--scope", "global", "--reason", "manual")
        assert out.returncode == 0, out.stderr
        added = time.monotonic()
        assert wait_until(lambda: _rcpt(b, "soon-gone@example.test")[0] == 550, timeout=1.0, interval=0.05)
        print(f"suppression visible on node B after {time.monotonic() - added:.3f}s")
        # and a suspension decided through node A applies on node B within a second
        assert a.cli("account", "suspend", "acme").returncode == 0
        suspended = time.monotonic()

        def refused_on_b() -> bool:
            with b.smtp() as s:
                s.login("acme", PASSWORD)
                return s.mail("app@acme.example.test")[0] == 550

        assert wait_until(refused_on_b, timeout=1.5, interval=0.05)
        print(f"suspension visible on node B after {time.monotonic() - suspended:.3f}s")
    finally:
        a.kill()
        b.kill()


def test_concurrent_submissions_on_two_nodes_respect_a_day_1_cap(
    tmp_path: Path, shared_dsn: str, sink: Sink
) -> None:
    a, b = _nodes(tmp_path, shared_dsn, sink)
    accepted: list[str] = []
    refused: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(40)

    def client(node: Relayd, n: int) -> None:
        start.wait()
        for i in range(5):
            try:
                code, _ = node.submit(_news(f"cap {n}-{i}"), to=["capped@example.test"])
            except (OSError, smtplib.SMTPException):
                code = -1
            with lock:
                (accepted.append(f"{n}-{i}") if code == 250 else refused.append(code))

    try:
        threads = [threading.Thread(target=client, args=(a if n % 2 else b, n)) for n in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(accepted) + len(refused) == 200
        assert len(accepted) == 1, (len(accepted), sorted(set(refused)))
        assert set(refused) == {550}
        assert wait_until(lambda: sink.handler.count() >= 1)
        time.sleep(1.0)
        assert [m.rcpt_tos for m in sink.messages] == [["capped@example.test"]]
    finally:
        a.kill()
        b.kill()


def _cluster(action: str) -> None:
    out = subprocess.run(
        ["pg_ctlcluster", "15", "main", action, *(["-m", "fast"] if action == "stop" else [])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr


def test_postgresql_down_gives_451_queued_mail_still_goes_out_and_service_resumes(
    tmp_path: Path, shared_dsn: str, sink: Sink
) -> None:
    sink.handler.script["queued@example.test"] = ["451 4.7.1 not yet", "250 ok"]
    a, b = _nodes(tmp_path, shared_dsn, sink)
    try:
        assert a.submit(message("queued before the outage"), to=["queued@example.test"])[0] == 250
        assert wait_until(lambda: sink.handler.attempts.get("queued@example.test") == 1)
        _cluster("stop")
        try:
            for node in (a, b):
                with node.smtp() as s:
                    s.login("acme", PASSWORD)
                    assert s.mail("app@acme.example.test")[0] == 250
                    code, resp = s.rcpt("during@example.test")
                    assert code == 451 and resp.startswith(b"4.3.0"), resp
            # the message queued before the outage is retried and delivered on the last known state
            assert wait_until(
                lambda: any(m.rcpt_tos == ["queued@example.test"] for m in sink.messages), timeout=20
            )
        finally:
            _cluster("start")
        # service resumes by itself: the pools reconnect
        assert wait_until(lambda: a.submit(message("after"), to=["after@example.test"])[0] == 250, timeout=30)
        assert b.submit(message("after b"), to=["after-b@example.test"])[0] == 250
        assert wait_until(lambda: sink.handler.count() == 3)
    finally:
        a.kill()
        b.kill()
