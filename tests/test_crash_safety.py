"""Nothing accepted is ever lost: kill -9 the daemon repeatedly while clients submit; count at the sink."""

from __future__ import annotations

import json
import queue
import random
import smtplib
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from tests.harness import PASSWORD, Relayd, Sink, cli_json, message, wait_until

TOTAL = 500
KILLS = 3
CLIENTS = 8


@pytest.mark.parametrize("workers", [1, 2])
def test_kill_9_during_submission_loses_no_accepted_message(tmp_path: Path, sink: Sink, workers: int) -> None:
    """``workers = 2`` runs four processes (a submission and a delivery process per queue shard, both
    writing the shard); ``kill -9`` of the main process takes them all down at once."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"seed={seed}")
    relayd = Relayd(tmp_path, routes={"example.test": sink.port}, server_extra=f"workers = {workers}")
    relayd.start()
    todo: queue.Queue[int] = queue.Queue()
    for i in range(TOTAL):
        todo.put(i)
    accepted: dict[int, str] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                n = todo.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                with smtplib.SMTP("127.0.0.1", relayd.port, timeout=10) as s:
                    s.login("acme", PASSWORD)
                    s.mail("app@acme.example.test")
                    s.rcpt(f"r{n}@example.test")
                    code, resp = s.data(message(f"crash-{n}", f"message number {n}\r\n"))
                if code == 250:
                    with lock:
                        accepted[n] = resp.decode().rsplit(" ", 1)[1]
                    continue
            except (OSError, smtplib.SMTPException):
                pass
            time.sleep(0.05)
            todo.put(n)  # no 250: the client still owns the message and tries again

    threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    thresholds = sorted(rng.sample(range(30, TOTAL - 50), KILLS))
    kills = 0
    try:
        for threshold in thresholds:
            assert wait_until(lambda th=threshold: len(accepted) >= th, timeout=60)  # type: ignore[misc]
            time.sleep(rng.uniform(0, 0.05))
            relayd.kill()
            kills += 1
            time.sleep(rng.uniform(0.05, 0.5))
            relayd.start()
        assert wait_until(lambda: len(accepted) == TOTAL, timeout=120)
    finally:
        stop.set()
        for t in threads:
            t.join(5)
    assert kills >= KILLS

    def delivered() -> set[int]:
        got = set()
        for m in sink.messages:
            subject = [ln for ln in m.data.split(b"\r\n") if ln.startswith(b"Subject: crash-")]
            got.add(int(subject[0].split(b"-")[1]))
        return got

    try:
        assert wait_until(lambda: delivered() >= set(accepted), timeout=60), sorted(
            set(accepted) - delivered()
        )
        # every queue id we answered 250 with is a real queue entry, delivered
        ids = [accepted[n] for n in sorted(accepted)[:50]]
        out = relayd.cli("queue", "show", "--json", *ids)
        assert out.returncode == 0, out.stderr
        shown = [json.loads(line) for line in out.stdout.splitlines()]
        assert [s["queue_id"] for s in shown] == ids
        assert all(r["state"] == "delivered" for s in shown for r in s["recipients"])
    finally:
        relayd.kill()
    duplicates = len(sink.messages) - len(delivered())
    print(f"accepted={len(accepted)} delivered={len(delivered())} duplicates={duplicates} kills={kills}")
    assert len(set(accepted.values())) == TOTAL


def test_a_message_whose_ledger_rows_cannot_be_written_is_refused_451_and_never_queued(
    tmp_path: Path, sink: Sink
) -> None:
    """The sent ledger's commit and the queue's share a turn of the loop (relayd.store.sqlitewriter,
    ``after``), but the queue's still depends on the ledger's: a message is never on disk without the rows
    its unsubscribe link and VERP address verify against. Here SQLite itself refuses the rows (a trigger
    added from outside): the client gets 451 4.3.0, nothing is queued or delivered, and once the rows can
    be written again the same message goes through."""
    relayd = Relayd(tmp_path, routes={"example.test": sink.port})
    with relayd:
        db = sqlite3.connect(tmp_path / "relayd.db", isolation_level=None, timeout=10)
        try:
            db.execute(
                "CREATE TRIGGER refuse_ledger BEFORE INSERT ON sent BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
            code, resp = relayd.submit(message("ledger down"), to=["a@example.test", "b@example.test"])
            assert code == 451 and resp.startswith(b"4.3.0"), resp
            assert cli_json(relayd, "queue", "list") == []
            assert cli_json(relayd, "queue", "list", "--state", "done") == []
            db.execute("DROP TRIGGER refuse_ledger")
        finally:
            db.close()
        assert relayd.submit(message("ledger back"), to=["a@example.test"])[0] == 250
        assert wait_until(lambda: sink.handler.count() == 1)
        assert [m.rcpt_tos for m in sink.messages] == [["a@example.test"]]
        assert "policy store failed" in relayd.log_text()
