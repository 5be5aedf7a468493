"""Memory per large message: peak RSS of relayd over its idle RSS while big messages go through the whole
pipeline (SMTP accept, queue, render + DKIM + footer per recipient, delivery to a sink on 127.0.0.1).

    .venv/bin/python bench/bigmail.py [--workers 1] [--size-mb 20] [--small-mb 2] [--concurrent 20]

Each message is a multipart/mixed with a small text/plain part (it gets the footer) and a base64
``application/octet-stream`` attachment filling the rest of the size. RSS is summed over the relayd process
tree (the main process and, with ``--workers`` >= 2, its accepting and delivering workers). Before each
scenario the kernel's peak (``VmHWM``) of every process is reset by writing 5 to ``/proc/PID/clear_refs``;
the "peak" is the sum of the per-process ``VmHWM`` after the scenario (an upper bound: the processes may
peak at different times), and "sampled" the largest sum of ``VmRSS`` seen every 10 ms. After the
measurement every delivered copy is parsed with the email package: the attachment must decode to the bytes
sent and the text part must carry the footer (the account's imprint); one copy's DKIM signature is checked
with dkimpy.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import email
import email.policy
import email.utils
import os
import smtplib
import sys
import tempfile
import threading
import time
from email.message import EmailMessage
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relayd.mail.dkim import keygen
from tests.harness import PASSWORD, Relayd, Sink, message, wait_until

SENDER = "app@acme.example.test"
IMPRINT = "ACME Ltd, 1 Test Street"
MB = 1_000_000


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    out = [pid]
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                out.extend(tree_pids(int(child)))
    return out


def vm(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of one process, in KiB (empty if it is gone)."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0])
    return out


def role(pid: int) -> str:
    """A short name for one process of the tree: ``pid`` and, for a child, ``<parent`` pid."""
    try:
        parent = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
    except (OSError, IndexError):
        return str(pid)
    return f"{pid}<{parent}"


def tree_sum(root: int, key: str) -> int:
    return sum(vm(pid).get(key, 0) for pid in tree_pids(root))


def reset_peaks(root: int) -> None:
    for pid in tree_pids(root):
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/clear_refs").write_text("5")


class Sampler:
    """Every 10 ms: the sum of ``VmRSS`` over the tree, and each process's last ``VmHWM``."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.max_rss = 0
        self.hwm: dict[int, int] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            total = 0
            for pid in tree_pids(self.root):
                v = vm(pid)
                total += v.get("VmRSS", 0)
                if "VmHWM" in v:
                    self.hwm[pid] = max(self.hwm.get(pid, 0), v["VmHWM"])
            self.max_rss = max(self.max_rss, total)
            self.stop.wait(0.01)

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        for pid in tree_pids(self.root):  # the final peaks, after the last sample
            v = vm(pid)
            if "VmHWM" in v:
                self.hwm[pid] = max(self.hwm.get(pid, 0), v["VmHWM"])


def big_message(size: int, tag: str, *, dated: bool = True) -> tuple[bytes, bytes]:
    """A ``size``-byte (on the wire) multipart/mixed: a small text part and a base64 attachment; returns
    (message, attachment bytes). ``dated``: with the Date and Message-ID fields a mail library writes
    (without them relayd adds both, which copies the message once more)."""
    fields = f"Date: {email.utils.formatdate()}\r\nMessage-ID: <{tag}.{time.time_ns()}@acme.example.test>\r\n"
    head = (
        f"From: App <{SENDER}>\r\nTo: bob@example.test\r\nSubject: invoice {tag}\r\n"
        + (fields if dated else "")
        + "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="=_bigmail"\r\n\r\n'
        "--=_bigmail\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        f"Dear customer,\r\n\r\nplease find invoice {tag} attached.\r\n\r\n"
        "--=_bigmail\r\nContent-Type: application/pdf; name=invoice.pdf\r\n"
        "Content-Disposition: attachment; filename=invoice.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    ).encode()
    tail = b"--=_bigmail--\r\n"
    # base64 lines of 76 characters + CRLF carry 57 bytes each
    raw_len = max(57, (size - len(head) - len(tail)) * 57 // 78)
    attachment = os.urandom(raw_len)
    b64 = base64.encodebytes(attachment).replace(b"\n", b"\r\n")
    return head + b64 + tail, attachment


def submit(port: int, msg: bytes, rcpt: str) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=600) as s:
        s.login("acme", PASSWORD)
        s.mail(SENDER)
        s.rcpt(rcpt)
        code, text = s.data(msg)
    return f"{code} {text.decode(errors='replace')[:50]}"


def check_copy(data: bytes, attachment: bytes) -> list[str]:
    """Problems with one delivered copy (empty: complete)."""
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    problems = []
    parts = [p for p in msg.walk() if not p.is_multipart()]
    texts = [p for p in parts if p.get_content_type() == "text/plain"]
    files = [p for p in parts if p.get_content_type() == "application/pdf"]
    if not texts or IMPRINT not in texts[0].get_content():
        problems.append("no footer in the text part")
    if len(files) != 1 or files[0].get_payload(decode=True) != attachment:
        problems.append("attachment not intact")
    return problems


def verify_dkim(data: bytes, record: str) -> str:
    import dkim as dkimpy

    name, _, txt = record.partition(" IN TXT ")
    value = "".join(part for part in txt.split('"')[1::2]).encode()

    def dnsfunc(qname: bytes, timeout: int = 5) -> bytes | None:
        return value if qname == name.encode() else None

    return "pass" if dkimpy.verify(data, dnsfunc=dnsfunc) else "FAIL"


def scenario(
    relayd: Relayd, sink: Sink, label: str, msgs: list[tuple[bytes, bytes]], record: str, target: float
) -> None:
    assert relayd.proc is not None
    root = relayd.proc.pid
    before = len(sink.messages)
    time.sleep(1.0)
    idle = tree_sum(root, "VmRSS")
    idle_by_pid = {pid: vm(pid).get("VmRSS", 0) for pid in tree_pids(root)}
    reset_peaks(root)
    results: list[str] = []
    t0 = time.monotonic()
    with Sampler(root) as sampler:
        threads = [
            threading.Thread(
                target=lambda m=m, i=i: results.append(submit(relayd.port, m, f"r{i}@example.test"))
            )
            for i, (m, _) in enumerate(msgs)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        delivered = wait_until(lambda: len(sink.messages) >= before + len(msgs), timeout=600, interval=0.05)
        time.sleep(0.3)
    seconds = time.monotonic() - t0
    peak = sum(sampler.hwm.values())
    total = sum(len(m) for m, _ in msgs)
    over = (peak - idle) * 1024
    sampled_over = (sampler.max_rss - idle) * 1024
    per_process = ", ".join(
        f"{role(pid)} {(hwm - idle_by_pid.get(pid, 0)) * 1024 / MB:.0f}"
        for pid, hwm in sorted(sampler.hwm.items())
        if hwm - idle_by_pid.get(pid, 0) > 1024
    )
    got = {r.rcpt_tos[0]: r.data for r in sink.messages[before:]}
    problems: list[str] = []
    for i, (_, attachment) in enumerate(msgs):
        data = got.get(f"r{i}@example.test")
        if data is None:
            problems.append(f"r{i}: not delivered")
            continue
        problems += [f"r{i}: {p}" for p in check_copy(data, attachment)]
    first = got.get("r0@example.test")
    dkim = verify_dkim(first, record) if first is not None else "-"
    replies = sorted(set(r[:3] for r in results))
    print(
        f"{label}: {len(msgs)} x {len(msgs[0][0]) / MB:.2f} MB = {total / MB:.1f} MB on the wire, replies "
        f"{','.join(replies)}, {seconds:.1f} s\n"
        f"  idle RSS {idle / 1024:.0f} MiB; peak over idle {over / MB:.0f} MB (sum of VmHWM), "
        f"sampled {sampled_over / MB:.0f} MB (max sum of VmRSS)\n"
        f"  per process, peak over its idle RSS (MB): {per_process}\n"
        f"  ratio to size {over / total:.2f}x (sampled {sampled_over / total:.2f}x), target <= {target}x: "
        f"{'met' if over / total <= target else 'NOT met'}\n"
        f"  delivered {'yes' if delivered and not problems else 'NO'} ({len(got)}/{len(msgs)}), copies "
        f"{'complete (attachment intact, footer present)' if not problems else '; '.join(problems[:3])}, "
        f"DKIM {dkim}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=1, help="relayd [server] workers (default 1, the default)")
    ap.add_argument("--size-mb", type=float, default=20, help="size of the one big message (default 20)")
    ap.add_argument("--small-mb", type=float, default=2, help="size of each concurrent message (default 2)")
    ap.add_argument("--concurrent", type=int, default=20, help="how many concurrent messages (default 20)")
    ap.add_argument("--only", choices=("a", "b"), help="run only one scenario")
    ap.add_argument("--undated", action="store_true", help="messages without Date and Message-ID")
    ap.add_argument(
        "--mmap-threshold",
        type=int,
        help="run relayd with MALLOC_MMAP_THRESHOLD_ set to this (glibc: fixed, not raised after each free)",
    )
    args = ap.parse_args()
    submission = (
        f'max_message_size = "{int(args.size_mb * 2)}MB"\ncommand_timeout = "600s"\n'
        "max_connections_per_ip = 1000\n"
    )
    with Sink() as sink, tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        key, record = keygen("acme.example.test", "big", "rsa", tmp / "dkim")
        dkim = (
            f'[[dkim]]\ndomain = "acme.example.test"\nselector = "big"\nkey_file = "{key}"\n'
            'algorithm = "rsa"\n'
        )
        relayd = Relayd(
            tmp,
            routes={"example.test": sink.port},
            submission_extra=submission,
            server_extra=f"workers = {args.workers}\n",
            extra=dkim,
        )
        if args.mmap_threshold:
            relayd.env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
        with relayd:
            assert relayd.proc is not None
            print(
                f"relayd: workers = {args.workers}, DKIM rsa-2048, footer + imprint; "
                f"{len(tree_pids(relayd.proc.pid))} processes; messages "
                f"{'without' if args.undated else 'with'} Date and Message-ID"
                + (f"; MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}" if args.mmap_threshold else "")
            )
            for i in range(3):  # warm up: load keys, open connections, start the workers
                submit(relayd.port, message(), f"warm{i}@example.test")
            wait_until(lambda: len(sink.messages) >= 3, timeout=60)
            if args.only in (None, "a"):
                msgs = [big_message(int(args.size_mb * MB), "a0", dated=not args.undated)]
                scenario(relayd, sink, "(a) one big message", msgs, record, 3.0)
            if args.only in (None, "b"):
                msgs = [
                    big_message(int(args.small_mb * MB), f"b{i}", dated=not args.undated)
                    for i in range(args.concurrent)
                ]
                scenario(relayd, sink, "(b) concurrent messages", msgs, record, 1.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
