"""Postfix's C ``smtp-sink`` as the benchmark's sink: the same interface as bench/keeping_sink.KeepingSink.

Why C: the sink shares the CPUs with the contenders, so it must cost little and the same per transaction
whoever sends it. A Python sink parses DATA line by line but takes BDAT chunks whole, which favours a
client that sends BDAT (relayd) over one that never does (Postfix). smtp-sink offers PIPELINING, 8BITMIME
and ENHANCEDSTATUSCODES, no CHUNKING, so both contenders end every message with ``<CRLF>.<CRLF>``.

Two modes, because writing each transaction to a file is not free: it costs smtp-sink ~0.16 ms of CPU per
transaction, and relayd makes one transaction per recipient where Postfix makes one per message, so dumps
during a measured run would charge relayd ten times Postfix's sink work in profile B.

- Plain (default), for measured runs: ``-c`` only. smtp-sink writes ``sess=N quit=N mesg=N\\r`` to stdout
  (a file here) whenever a session ends, a QUIT is executed or a final "." is received;
  :attr:`SmtpSink.messages` reads the last one (a seek and a 128-byte read), and :attr:`SmtpSink.last` is
  the file's mtime: the last write, at or just after the latest "." (a QUIT or a session end may follow it
  within the same poll). Recipients are not counted: the caller knows how many transactions each sender
  makes and waits for that many.
- Dumps (``dump=True``), for unmeasured checks: ``-d`` also writes each transaction to a file of its own
  in a tmpfs directory: created at MAIL, removed at RSET or when the transaction is aborted, closed once
  "." was received. The file starts with smtp-sink's own lines (``X-Client-Addr``, ``X-Mail-Args``, one
  ``X-Rcpt-Args`` per RCPT, a 3-line ``Received:``), then the message as received with LF line ends and
  dot-stuffing undone, then an empty line. :attr:`SmtpSink.recipients`, :attr:`SmtpSink.transactions` and
  :attr:`SmtpSink.last` take the files smtp-sink no longer holds open (so only completed transactions),
  count their ``X-Rcpt-Args`` lines, note their mtime (the arrival of the final "."), keep the message if
  asked to, and delete the file; each is counted exactly once.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

_RCPT = b"\nX-Rcpt-Args: "


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dumped_message(dump: bytes) -> bytes:
    """The message as the client sent it (CRLF line ends), from one ``-d`` dump file: what follows the
    3-line ``Received:`` header smtp-sink puts after its ``X-*`` lines, minus the empty line it appends."""
    at = dump.index(b"\nReceived: ") + 1 if not dump.startswith(b"Received: ") else 0
    for _ in range(3):
        at = dump.index(b"\n", at) + 1
    if not dump.endswith(b"\n\n"):
        raise ValueError("dump file does not end with the empty line smtp-sink appends")
    return dump[at:-1].replace(b"\n", b"\r\n")


class SmtpSink:
    def __init__(
        self, keep_dir: Path, *, port: int | None = None, dump: bool = False, max_sessions: int = 1000
    ) -> None:
        exe = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        self.port = port or _free_port()
        self.keep_dir = Path(keep_dir)
        self.keep_dir.mkdir(parents=True, exist_ok=True)
        shm = Path("/dev/shm")
        self.base = Path(tempfile.mkdtemp(prefix="relayd-sink-", dir=shm if shm.is_dir() else None))
        self.base.chmod(0o755)  # smtp-sink, as nobody, must reach the dump directory
        self.dump = dump
        self.dump_dir = self.base / "dump"
        self.dump_dir.mkdir()
        self.counter_file = self.base / "counters"
        cmd = [exe, "-c", "-a", "-C", "-F", "-N", "-h", "sink", "-m", str(max_sessions)]
        if dump:
            cmd += ["-d", f"{self.dump_dir}/t."]
        if os.geteuid() == 0:  # smtp-sink refuses to run as root: it drops to nobody, who writes the dumps
            shutil.chown(self.dump_dir, "nobody")
            cmd += ["-u", "nobody"]
        # backlog 1024: Postfix opens up to 100 smtp sessions at once, relayd's client as many as it likes
        cmd += [f"127.0.0.1:{self.port}", "1024"]
        with self.counter_file.open("wb") as out, (self.base / "stderr").open("wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        self._recipients = 0
        self._transactions = 0
        self._last = 0.0
        self._keep = 0
        self._tag = 0
        self._seq = 0
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"smtp-sink did not start: {self.stderr()}") from None
                time.sleep(0.05)

    def stderr(self) -> str:
        try:
            return (self.base / "stderr").read_text(errors="replace")[-500:]
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        """smtp-sink's process (one, event-driven): its CPU time is reported beside each contender's."""
        return self.proc.pid

    @property
    def messages(self) -> int:
        """Transactions completed (final "." received), from the last counter line: cheap, no scanning."""
        try:
            with self.counter_file.open("rb") as f:
                f.seek(max(0, self.counter_file.stat().st_size - 128))
                tail = f.read()
        except OSError:
            return self._transactions
        for part in reversed(tail.split(b"\r")[:-1]):  # the piece after the last \r may be unfinished
            k = part.rfind(b"mesg=")
            if k >= 0:
                return int(part[k + 5 :])
        return 0

    @property
    def recipients(self) -> int:
        """RCPTs of the completed transactions (a message to 10 recipients in one transaction counts 10).

        Only with dumps: in plain mode nothing records them, and a guess would hide a contender that drops
        recipients."""
        self._need_dumps("recipients")
        self._scan()
        return self._recipients

    @property
    def transactions(self) -> int:
        """Completed transactions counted from their dump files (with dumps only)."""
        self._need_dumps("transactions")
        self._scan()
        return self._transactions

    @property
    def last(self) -> float:
        """Wall time of the latest arrival: with dumps the mtime of the newest completed dump; plain, the
        mtime of the counter file (its last write: at or shortly after the latest final ".")."""
        if not self.dump:
            try:
                return self.counter_file.stat().st_mtime
            except OSError:
                return 0.0
        self._scan()
        return self._last

    def _need_dumps(self, what: str) -> None:
        if not self.dump:
            raise RuntimeError(f"smtp-sink runs without dumps: {what} are not recorded")

    def start_keeping(self, n: int, tag: int) -> None:
        """Keep the next ``n`` messages that complete from now on as ``<keep_dir>/<tag>-<seq>.eml``."""
        self._need_dumps("messages")
        self._scan()
        self._keep, self._tag, self._seq = n, tag, 0

    def kept(self, tag: int) -> list[Path]:
        if self.dump:
            self._scan()
        return sorted(self.keep_dir.glob(f"{tag}-*.eml"))

    def _open_dumps(self) -> set[str]:
        """Dump files smtp-sink holds open: transactions still in progress."""
        out: set[str] = set()
        fd_dir = f"/proc/{self.proc.pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            return out
        prefix = f"{self.dump_dir}/"
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if target.startswith(prefix):
                out.add(target[len(prefix) :])
        return out

    def _scan(self) -> None:
        try:
            names = os.listdir(self.dump_dir)  # before the fds: a file closed in between counts as done
        except OSError:
            return
        if not names:
            return
        busy = self._open_dumps()
        done: list[tuple[float, str, bytes]] = []
        for name in names:
            if name in busy:
                continue
            path = self.dump_dir / name
            try:
                mtime = path.stat().st_mtime
                data = path.read_bytes()
                path.unlink()
            except FileNotFoundError:  # an aborted transaction, removed by smtp-sink meanwhile
                continue
            done.append((mtime, name, data))
        done.sort()
        for mtime, _name, data in done:
            self._transactions += 1
            head = data[: data.find(b"\nReceived: ") + 1]
            self._recipients += head.count(_RCPT) + head.startswith(_RCPT[1:])
            self._last = max(self._last, mtime)
            if self._keep > 0:
                self._keep -= 1
                self._seq += 1
                (self.keep_dir / f"{self._tag}-{self._seq:06d}.eml").write_bytes(dumped_message(data))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.base, ignore_errors=True)
