"""Shared fixtures: every test that needs a relayd gets its own process, state dir and loopback ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Sink


@pytest.fixture
def sink() -> Iterator[Sink]:
    with Sink() as s:
        yield s


@pytest.fixture
def sink2() -> Iterator[Sink]:
    with Sink() as s:
        yield s


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """DSN of a fresh PostgreSQL database for this run, dropped at the end (see tests/conftest_pg.py).

    Fails (never skips) when no server can be had: CI runs PostgreSQL, so a skip would hide a broken backend.
    """
    from tests.conftest_pg import PostgresUnavailable, scratch_database

    try:
        cm = scratch_database()
        dsn = cm.__enter__()
    except PostgresUnavailable as exc:
        pytest.fail(f"PostgreSQL tests need a server: {exc}", pytrace=False)
    try:
        yield dsn
    finally:
        cm.__exit__(None, None, None)
