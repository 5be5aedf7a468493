"""``python -m tests.fuzz TARGET [libFuzzer options] [CORPUS_DIR...]``: fuzz one target with atheris.

relayd's modules are imported under ``atheris.instrument_imports()`` so libFuzzer sees their coverage; an
empty or missing corpus directory is seeded from :func:`tests.fuzz.targets.seeds`. A crash (an exception or
a failed property) writes ``crash-<sha1>`` in the working directory and exits non-zero; replay it with
``python -m tests.fuzz TARGET crash-<sha1>``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["relayd", "tests.fuzz"]):
    from tests.fuzz import targets


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in targets.TARGETS:
        names = ", ".join(targets.TARGETS)
        sys.exit(f"usage: python -m tests.fuzz TARGET [libFuzzer options] [CORPUS_DIR...]\ntargets: {names}")
    name = argv.pop(1)
    for arg in argv[1:]:
        path = Path(arg)
        if not arg.startswith("-") and (not path.exists() or (path.is_dir() and not any(path.iterdir()))):
            path.mkdir(parents=True, exist_ok=True)
            for i, seed in enumerate(targets.seeds(name)):
                (path / f"seed-{i}").write_bytes(seed)
    atheris.Setup(argv, targets.TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
