"""The shape of the package: layers whose imports only point down, no import cycle, small modules.

docs/ARCHITECTURE.md describes the layers; the contract itself is ``[tool.importlinter]`` in pyproject.toml,
run here with import-linter, so a change that imports upward (even inside a function) fails the suite. The
cycle check is grimp's graph (what import-linter builds on) walked for strongly connected components.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "relayd"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
MAX_LINES = 600


def lint_imports(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), str(cwd / "pyproject.toml"), "--no-cache"],
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(pythonpath)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_layer_contract_is_kept() -> None:
    proc = lint_imports(ROOT, ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 kept, 0 broken" in proc.stdout


@pytest.mark.parametrize(
    ("module", "upward"),
    [
        # a low layer naming a higher one, at module level and inside a function
        ("core/errors.py", "from relayd.store import models as _m\n"),
        ("policy/pipeline.py", "def _late() -> None:\n    from relayd.queue import shards  # noqa: F401\n"),
        # siblings of one layer are independent
        ("feedback/reputation.py", "from relayd.desk import inbox as _i\n"),
        ("mail/listid.py", "from relayd.reports.dsn import limits as _l\n"),
    ],
)
def test_an_upward_import_breaks_the_contract(tmp_path: Path, module: str, upward: str) -> None:
    """The contract is not vacuous: a copy of the package with one upward import fails it."""
    shutil.copytree(PACKAGE, tmp_path / "relayd", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "relayd" / module
    target.write_text(target.read_text() + "\n" + upward)
    proc = lint_imports(tmp_path, tmp_path)
    assert proc.returncode != 0, proc.stdout
    assert "BROKEN" in proc.stdout


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's, iterative: no recursion limit)."""
    adjacency = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in sorted(graph.modules)}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    for root in adjacency:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            successors = adjacency[node]
            if i < len(successors):
                work.append((node, i + 1))
                nxt = successors[i]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return found


def test_no_import_cycle_between_modules() -> None:
    graph = grimp.build_graph("relayd", include_external_packages=False)
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for name in ("p", "p.a", "p.b", "p.c"):
        graph.add_module(name)
    graph.add_import(importer="p.a", imported="p.b")
    graph.add_import(importer="p.b", imported="p.a")
    graph.add_import(importer="p.c", imported="p.a")
    assert _cycles(graph) == [["p.a", "p.b"]]


def test_no_module_over_the_line_limit() -> None:
    sizes = {
        str(path.relative_to(ROOT)): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")
    }
    assert {path: n for path, n in sizes.items() if n > MAX_LINES} == {}


def test_the_top_of_the_package_holds_only_packages() -> None:
    loose = sorted(
        p.name
        for p in PACKAGE.iterdir()
        if p.suffix == ".py" and p.name not in ("__init__.py", "__main__.py")
    )
    assert loose == []
    layers = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    expected = "app cli config core desk edge feedback mail policy queue reports store"
    assert layers == expected.split()


def test_tests_never_import_the_benchmarks() -> None:
    """One direction only: bench/ may use the tests' support modules (harness, raw SMTP, Postfix instance),
    tests never import bench/, so a benchmark can change without touching what the suite checks."""
    importers = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(name == "bench" or name.startswith("bench.") for name in names):
                importers.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert importers == []
