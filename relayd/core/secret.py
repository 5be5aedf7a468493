"""The server secret: the HMAC key behind VERP, unsubscribe and trace tokens.

Generated on first start (32 random bytes, mode 0600) so a fresh install needs no manual step; refused when
group- or world-readable, because anyone who can read it can forge unsubscribes and bounces.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from relayd.core.errors import ConfigError


def exposed(st_mode: int) -> int | None:
    """The permission bits of a file with ``st_mode`` when group or others have any, else ``None``: the
    one rule for every secret file (server secret, DKIM keys, password files, webhook secrets, TLS keys)."""
    return stat.S_IMODE(st_mode) if st_mode & (stat.S_IRWXG | stat.S_IRWXO) else None


def exposed_mode(path: Path) -> int | None:
    """:func:`exposed` for ``path`` (``None`` when only the owner has any permission, or the file cannot be
    stat'ed: the caller's read reports that).

    Every secret file is held to the server secret's rule: a password file, a webhook secret or a TLS key
    that others can read is a credential others can use, so relayd refuses to start with one."""
    try:
        return exposed(path.stat().st_mode)
    except OSError:
        return None


def load_or_create(path: Path) -> bytes:
    try:
        st = path.stat()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_bytes(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.hex().encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        return key
    if exposed(st.st_mode) is not None:
        raise ConfigError([f"{path}: server.secret_file: readable by group or others; chmod 600 it"])
    text = path.read_bytes().strip()
    try:
        key = bytes.fromhex(text.decode())
    except ValueError:
        key = text
    if len(key) < 16:
        raise ConfigError([f"{path}: server.secret_file: secret shorter than 16 bytes"])
    return key
