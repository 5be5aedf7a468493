"""Retry on 4xx, permanent failure on 5xx for that recipient only, expiry after max_age."""

from __future__ import annotations

import json
from pathlib import Path

from tests.harness import Relayd, Sink, free_port, message, wait_until


def _show(relayd: Relayd, queue_id: str) -> dict[str, dict[str, object]]:
    out = relayd.cli("queue", "show", "--json", queue_id)
    assert out.returncode == 0, out.stderr
    return {r["address"]: r for r in json.loads(out.stdout)["recipients"]}


def _queue_id(resp: bytes) -> str:
    return resp.decode().rsplit(" ", 1)[1]


def test_451_then_250_is_delivered_after_a_retry(tmp_path: Path, sink: Sink) -> None:
    sink.handler.script["slow@example.test"] = ["451 4.7.1 greylisted, try again later", "250 ok"]
    with Relayd(tmp_path, routes={"example.test": sink.port}) as relayd:
        code, resp = relayd.submit(message("greylisted"), to=["slow@example.test"])
        assert code == 250
        assert wait_until(lambda: sink.handler.count() == 1)
        assert sink.handler.attempts["slow@example.test"] == 2
        assert wait_until(lambda: _show(relayd, _queue_id(resp))["slow@example.test"]["state"] == "delivered")
        rcpt = _show(relayd, _queue_id(resp))["slow@example.test"]
        assert rcpt["attempts"] == 2
    assert "status=deferred" in relayd.log_text()


def test_550_fails_that_recipient_only(tmp_path: Path, sink: Sink) -> None:
    sink.handler.script["gone@example.test"] = ["550 5.1.1 <gone@example.test>: user unknown"]
    with Relayd(tmp_path, routes={"example.test": sink.port}) as relayd:
        code, resp = relayd.submit(message("mixed"), to=["gone@example.test", "here@example.test"])
        assert code == 250
        qid = _queue_id(resp)
        assert wait_until(
            lambda: {r["state"] for r in _show(relayd, qid).values()} == {"failed", "delivered"}
        )
        rcpts = _show(relayd, qid)
        assert rcpts["gone@example.test"]["state"] == "failed"
        assert "550" in str(rcpts["gone@example.test"]["last_reply"])
        assert "5.1.1" in str(rcpts["gone@example.test"]["last_reply"])
        assert rcpts["here@example.test"]["state"] == "delivered"
        assert sink.handler.attempts["gone@example.test"] == 1  # never retried
    assert [m.rcpt_tos for m in sink.messages] == [["here@example.test"]]


def test_unreachable_route_expires_after_max_age(tmp_path: Path) -> None:
    dead = free_port()  # nothing listens here
    with Relayd(tmp_path, routes={"example.test": dead}, queue_extra='max_age = "2s"') as relayd:
        code, resp = relayd.submit(message("nowhere"), to=["lost@example.test"])
        assert code == 250
        qid = _queue_id(resp)
        assert wait_until(lambda: _show(relayd, qid)["lost@example.test"]["state"] == "expired", timeout=20)
        rcpt = _show(relayd, qid)["lost@example.test"]
        assert int(str(rcpt["attempts"])) >= 2
        assert "Connection refused" in str(rcpt["last_reply"]) or "connect" in str(rcpt["last_reply"])


def test_queue_cli_retry_and_drop(tmp_path: Path, sink: Sink) -> None:
    dead = free_port()
    with Relayd(tmp_path, routes={"example.test": dead}, retry_schedule='["1h"]') as relayd:
        _, r1 = relayd.submit(message("one"), to=["a@example.test"])
        _, r2 = relayd.submit(message("two"), to=["b@example.test"])
        q1, q2 = _queue_id(r1), _queue_id(r2)
        assert wait_until(lambda: _show(relayd, q1)["a@example.test"]["attempts"] == 1)
        listing = relayd.cli("queue", "list", "--json")
        assert {json.loads(line)["queue_id"] for line in listing.stdout.splitlines()} == {q1, q2}
        dropped = relayd.cli("queue", "drop", q2)
        assert dropped.returncode == 0 and "1 recipient(s) dropped" in dropped.stdout
        assert _show(relayd, q2)["b@example.test"]["state"] == "dropped"
    # point the route at a live sink; a retry makes the deferred message due at once (schedule says 1h)
    relayd.config.write_text(relayd.config.read_text().replace(f"127.0.0.1:{dead}", f"127.0.0.1:{sink.port}"))
    with relayd:
        assert relayd.cli("queue", "retry", q1).returncode == 0
        assert wait_until(lambda: sink.handler.count() == 1)
    assert [m.rcpt_tos for m in sink.messages] == [["a@example.test"]]
