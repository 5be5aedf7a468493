"""Operations: systemd notifications, SIGHUP reload (bad file keeps the old config), the unit file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import smtplib
import socket
import subprocess
from pathlib import Path

from tests.harness import PASSWORD, PASSWORD_HASH, Relayd, Sink, message, wait_until

ROOT = Path(__file__).resolve().parent.parent


def test_unit_file_verifies(tmp_path: Path) -> None:
    exe = shutil.which("systemd-analyze")
    assert exe is not None, "systemd-analyze is needed (.ci/run installs systemd)"
    unit = tmp_path / "relayd.service"
    relayd = Path(ROOT / ".venv" / "bin" / "relayd")
    text = (ROOT / "systemd" / "relayd.service").read_text()
    # verify needs the executables to exist: point them at this checkout's installed entry point
    unit.write_text(
        text.replace("/usr/local/bin/relayd", str(relayd if relayd.exists() else shutil.which("relayd")))
    )
    out = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    for directive in (
        "Type=notify",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "ReadWritePaths=/var/lib/relayd",
        "WatchdogSec=",
        "User=relayd",
    ):
        assert directive in text


def test_notify_ready_reloading_stopping(tmp_path: Path, sink: Sink) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(15)
    relayd = Relayd(tmp_path, routes={"example.test": sink.port})
    relayd.env = {"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "2000000"}

    def expect(prefix: str) -> str:
        while True:
            msg = sock.recv(4096).decode()
            if msg.startswith(prefix):
                return msg

    try:
        relayd.start()
        expect("READY=1")
        assert expect("WATCHDOG=1") == "WATCHDOG=1"
        assert relayd.proc is not None
        relayd.proc.send_signal(signal.SIGHUP)
        reloading = expect("RELOADING=1")
        assert "MONOTONIC_USEC=" in reloading
        expect("READY=1")
        relayd.proc.send_signal(signal.SIGTERM)
        expect("STOPPING=1")
        assert relayd.proc.wait(20) == 0
        relayd.proc = None
    finally:
        relayd.kill()
        sock.close()


def test_sighup_with_broken_file_keeps_serving_and_good_file_adds_account(tmp_path: Path, sink: Sink) -> None:
    with Relayd(tmp_path, routes={"example.test": sink.port}) as relayd:
        good = relayd.config.read_text()
        held = relayd.smtp()  # a session open across both reloads must survive them
        held.login("acme", PASSWORD)
        assert relayd.proc is not None
        relayd.config.write_text(good + "\n[accounts.newco\npassword_hash = 1\n")
        relayd.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "reload refused" in relayd.log_text())
        assert relayd.submit(message("still served"), to=["a@example.test"])[0] == 250
        new_account = f"""
[accounts.newco]
password_hash = "{PASSWORD_HASH}"
domains = ["newco.example.test"]
"""
        relayd.config.write_text(good + new_account)
        relayd.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "reloaded" in relayd.log_text())
        code, _ = relayd.submit(
            message("from newco", sender="app@newco.example.test"),
            to=["b@example.test"],
            sender="app@newco.example.test",
            user="newco",
        )
        assert code == 250
        # the session opened before both reloads still works
        assert held.mail("app@acme.example.test")[0] == 250
        assert held.rcpt("c@example.test")[0] == 250
        assert held.data(message("held session"))[0] == 250
        held.quit()
        assert wait_until(lambda: sink.handler.count() == 3)


def test_json_logs_answer_what_happened_to_a_message(tmp_path: Path, sink: Sink) -> None:
    sink.handler.script["later@example.test"] = ["451 4.7.1 try later", "250 ok"]
    with Relayd(tmp_path, routes={"example.test": sink.port}, server_extra='log_format = "json"') as relayd:
        code, resp = relayd.submit(message("json logs"), to=["later@example.test"])
        assert code == 250
        queue_id = resp.decode().rsplit(" ", 1)[1]
        assert wait_until(lambda: sink.handler.count() == 1)
        assert wait_until(lambda: '"outcome": "delivered"' in relayd.log_text())
    lines = [json.loads(line) for line in relayd.log_text().splitlines() if line.startswith("{")]
    mine = [rec for rec in lines if rec.get("queue_id") == queue_id]
    assert [rec["outcome"] for rec in mine] == ["accepted", "deferred", "delivered"]
    delivered = mine[-1]
    assert delivered["account"] == "acme" and delivered["rcpt_domain"] == "example.test"
    assert delivered["reply_code"] == "250" and delivered["attempts"] == 2 and delivered["latency"] >= 0
    assert mine[1]["reply_code"] == "451" and mine[1]["status"] == "4.7.1"
    text = relayd.log_text()
    assert PASSWORD not in text and "json logs" not in text  # no secrets, no message content


def test_two_workers_share_the_port_and_deliver_everything(tmp_path: Path, sink: Sink) -> None:
    with Relayd(tmp_path, routes={"example.test": sink.port}, server_extra="workers = 2") as relayd:
        ids = set()
        for i in range(30):
            code, resp = relayd.submit(message(f"worker mail {i}"), to=[f"w{i}@example.test"])
            assert code == 250
            ids.add(resp.decode().rsplit(" ", 1)[1])
        assert wait_until(lambda: sink.handler.count() == 30)
        # both workers took connections: each has its own queue shard on disk
        shards = sorted(p.name for p in (tmp_path / "queue").glob("queue*.db"))
        assert shards == ["queue-1.db", "queue.db"]
        listing = relayd.cli("queue", "list", "--json", "--state", "delivered")
        assert {json.loads(line)["queue_id"] for line in listing.stdout.splitlines()} == ids
        # /metrics adds up the workers' samples
        import urllib.request

        body = (
            urllib.request.urlopen(f"http://127.0.0.1:{relayd.http_port}/metrics", timeout=10).read().decode()
        )
        accepted = [
            ln for ln in body.splitlines() if ln.startswith('relayd_submissions_total{outcome="accepted"')
        ]
        assert accepted and float(accepted[0].split()[-1]) == 30.0


def _children(pid: int) -> dict[int, int]:
    """pid -> nice value of each child of ``pid`` (one reaped between the two reads is left out)."""
    out = {}
    for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            out[int(k)] = int(Path(f"/proc/{k}/stat").read_text().rsplit(")", 1)[1].split()[16])
        except FileNotFoundError:
            continue
    return out


def test_each_shard_has_an_accepting_process_and_a_lower_priority_delivery_process(
    tmp_path: Path, sink: Sink
) -> None:
    """With workers = 2: four processes, the two delivery ones at ``delivery_nice``; a committed message is
    handed to its delivery process at once (the queue scan runs only every 10 minutes here), and a killed
    process of either kind is restarted without losing what was accepted."""
    with Relayd(
        tmp_path,
        routes={"example.test": sink.port},
        server_extra="workers = 2\ndelivery_nice = 7",
        scan_interval="10m",
    ) as relayd:
        assert relayd.proc is not None
        assert wait_until(lambda: len(_children(relayd.proc.pid)) == 4)  # type: ignore[union-attr]
        nices = _children(relayd.proc.pid)
        assert sorted(nices.values()) == [0, 0, 7, 7]
        for i in range(20):
            code, _ = relayd.submit(message(f"handoff {i}"), to=[f"h{i}@example.test"])
            assert code == 250
        # well within the 10 minutes before a scan (under a loaded suite, 10 s was short)
        assert wait_until(lambda: sink.handler.count() == 20, timeout=60)

        # kill -9 one delivery process and one submission process; the supervisor starts them again
        delivery = next(pid for pid, n in nices.items() if n == 7)
        submission = next(pid for pid, n in nices.items() if n == 0)
        os.kill(delivery, signal.SIGKILL)
        os.kill(submission, signal.SIGKILL)
        accepted = 0
        for i in range(20):  # meanwhile the other shard's processes take the connections
            try:
                code, _ = relayd.submit(message(f"during restart {i}"), to=[f"r{i}@example.test"])
            except (smtplib.SMTPException, OSError):
                continue
            accepted += code == 250
        assert wait_until(
            lambda: (
                len(_children(relayd.proc.pid)) == 4  # type: ignore[union-attr]
                and delivery not in _children(relayd.proc.pid)  # type: ignore[union-attr]
                and submission not in _children(relayd.proc.pid)
            ),  # type: ignore[union-attr]
            timeout=20,
        )
        assert sorted(_children(relayd.proc.pid).values()) == [0, 0, 7, 7]
        # a restarted delivery process starts with a scan: whatever its shard accepted is delivered
        assert wait_until(lambda: sink.handler.count() == 20 + accepted, timeout=20)
        assert "delivery process" in relayd.log_text() and "restarting" in relayd.log_text()


def test_sighup_with_two_workers_reaches_the_delivery_processes(
    tmp_path: Path, sink: Sink, sink2: Sink
) -> None:
    """The routes are the delivery processes' part of the config: after a reload the mail goes to the new
    route, whichever shard accepted it."""
    with Relayd(tmp_path, routes={"example.test": sink.port}, server_extra="workers = 2") as relayd:
        assert relayd.proc is not None
        assert relayd.submit(message("before"), to=["a@example.test"])[0] == 250
        assert wait_until(lambda: sink.handler.count() == 1)
        old_route = f'"example.test" = "127.0.0.1:{sink.port}"'
        text = relayd.config.read_text()
        assert old_route in text
        relayd.config.write_text(text.replace(old_route, f'"example.test" = "127.0.0.1:{sink2.port}"'))
        relayd.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: relayd.log_text().count("reloaded") == 4)  # 2 shards x 2 processes
        for i in range(10):
            assert relayd.submit(message(f"after {i}"), to=[f"b{i}@example.test"])[0] == 250
        assert wait_until(lambda: sink2.handler.count() == 10)
        assert sink.handler.count() == 1
