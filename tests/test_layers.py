"""The package's shape: no import cycle anywhere (imports inside functions count), and no file
long enough to hold two concepts. docs/ARCHITECTURE.md, "Layers", draws the layers that
pyproject.toml's import-linter contracts enforce; this checks what a layers contract cannot
see, a cycle between two modules of one layer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp")

ROOT = Path(__file__).resolve().parent.parent
# The longest a file may grow before it is split by concept.
MAX_LINES = {".py": 500, ".cu": 700, ".cuh": 700, ".cpp": 700, ".h": 700}


def _cycles(adjacency: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(adjacency):
        if root in index:
            continue
        work = [(root, iter(sorted(adjacency[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(adjacency[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package():
    graph = grimp.build_graph("ftkernels")
    modules = {m for m in graph.modules if m == "ftkernels" or m.startswith("ftkernels.")}
    adjacency = {m: graph.find_modules_directly_imported_by(m) & modules - {m} for m in modules}
    assert len(modules) > 30  # the whole package was found, not an empty graph
    assert _cycles(adjacency) == []


def _source_files():
    for top in ("python", "triton_kernels", "csrc", "tests", "benchmarks"):
        for path in sorted((ROOT / top).rglob("*")):
            if path.suffix in MAX_LINES and path.is_file() and "__pycache__" not in path.parts:
                yield path


@pytest.mark.skipif(not (ROOT / "csrc").is_dir(), reason="needs the source tree")
def test_no_file_is_too_long():
    too_long = {}
    for path in _source_files():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES[path.suffix]:
            too_long[str(path.relative_to(ROOT))] = n
    assert too_long == {}


@pytest.mark.skipif(not (ROOT / "triton_kernels").is_dir(), reason="needs the source tree")
def test_triton_kernels_import_only_their_common_helpers_and_the_formats():
    # ftkernels.triton_kernels is a namespace package, which import-linter does not see.
    allowed_relative = {(1, "common"), (2, "_formats")}
    allowed_absolute = {"__future__", "contextlib", "functools", "math", "numpy", "torch", "triton"}
    for path in sorted((ROOT / "triton_kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert (node.level, node.module) in allowed_relative, (
                    f"{path.name}: from {'.' * node.level}{node.module}"
                )
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                for name in names:
                    assert name.split(".")[0] in allowed_absolute, f"{path.name}: import {name}"
