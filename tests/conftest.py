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
