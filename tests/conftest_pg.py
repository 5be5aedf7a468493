"""A throwaway PostgreSQL database for the store tests and ``bench/store_backends.py``.

Why a database per run (``relayd_test_<pid>``): runs of several engineers, or of CI jobs, on one cluster
never see each other's rows, and dropping it at the end leaves the cluster as it was. Inside it, each
contract test gets its own schema (``PostgresStore(dsn, schema=...)``), which is much cheaper than a
database per test.

Where the server comes from, in order:

* ``RELAYD_TEST_PG_ADMIN_DSN`` (e.g. ``postgresql://postgres:secret@127.0.0.1/postgres`` in CI): a role
  that may create databases; the test database is created and dropped through it.
* otherwise the local Debian cluster (``pg_ctlcluster 15 main``), started if it is down, administered as
  the ``postgres`` OS user through ``runuser ... psql`` (needs root), with a login role ``relayd_test``
  (password ``relayd_test``, loopback only: a test fixture, not a secret) owning the database.

Failure to get a server raises :class:`PostgresUnavailable` with what was tried; the pytest fixture turns
it into a failure, never a skip (CI provides PostgreSQL, so a silent skip would hide a broken backend).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Iterator

import asyncpg

ADMIN_DSN_ENV = "RELAYD_TEST_PG_ADMIN_DSN"
CLUSTER = ("15", "main")
HOST, PORT = "127.0.0.1", 5432
ROLE = PASSWORD = "relayd_test"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server to test against; the message says what was tried and how to fix it."""


def _port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1.0):
        return True
    return False


def _run(cmd: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _psql(sql: str) -> str:
    """Run ``sql`` as the ``postgres`` superuser over the local socket; raise PostgresUnavailable."""
    if shutil.which("runuser") is None or shutil.which("psql") is None:
        raise PostgresUnavailable("runuser/psql not found; set " + ADMIN_DSN_ENV)
    done = _run(["runuser", "-u", "postgres", "--", "psql", "-X", "-qAt", "-v", "ON_ERROR_STOP=1", "-c", sql])
    if done.returncode != 0:
        raise PostgresUnavailable(f"psql as postgres failed ({sql!r}): {done.stderr.strip()}")
    return done.stdout


def ensure_local_cluster() -> None:
    """Start the local cluster if nothing listens on 127.0.0.1:5432; wait up to 30 s for it."""
    if _port_open(HOST, PORT):
        return
    version, name = CLUSTER
    if shutil.which("pg_ctlcluster") is None:
        raise PostgresUnavailable(
            f"PostgreSQL is not running on {HOST}:{PORT} and pg_ctlcluster is not installed; "
            f"start a server or set {ADMIN_DSN_ENV}"
        )
    done = _run(["pg_ctlcluster", version, name, "start"])
    deadline = time.monotonic() + 30
    while not _port_open(HOST, PORT):
        if time.monotonic() > deadline:
            raise PostgresUnavailable(
                f"PostgreSQL is not running on {HOST}:{PORT} and `pg_ctlcluster {version} {name} start` "
                f"did not start it (exit {done.returncode}: {done.stderr.strip() or done.stdout.strip()})"
            )
        time.sleep(0.2)


def _with_database(dsn: str, database: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    return urllib.parse.urlunsplit(parts._replace(path="/" + database))


async def _admin(dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def _drop_stale_local() -> None:
    """Drop ``relayd_test_<pid>`` databases whose pytest process is gone (a run killed before cleanup)."""
    for name in _psql("SELECT datname FROM pg_database WHERE datname ~ '^relayd_test_[0-9]+$'").split():
        pid = int(name.rsplit("_", 1)[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            _psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except PermissionError:  # somebody else's live process
            pass


@contextlib.contextmanager
def scratch_database(name: str | None = None) -> Iterator[str]:
    """Create a fresh database, yield a DSN for it, drop it afterwards (connections are forced off)."""
    database = name or f"relayd_test_{os.getpid()}"
    admin = os.environ.get(ADMIN_DSN_ENV)
    if admin:
        try:
            asyncio.run(_admin(admin, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
            asyncio.run(_admin(admin, f'CREATE DATABASE "{database}"'))
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            raise PostgresUnavailable(f"{ADMIN_DSN_ENV}: cannot create {database}: {exc}") from exc
        try:
            yield _with_database(admin, database)
        finally:
            asyncio.run(_admin(admin, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        return
    ensure_local_cluster()
    _psql(
        f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}') THEN "
        f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'; END IF; END $$"
    )
    _drop_stale_local()
    _psql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    _psql(f'CREATE DATABASE "{database}" OWNER {ROLE}')
    try:
        yield f"postgresql://{ROLE}:{PASSWORD}@{HOST}:{PORT}/{database}"
    finally:
        _psql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
