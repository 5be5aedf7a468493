"""Real peers for end-to-end tests: the relayd daemon as a subprocess, and receiving SMTP servers.

Everything listens on 127.0.0.1 with ports chosen by the kernel. The receiving sink is a real aiosmtpd server
in a thread whose replies can be scripted per recipient; Postfix's ``smtp-sink`` is started as a process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as AioSMTP
from aiosmtpd.smtp import Envelope, Session

from relayd.core.passwords import hash_password

PASSWORD = "s3cret-Passw0rd"
# hash once per test session: scrypt is slow on purpose
PASSWORD_HASH = hash_password(PASSWORD, n=2**12)
RELAYD = [sys.executable, "-m", "relayd"]


#: ports this process handed out: the kernel may give a port just closed to the next bind to port 0, and
#: a daemon given the same port for two listeners fails to start ("address already in use")
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now on 127.0.0.1, never one this process handed out before."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_for_port(port: int, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


def wait_until(pred: Callable[[], bool], timeout: float = 20.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


# --- receiving side -----------------------------------------------------------------------------------------


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    peer: str


@dataclass
class SinkHandler:
    """Accepts everything unless a reply is scripted: ``script[address]`` is a list of replies used in order
    (the last one repeats), given at RCPT for that recipient."""

    script: dict[str, list[str]] = field(default_factory=dict)
    messages: list[Received] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_RCPT(
        self, server: AioSMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        with self.lock:
            n = self.attempts.get(address, 0)
            self.attempts[address] = n + 1
            replies = self.script.get(address)
        if replies:
            reply = replies[min(n, len(replies) - 1)]
            if not reply.startswith("250"):
                return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: AioSMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.original_content, bytes)
        with self.lock:
            self.messages.append(
                Received(
                    str(envelope.mail_from),
                    list(envelope.rcpt_tos),
                    envelope.original_content,
                    str(session.peer[0]) if isinstance(session.peer, tuple) else str(session.peer),
                )
            )
        return "250 2.0.0 OK: stored"

    def count(self) -> int:
        with self.lock:
            return len(self.messages)


@dataclass
class TlsRecorder:
    """aiosmtpd hooks of an MX sink that offers STARTTLS: whether each MAIL FROM came over TLS, and each
    delivered recipient with whether its DATA did (the transport-security tests read both)."""

    mail_from: list[bool] = field(default_factory=list)
    delivered: list[tuple[str, bool]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_MAIL(
        self, server: AioSMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        with self.lock:
            self.mail_from.append(session.ssl is not None)
        envelope.mail_from = address
        return "250 2.1.0 OK"

    async def handle_DATA(self, server: AioSMTP, session: Session, envelope: Envelope) -> str:
        with self.lock:
            self.delivered.append((envelope.rcpt_tos[0], session.ssl is not None))
        return "250 2.0.0 OK"


class _ClosingController(Controller):
    """aiosmtpd's Controller, remembering its sessions so that stopping closes their sockets.

    ``Controller.stop`` stops the loop and cancels the tasks, but leaves the transports of connections
    still open (relayd pools its connections to a sink) for the garbage collector, whose
    ``ResourceWarning`` then fails whichever test happens to be running."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sessions: list[AioSMTP] = []

    def factory(self) -> AioSMTP:
        smtp = super().factory()
        self.sessions.append(smtp)
        return smtp

    def stop(self, no_assert: bool = False) -> None:
        done = threading.Event()

        def close_all() -> None:
            for smtp in self.sessions:
                transport = smtp.transport
                if transport is not None:
                    transport.abort()
            done.set()

        if self._thread is not None and self.loop.is_running():
            self.loop.call_soon_threadsafe(close_all)
            done.wait(5)
        super().stop(no_assert)


class Sink:
    """An aiosmtpd receiving server on 127.0.0.1 in a thread."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.handler = SinkHandler()
        self.port = free_port()
        self.controller = _ClosingController(self.handler, hostname=host, port=self.port, decode_data=False)

    def __enter__(self) -> Sink:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()

    @property
    def messages(self) -> list[Received]:
        with self.handler.lock:
            return list(self.handler.messages)


class PostfixSink:
    """Postfix's ``smtp-sink``, dumping every message to a file of its own."""

    def __init__(self) -> None:
        # smtp-sink drops to user nobody when run as root, so the dump dir can't live under pytest's 0700 tmp
        self.dir = Path(tempfile.mkdtemp(prefix="relayd-smtp-sink-"))
        os.chmod(self.dir, 0o777)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PostfixSink:
        exe = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        cmd = [exe, "-d", f"{self.dir}/%M.", f"127.0.0.1:{self.port}", "100"]
        if os.geteuid() == 0:
            cmd[1:1] = ["-u", "nobody"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, proc=self.proc)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def dumps(self) -> list[bytes]:
        return [p.read_bytes() for p in sorted(self.dir.iterdir()) if p.is_file()]


# --- relayd -------------------------------------------------------------------------------------------------


def config_text(
    tmp: Path,
    *,
    port: int,
    routes: dict[str, int] | None = None,
    extra: str = "",
    submission_extra: str = "",
    queue_extra: str = "",
    retry_schedule: str = '["1s"]',
    scan_interval: str = "0.2s",
    accounts: str | None = None,
    server_extra: str = "",
    http_port: int = 0,
    inbound_port: int = 0,
    store: str | None = None,
) -> str:
    routes = routes or {}
    route_items = ", ".join(f'"{dom}" = "127.0.0.1:{p}"' for dom, p in routes.items())
    if accounts is None:
        accounts = f"""
[accounts.acme]
password_hash = "{PASSWORD_HASH}"
domains = ["acme.example.test"]
imprint = "ACME Ltd, 1 Test Street"

[accounts.other]
password_hash = "{PASSWORD_HASH}"
domains = ["other.example.test"]
"""
    return f"""
[server]
hostname = "relayd.test"
secret_file = "{tmp}/secret.key"
{server_extra}

[submission]
listen = ["127.0.0.1:{port}"]
{submission_extra}

[inbound]
listen = ["127.0.0.1:{inbound_port}"]
domains = ["bounces.example.test"]

[http]
listen = "127.0.0.1:{http_port}"
public_url = "http://127.0.0.1:{http_port}"

[store]
{store or f'path = "{tmp}/relayd.db"'}

[queue]
path = "{tmp}/queue"
retry_schedule = {retry_schedule}
scan_interval = "{scan_interval}"
{queue_extra}

[delivery]
mode = "routes"
routes = {{ {route_items} }}
connect_timeout = "5s"
command_timeout = "30s"
{extra}
{accounts}
"""


class Relayd:
    """``relayd serve`` as a real process, with a config written to a temp dir."""

    def __init__(self, tmp: Path, **config: Any) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.http_port = free_port()
        self.inbound_port = free_port()
        self.config = tmp / "relayd.toml"
        self.config.write_text(
            config_text(
                tmp, port=self.port, http_port=self.http_port, inbound_port=self.inbound_port, **config
            )
        )
        self.log = tmp / "relayd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env: dict[str, str] = {}

    def start(self) -> Relayd:
        logf = self.log.open("ab")
        self.proc = subprocess.Popen(
            [*RELAYD, "serve", "--config", str(self.config)],
            stdout=logf,
            stderr=logf,
            cwd=self.tmp,
            env={**os.environ, **self.env},
        )
        logf.close()
        # the listeners bind one after another: a test may talk to any of them as soon as start() returns
        for port in (self.port, self.inbound_port, self.http_port):
            wait_for_port(port, proc=self.proc)
        return self

    def kill(self) -> None:
        """``kill -9``: no clean-up of any kind."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> int:
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # never leave a running process behind for the garbage collector to find
            self.proc.wait(10)
            raise
        finally:
            self.proc = None

    def __enter__(self) -> Relayd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.kill()

    def smtp(self) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.port, timeout=30)

    def submit(
        self, msg: bytes, *, to: list[str], sender: str = "app@acme.example.test", user: str = "acme"
    ) -> tuple[int, bytes]:
        """AUTH + one transaction; returns the final reply to DATA (or the first refusal)."""
        with self.smtp() as s:
            s.login(user, PASSWORD)
            code, resp = s.mail(sender)
            if code != 250:
                return code, resp
            for rcpt in to:
                code, resp = s.rcpt(rcpt)
                if code != 250:
                    return code, resp
            return s.data(msg)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*RELAYD, *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            cwd=self.tmp,
            timeout=60,
        )

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def message(
    subject: str = "hello",
    body: str = "Hello there.\r\n",
    *,
    msgid: str | None = None,
    sender: str = "app@acme.example.test",
) -> bytes:
    """A plain message; ``sender`` is the header From, which must be a domain of the submitting account."""
    msgid = msgid or f"<{time.time_ns()}.{os.getpid()}@acme.example.test>"
    return (
        f"From: App <{sender}>\r\nTo: Bob <bob@example.test>\r\nSubject: {subject}\r\n"
        f"Message-ID: {msgid}\r\nDate: Mon, 23 Nov 2026 12:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}"
    ).encode()


ADDED_FIELDS = (
    b"received",
    b"dkim-signature",
    b"list-unsubscribe",
    b"list-unsubscribe-post",
    b"feedback-id",
    b"x-relayd-id",
)


def split_fields(header_block: bytes) -> list[bytes]:
    """Header fields with their folded continuation lines, byte-exact, CRLF kept."""
    fields: list[bytes] = []
    for line in header_block.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line + b"\r\n"
        else:
            fields.append(line + b"\r\n")
    return fields


def split_delivered(data: bytes) -> tuple[dict[str, list[bytes]], bytes, bytes]:
    """(the fields relayd adds, by lower-case name; every other header field as delivered; the body)."""
    head, _, body = data.partition(b"\r\n\r\n")
    added: dict[str, list[bytes]] = {}
    kept = b""
    for hfield in split_fields(head + b"\r\n"):
        name = hfield.split(b":", 1)[0].strip().lower()
        if name in ADDED_FIELDS and not (name == b"dkim-signature" and b"d=app-signed" in hfield):
            added.setdefault(name.decode(), []).append(hfield)
        else:
            kept += hfield
    return added, kept, body


def strip_trace(data: bytes) -> bytes:
    """Remove the Received header relayd adds (the first header, with its folded continuation lines)."""
    assert data.startswith(b"Received: "), data[:80]
    lines = data.split(b"\r\n")
    i = 1
    while lines[i][:1] in (b" ", b"\t"):
        i += 1
    return b"\r\n".join(lines[i:])


@contextlib.contextmanager
def running(*things: Any) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for t in things:
            stack.enter_context(t)
        yield


# --- helpers for policy end-to-end tests (tests/test_policy_e2e.py and friends) -----------------------------


@dataclass
class Transaction:
    """Every reply of one SMTP transaction: per recipient at RCPT, then DATA (None if DATA was not sent)."""

    rcpt: dict[str, tuple[int, str]]
    data: tuple[int, str] | None

    @property
    def queue_id(self) -> str:
        assert self.data is not None and self.data[0] == 250, self.data
        return self.data[1].rsplit(" ", 1)[1]


def submit_each(
    relayd: Relayd,
    msg: bytes,
    *,
    to: list[str],
    sender: str = "app@acme.example.test",
    user: str = "acme",
) -> Transaction:
    """AUTH + one transaction that goes on past refused recipients (``Relayd.submit`` stops at the first);
    DATA is sent when at least one recipient was accepted."""
    with relayd.smtp() as s:
        s.login(user, PASSWORD)
        code, resp = s.mail(sender)
        assert code == 250, (code, resp)
        rcpt = {}
        for address in to:
            code, resp = s.rcpt(address)
            rcpt[address] = (code, resp.decode())
        if not any(code == 250 for code, _ in rcpt.values()):
            return Transaction(rcpt, None)
        code, resp = s.data(msg)
        return Transaction(rcpt, (code, resp.decode()))


def cli_json(relayd: Relayd, *args: str) -> list[dict[str, Any]]:
    """Run ``relayd ARGS --json --config ...``; one JSON object per output line (DESIGN.md)."""
    out = relayd.cli(*args, "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
