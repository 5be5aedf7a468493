"""SMTP over a raw socket, for tests and benchmarks that must send what no client library would.

Why not smtplib: hostile-client tests (and bench/hostile.py, which measures the same attacks) send half
commands, pipelined garbage and slow drips, from chosen source addresses, and read replies as they come.
"""

from __future__ import annotations

import base64
import socket
import time


def connect(port: int, source: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
    sock.settimeout(timeout)
    return sock


def replies(sock: socket.socket, count: int = 1, timeout: float = 10.0) -> list[str]:
    """Up to ``count`` complete replies (the last line of each), fewer if the server closes first."""
    sock.settimeout(timeout)
    buf = b""
    done: list[str] = []
    deadline = time.monotonic() + timeout
    while len(done) < count and time.monotonic() < deadline:
        while b"\r\n" in buf and len(done) < count:
            line, buf = buf.split(b"\r\n", 1)
            if line[3:4] != b"-":
                done.append(line.decode("utf-8", "replace"))
        if len(done) >= count:
            break
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        buf += chunk
    return done


def closed(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True when the server has closed the connection (after any replies still in flight)."""
    sock.settimeout(timeout)
    try:
        while chunk := sock.recv(65536):
            del chunk
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def auth_plain(user: str, password: str) -> bytes:
    return b"AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()) + b"\r\n"


def ehlo(sock: socket.socket) -> None:
    assert replies(sock)[0].startswith("220")
    sock.sendall(b"EHLO hostile.test\r\n")
    assert replies(sock)[0].startswith("250")


def nested_mime(depth: int) -> bytes:
    body = b"Content-Type: text/plain\r\n\r\nhello\r\n"
    for i in range(depth):
        body = b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n%s--b%d--\r\n' % (
            i,
            i,
            body,
            i,
        )
    return (
        b"From: App <app@acme.example.test>\r\nTo: bob@example.test\r\nSubject: nest\r\nMIME-Version: 1.0\r\n"
        + (body)
    )
