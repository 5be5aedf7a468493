"""Shared fixtures: every test that needs a relayd gets its own process, state dir and loopback ports."""

from __future__ import annotations

import contextlib
import itertools
import os
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


_e2e_databases = itertools.count()


@contextlib.contextmanager
def _scratch_store(backend: str) -> Iterator[str | None]:
    """``None`` for SQLite (the harness's default), else a ``[store]`` body for a fresh PostgreSQL
    database."""
    if backend == "sqlite":
        yield None
        return
    from tests.conftest_pg import PostgresUnavailable, scratch_database

    try:
        cm = scratch_database(f"relayd_e2e_{os.getpid()}_{next(_e2e_databases)}")
        dsn = cm.__enter__()
    except PostgresUnavailable as exc:
        pytest.fail(f"PostgreSQL tests need a server: {exc}", pytrace=False)
    try:
        yield f'backend = "postgresql"\ndsn = "{dsn}"'
    finally:
        cm.__exit__(None, None, None)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def store_config(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """The end-to-end policy and feedback suites run once per store backend (module scope: one
    daemon per backend). Pass it to ``Relayd(..., store=store_config)``."""
    with _scratch_store(request.param) as config:
        yield config


@pytest.fixture
def fresh_store_config(store_config: str | None) -> Iterator[str | None]:
    """The same backend as ``store_config``, but an empty store: for a test that starts its own daemon."""
    with _scratch_store("sqlite" if store_config is None else "postgresql") as config:
        yield config
