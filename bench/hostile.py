"""Hostile clients against a real relayd: what each abuse is answered, how long it takes, and the
peak RSS of the relayd process while it lasts.

    .venv/bin/python bench/hostile.py [--connections 2000] [--big-mb 20] [--dsn-only] [--dsn-copies 5]

Peak RSS is the kernel's ``VmHWM`` of the relayd process, reset before each step by writing 5 to
``/proc/PID/clear_refs`` (Linux >= 4.0), so each row shows the peak of that step alone; "base" is the RSS
just before it. Connections come from 127.0.0.3 onwards, 100 per address (the per-IP limit), and the
legitimate client from 127.0.0.2.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import resource
import smtplib
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.adversarial import adversarial_dsn
from tests.harness import PASSWORD, Relayd, Sink, message
from tests.rawsmtp import auth_plain, closed, connect, ehlo, nested_mime, replies

GOOD = "127.0.0.2"


def status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) // 1024  # MiB
    return out


def reset_peak(pid: int) -> None:
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def submit(port: int, msg: bytes, source: str = GOOD, timeout: float = 120) -> tuple[str, float]:
    t0 = time.monotonic()
    with smtplib.SMTP("127.0.0.1", port, timeout=timeout, source_address=(source, 0)) as s:
        s.login("acme", PASSWORD)
        s.mail("app@acme.example.test")
        s.rcpt("bob@example.test")
        code, text = s.data(msg)
    return f"{code} {text.decode()[:60]}", time.monotonic() - t0


def big_message(mb: int, *, text: bool) -> bytes:
    head = (
        b"From: App <app@acme.example.test>\r\nTo: bob@example.test\r\nSubject: big\r\nMIME-Version: 1.0\r\n"
    )
    if text:  # one base64 text/plain part: the footer rewrite has to look inside it
        b64 = base64.encodebytes(b"hello world " * (mb * 1_000_000 // 12)).replace(b"\n", b"\r\n")
        return (
            head
            + b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + b64
        )
    b64 = base64.encodebytes(os.urandom(mb * 1_000_000)).replace(b"\n", b"\r\n")
    return head + (
        b'Content-Type: multipart/mixed; boundary="XX"\r\n\r\n--XX\r\nContent-Type: text/plain\r\n\r\nhi\r\n'
        b"--XX\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + b64
        + b"--XX--\r\n"
    )


def raw_session(port: int, payload: bytes, expect: int, *, auth: bool = False, mail: bool = False) -> str:
    with connect(port, timeout=60) as sock:
        ehlo(sock)
        if auth:
            sock.sendall(auth_plain("acme", PASSWORD))
            replies(sock)
        if mail:
            sock.sendall(b"MAIL FROM:<app@acme.example.test>\r\n")
            replies(sock)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(payload)
        got = replies(sock, expect, timeout=60)
        end = "closed" if closed(sock, 0.5) else "open"
    firsts = sorted({r[:9] for r in got})
    return f"{len(got)} replies ({', '.join(firsts)}), last {got[-1][:40]!r}, {end}"


#: Diagnostic-Code of the adversarial DSN: 64 KB, the longest line the inbound listener takes (64 KiB)
DSN_SIZE = 65_000


def report_session(port: int, raw: bytes, timeout: float) -> tuple[str, float]:
    """One DSN from ``<>`` to ``postmaster@`` (no token needed); its DATA reply and how long it took."""
    t0 = time.monotonic()
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=timeout) as s:
            s.ehlo("mx.hostile.example")
            s.mail("")
            s.rcpt("postmaster@bounces.example.test")
            code, text = s.data(raw)
        outcome = f"{code} {text.decode(errors='replace')[:60]}"
    except (OSError, smtplib.SMTPException) as exc:
        outcome = f"no reply ({type(exc).__name__}: {exc})"[:80]
    return outcome, time.monotonic() - t0


def adversarial_dsn_step(relayd: Relayd, copies: int, timeout: float) -> list[str]:
    """``copies`` adversarial DSNs sent at once while a normal client submits in a loop until every one
    is answered (or ``timeout`` passes); the report lines to print."""
    raw = adversarial_dsn(DSN_SIZE).replace(b"\n", b"\r\n")
    results: list[tuple[str, float]] = []
    senders = [
        threading.Thread(target=lambda: results.append(report_session(relayd.inbound_port, raw, timeout)))
        for _ in range(copies)
    ]
    t0 = time.monotonic()
    for sender in senders:
        sender.start()
    times: list[float] = []
    failed: list[str] = []
    while any(sender.is_alive() for sender in senders):
        try:
            times.append(submit(relayd.port, message(), timeout=60)[1])
        except (OSError, smtplib.SMTPException) as exc:
            failed.append(type(exc).__name__)
        time.sleep(0.02)
    for sender in senders:
        sender.join()
    lines = [
        f"adversarial DSN to postmaster@: {copies} copies at once, {len(raw):,} bytes each (Diagnostic-Code "
        f"'550 ' + 'mailbox exceeded ' * {DSN_SIZE // 17:,}), all answered in {time.monotonic() - t0:.1f} s"
    ]
    lines += [f"  inbound reply after {seconds:7.2f} s: {outcome}" for outcome, seconds in sorted(results)]
    if times:
        lines.append(
            f"  normal client meanwhile: {len(times)} submissions, 250 in "
            f"{statistics.median(times) * 1000:.0f} ms median, {max(times) * 1000:.0f} ms max"
            + (f"; {len(failed)} failed ({', '.join(sorted(set(failed)))})" if failed else "")
        )
    else:
        lines.append(f"  normal client meanwhile: no 250 at all ({len(failed)} submissions failed)")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--big-mb", type=int, default=20)
    parser.add_argument("--dsn-only", action="store_true", help="run only the adversarial DSN step")
    parser.add_argument("--dsn-copies", type=int, default=5, help="adversarial DSNs sent at once")
    parser.add_argument(
        "--report-timeout", type=float, default=600, help="seconds each DSN sender waits for its reply"
    )
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, args.connections * 2 + 1000)), hard))
    extra = (
        f"max_connections = {args.connections + 1000}\nmax_connections_per_ip = 100\nmax_recipients = 1000\n"
        f'command_timeout = "120s"\nmax_message_size = "{args.big_mb * 2}MB"\n'
    )
    rows: list[tuple[str, str, float, dict[str, int], dict[str, int]]] = []
    with Sink() as sink, tempfile.TemporaryDirectory() as tmp:
        relayd = Relayd(Path(tmp), routes={"example.test": sink.port}, submission_extra=extra)
        with relayd:
            assert relayd.proc is not None
            pid = relayd.proc.pid
            submit(relayd.port, message())  # warm up
            time.sleep(0.5)
            dsn_lines = adversarial_dsn_step(relayd, args.dsn_copies, args.report_timeout)
            if args.dsn_only:
                print("\n" + "\n".join(dsn_lines))
                return 0

            def step(name: str, fn: Callable[[], str]) -> None:
                base = status(pid)
                reset_peak(pid)
                t0 = time.monotonic()
                outcome = fn()
                rows.append((name, outcome, time.monotonic() - t0, base, status(pid)))

            # --- slowloris: hold the connections, then time a real client ---
            held: list[socket.socket] = []
            good_times: list[float] = []

            def hold() -> str:
                sources = [f"127.0.0.{3 + i // 100}" for i in range(args.connections)]
                for i, source in enumerate(sources):
                    sock = connect(relayd.port, source)
                    held.append(sock)
                    assert replies(sock)[0].startswith("220")
                    if i % 2:
                        sock.sendall(b"EHL")  # slow: never finishes its command
                with connect(relayd.port, sources[0]) as extra_sock:
                    refused = replies(extra_sock)[0][:9]
                for _ in range(5):
                    good_times.append(submit(relayd.port, message())[1])
                return f"{len(held)} held, 101st from one address: {refused!r}"

            step(f"{args.connections} idle/slow connections", hold)
            for sock in held:
                sock.close()
            time.sleep(1.0)

            n = 1000
            step("pipelining: 1,000 NOOP in one write", lambda: raw_session(relayd.port, b"NOOP\r\n" * n, n))
            step(
                "pipelining: 1,000 MAIL w/o AUTH",
                lambda: raw_session(relayd.port, b"MAIL FROM:<a@acme.example.test>\r\n" * n, n),
            )
            rcpts = b"".join(b"RCPT TO:<r%d@example.test>\r\n" % i for i in range(10_000))
            step(
                "10,000 RCPT (max_recipients=1000)",
                lambda: raw_session(relayd.port, rcpts, 10_000, auth=True, mail=True),
            )
            step(
                "1 MB command line",
                lambda: raw_session(relayd.port, b"NOOP " + b"x" * 1_000_000 + b"\r\nNOOP\r\n", 2),
            )
            bomb = b"".join(b"X-Bomb-%d: %d\r\n" % (i, i) for i in range(10_000)) + message()
            step("10,000 header fields", lambda: submit(relayd.port, bomb)[0])
            step(
                "1 MB header line",
                lambda: submit(relayd.port, b"X-Long: " + b"a" * 1_000_000 + b"\r\n" + message())[0],
            )
            step("MIME nested 100 deep", lambda: submit(relayd.port, nested_mime(100))[0])
            step("MIME nested 1000 deep", lambda: submit(relayd.port, nested_mime(1000))[0])
            for text in (False, True):
                msg = big_message(args.big_mb, text=text)
                label = f"{args.big_mb} MB decoded base64 {'text/plain part' if text else 'attachment'}"
                stall: list[float] = []

                def big(msg: bytes = msg, stall: list[float] = stall) -> str:
                    result: list[str] = []
                    worker = threading.Thread(target=lambda: result.append(submit(relayd.port, msg)[0]))
                    worker.start()
                    time.sleep(0.3)
                    while worker.is_alive():  # a small submission's time while the big one is processed
                        stall.append(submit(relayd.port, message(), source="127.0.0.9")[1])
                    worker.join()
                    return f"{result[0]} ({len(msg) / 1e6:.1f} MB on the wire)"

                step(label, big)
                rows.append(
                    (f"  small submission during it (max of {len(stall)})", "", max(stall or [0.0]), {}, {})
                )

    print(f"\nrelayd hostile-client figures ({args.connections} connections; RSS in MiB)\n")
    print(f"{'step':44} {'s':>7} {'base':>6} {'peak':>6}  outcome")
    for name, outcome, seconds, base, after in rows:
        b = str(base.get("VmRSS", "")) if base else ""
        p = str(after.get("VmHWM", "")) if after else ""
        print(f"{name:44} {seconds:7.2f} {b:>6} {p:>6}  {outcome}")
    print(
        f"\nlegitimate client with {args.connections} connections held: 250 in "
        f"{statistics.median(good_times) * 1000:.0f} ms median, {max(good_times) * 1000:.0f} ms max (5 runs)"
    )
    print("\n" + "\n".join(dsn_lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
