"""A small filesystem to fill up: a tmpfs mounted for the test, and a balloon file that eats its free space.

Why a real small filesystem rather than fault injection inside relayd: "disk full" is an ENOSPC from the
kernel, at whatever write happens to need the next block -- a WAL frame, the ``-shm`` index, a checkpoint,
the store's events table -- and only a real filesystem gets all of those right at once. A tmpfs of a few
megabytes fills and empties in microseconds and needs no image file; the balloon (``fallocate``d, so it
takes real blocks) fills it to any level and gives the space back when removed, without restarting relayd.

Mounting needs ``CAP_SYS_ADMIN``: as root (CI and the dev container) the tmpfs is mounted directly. Without
it, :func:`unavailable` says why and the disk-full tests fail loudly rather than pretend.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
from pathlib import Path


def unavailable() -> str | None:
    """Why a tmpfs can't be mounted here, or None when it can."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root (CAP_SYS_ADMIN)"
    if not os.path.exists("/bin/mount") and not os.path.exists("/usr/bin/mount"):
        return "no mount(8)"
    return None


class SmallDisk:
    """A tmpfs of ``size`` bytes at ``path``, mounted on enter and unmounted on exit."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self.balloon = path / "balloon"

    def __enter__(self) -> SmallDisk:
        self.path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0755", "relayd-test", str(self.path)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:  # root without CAP_SYS_ADMIN (an unprivileged container), say
            raise RuntimeError(f"cannot mount a tmpfs at {self.path}: {done.stderr.strip()}")
        return self

    def __exit__(self, *exc: object) -> None:
        for _ in range(5):
            if subprocess.run(["umount", str(self.path)], capture_output=True).returncode == 0:
                return
            time.sleep(0.1)  # a relayd still closing its files
        # still busy (pytest's log capture can keep a sqlite3 error, and through its traceback a closed
        # connection's files, alive until the test report is done): detach now, freed on last close
        subprocess.run(["umount", "-l", str(self.path)], check=True, capture_output=True)

    def free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int = 0) -> int:
        """Grow the balloon until at most ``leave`` bytes are free (0: completely full); returns the free
        bytes left. Other writers race us, so the loop tops up until the target is met."""
        with self.balloon.open("ab") as f:
            for _ in range(100):
                want = self.free() - leave
                if want <= 0:
                    break
                size = f.seek(0, os.SEEK_END)
                try:
                    os.posix_fallocate(f.fileno(), size, want)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    # fallocate is all or nothing: take what is left a block at a time
                    self._write_until_full(f.fileno(), leave)
        return self.free()

    def _write_until_full(self, fd: int, leave: int) -> None:
        block = b"\0" * 4096
        while self.free() > leave:
            try:
                os.write(fd, block[: max(1, min(4096, self.free() - leave))])
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    return
                raise

    def drain(self) -> None:
        """Give the balloon's space back."""
        with contextlib.suppress(FileNotFoundError):
            self.balloon.unlink()
