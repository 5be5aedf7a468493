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

from tests.harness import PASSWORD, PASSWORD_HASH, Relayd, Sink, cli_json, message, wait_until

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


CAPPED_ACCOUNTS = f"""
[accounts.acme]
password_hash = "{PASSWORD_HASH}"
domains = ["acme.example.test"]
imprint = "ACME Ltd, 1 Test Street"

[accounts.acme.lists.news]
caps = {{ day = 1 }}
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_two_messages_racing_for_a_recipients_last_capped_send_one_is_deferred_451(
    tmp_path: Path, sink: Sink, workers: int
) -> None:
    """The caps rule checks on a read; the send is counted, and checked again, in the same commit as the
    message's ledger rows (relayd.policy.rules.caps). Two messages of a list with a day cap of 1 to one
    recipient, both checked before either is counted (the store's write lock held from outside meanwhile):
    one is accepted, the other gets 451 4.7.1 and leaves nothing behind; sent again, it gets the cap's
    550. With two workers the two sessions may be in different processes: the same answer."""
    relayd = Relayd(
        tmp_path,
        routes={"example.test": sink.port},
        accounts=CAPPED_ACCOUNTS,
        server_extra=f"workers = {workers}",
    )
    news = message("news").replace(b"MIME-Version:", b"List-Id: <news.acme.example.test>\r\nMIME-Version:")
    with relayd:
        replies: list[tuple[int, bytes]] = []

        def send() -> None:
            replies.append(relayd.submit(news, to=["reader@example.test"]))

        db = sqlite3.connect(tmp_path / "relayd.db", isolation_level=None, timeout=10)
        try:
            db.execute("BEGIN IMMEDIATE")  # no write commits until released: both messages check first
            clients = [threading.Thread(target=send) for _ in range(2)]
            for client in clients:
                client.start()
            # time for both DATA hooks to check the cap and reach their ledger write, which waits for the
            # lock (up to the store's busy_timeout, 5 s; nothing is logged before it commits)
            time.sleep(1.5)
            db.execute("ROLLBACK")
        finally:
            db.close()
        for client in clients:
            client.join(30)
        assert sorted(code for code, _ in replies) == [250, 451], replies
        [deferred] = [text for code, text in replies if code == 451]
        assert deferred.startswith(b"4.7.1 Send cap in use"), deferred
        code, text = relayd.submit(news, to=["reader@example.test"])
        assert code == 550 and b"cap" in text, (code, text)
        assert wait_until(lambda: sink.handler.count() == 1)
        assert len(cli_json(relayd, "queue", "list", "--state", "done")) == 1
        ledger = sqlite3.connect(tmp_path / "relayd.db")
        try:
            assert ledger.execute("SELECT count(*) FROM sent").fetchone() == (1,)
            assert ledger.execute("SELECT sum(n) FROM send_log").fetchone() == (1,)
        finally:
            ledger.close()
        assert "deferred: send cap of list news used meanwhile for reader@example.test" in relayd.log_text()
