"""Every fuzz target in tests/fuzz/ runs a few seconds under atheris with a fixed seed and must not crash.

The six targets run as parallel processes (atheris ends its process when done), so the whole module takes
about ``SECONDS`` plus start-up. Without atheris, each target is driven by Hypothesis instead, derandomised.
Longer runs by hand: tests/fuzz/README.md.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.targets import TARGETS, seeds

SECONDS = 4
ROOT = Path(__file__).resolve().parents[1]
HAVE_ATHERIS = importlib.util.find_spec("atheris") is not None


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, subprocess.Popen[str]]]:
    """Start every target at once; each test below waits for its own."""
    base = tmp_path_factory.mktemp("fuzz")
    procs = {}
    for name in TARGETS:
        corpus = base / name
        corpus.mkdir()
        for i, seed in enumerate(seeds(name)):
            (corpus / f"seed-{i}").write_bytes(seed)
        procs[name] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.fuzz",
                name,
                f"-max_total_time={SECONDS}",
                "-seed=1",
                "-timeout=20",
                "-rss_limit_mb=2048",
                f"-artifact_prefix={base}/{name}-",
                str(corpus),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:  # a target whose test ran elsewhere (another xdist worker) was never read
            proc.stdout.close()


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_atheris_target_does_not_crash(name: str, runs: dict[str, subprocess.Popen[str]]) -> None:
    assert HAVE_ATHERIS, "atheris is a test dependency (pyproject [test]); pip install -e '.[test]'"
    out, _ = runs[name].communicate(timeout=SECONDS * 10 + 60)
    tail = "\n".join(out.splitlines()[-40:])
    assert runs[name].returncode == 0, f"fuzz target {name} crashed:\n{tail}"
    assert "Done " in out, tail  # it really ran (libFuzzer's closing line: "Done N runs in S second(s)")


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_hypothesis_target_does_not_crash(name: str) -> None:
    target = TARGETS[name]

    @settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.sampled_from(seeds(name)), st.binary(max_size=4096)))
    def run(data: bytes) -> None:
        target(data)

    run()
