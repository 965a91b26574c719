"""The product's import graph has no cycle, and no import is hidden below the code.

The graph is read from the source (AST), not from `sys.modules`: an import counts as an edge
wherever it stands, at module level, inside a function (the usual way a cycle is hidden), or
under `if TYPE_CHECKING:` (a type-only back reference is still a layer pointing the wrong
way). A module that calls `importlib.import_module` also depends on every project module whose
dotted name it holds as a string (a command table such as flows.cli's). A cycle means no
module of it can be read, tested or imported without the others, and an import-order bug is
one refactor away; the failure names every edge of one cycle with its file and line.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("flows", "tasks", "storage", "prompts", "deploy")


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    where: str  # path:line of the import


def module_files(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the packages."""
    out: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an import of `name` loads (its longest known prefix)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _from_base(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join([*package, *([node.module] if node.module else [])])


def import_edges(root: Path, packages: Iterable[str]) -> list[Edge]:
    modules = module_files(root, packages)
    edges: list[Edge] = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        rel = path.relative_to(root)
        targets: list[tuple[str | None, int]] = []
        dynamic = False
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets += [(_resolve(a.name, modules), node.lineno) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _from_base(module, path, node)
                for a in node.names:
                    # `from pkg import mod` loads pkg.mod; `from mod import name` loads mod
                    target = _resolve(f"{base}.{a.name}", modules) or _resolve(base, modules)
                    targets.append((target, node.lineno))
            elif isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                dynamic = dynamic or name == "import_module"
        if dynamic:
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    if node.value in modules:
                        targets.append((node.value, node.lineno))
        for target, line in targets:
            if target is not None and target != module:
                edges.append(Edge(module, target, f"{rel}:{line}"))
    return edges


def find_cycles(edges: Iterable[Edge]) -> list[list[Edge]]:
    """One cycle (as its edges, in order) per strongly connected component of the graph."""
    graph: dict[str, dict[str, Edge]] = {}
    for e in edges:
        graph.setdefault(e.source, {}).setdefault(e.target, e)
        graph.setdefault(e.target, {})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan; the graph has ~100 nodes, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles = []
    for comp in components:
        start = min(comp)
        # Shortest way back to `start` inside the component (breadth first).
        paths: dict[str, list[Edge]] = {start: []}
        todo = [start]
        found: list[Edge] | None = None
        while todo and found is None:
            v = todo.pop(0)
            for w, e in sorted(graph[v].items()):
                if w not in comp:
                    continue
                if w == start:
                    found = [*paths[v], e]
                    break
                if w not in paths:
                    paths[w] = [*paths[v], e]
                    todo.append(w)
        assert found is not None
        cycles.append(found)
    return cycles


def describe(cycle: list[Edge]) -> str:
    return " -> ".join([cycle[0].source, *(e.target for e in cycle)]) + "".join(
        f"\n    {e.source} imports {e.target} at {e.where}" for e in cycle
    )


def test_product_modules_import_no_cycle() -> None:
    edges = import_edges(REPO, PRODUCT)
    # The walk really read the product (46 modules, ~400 import edges when written).
    assert len(module_files(REPO, PRODUCT)) > 40 and len(edges) > 200
    cycles = find_cycles(edges)
    assert not cycles, "import cycles:\n" + "\n".join(describe(c) for c in cycles)


def test_no_late_imports_in_product_code() -> None:
    """`# noqa: E402` marks an import placed below code, to dodge a cycle or a slow import at
    the top; either belongs in the module structure, not in a suppression."""
    found = [
        f"{path.relative_to(REPO)}:{n}"
        for path in module_files(REPO, PRODUCT).values()
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if re.search(r"noqa:[^#]*\bE402\b", line)
    ]
    assert not found, "late imports (noqa: E402): " + ", ".join(found)


def test_stage_modules_import_no_prefect() -> None:
    """tasks/, storage/ and prompts/ never import Prefect, not even inside a function: the
    stages' Prefect tasks are thin wrappers in flows/stages.py, so every command that runs no
    flow (and every unit test of a stage) loads without it."""
    found = [
        f"{path.relative_to(REPO)}:{node.lineno}"
        for path in module_files(REPO, ("tasks", "storage", "prompts")).values()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Import | ast.ImportFrom)
        and any(
            n.split(".")[0] == "prefect"
            for n in (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
            )
        )
    ]
    assert not found, "Prefect imported outside flows/: " + ", ".join(found)


# -- the checker itself: it must see what it claims to see -----------------------------------


def _package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_cycle_through_a_function_level_import_is_found(tmp_path: Path) -> None:
    _package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg.b import f\n",
            "pkg/b.py": "def f() -> None:\n    from pkg import c\n",
            "pkg/c.py": "if True:\n    from . import a\n",
            "pkg/d.py": "import pkg.a\n",  # depends on the cycle, is not in it
        },
    )
    cycles = find_cycles(import_edges(tmp_path, ["pkg"]))
    assert len(cycles) == 1
    assert [e.source for e in cycles[0]] == ["pkg.a", "pkg.b", "pkg.c"]
    assert cycles[0][1].where == "pkg/b.py:2"
    assert "pkg.a -> pkg.b -> pkg.c -> pkg.a" in describe(cycles[0])


def test_type_checking_and_import_module_strings_are_edges(tmp_path: Path) -> None:
    _package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/cli.py": "import importlib\nMODULES = ('pkg.cmd',)\n"
            "def load(n: str) -> object:\n    return importlib.import_module(n)\n",
            "pkg/cmd.py": "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from pkg.cli import load\n",
            "pkg/other.py": "NAME = 'pkg.cmd'\n",  # a string without import_module: no edge
        },
    )
    edges = import_edges(tmp_path, ["pkg"])
    assert {(e.source, e.target) for e in edges} == {("pkg.cli", "pkg.cmd"), ("pkg.cmd", "pkg.cli")}
    assert len(find_cycles(edges)) == 1


def test_an_acyclic_graph_passes(tmp_path: Path) -> None:
    _package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/low.py": "X = 1\n",
            "pkg/mid.py": "from pkg.low import X\n",
            "pkg/top.py": "from pkg import low, mid\n",
        },
    )
    edges = import_edges(tmp_path, ["pkg"])
    assert {(e.source, e.target) for e in edges} == {
        ("pkg.mid", "pkg.low"),
        ("pkg.top", "pkg.low"),
        ("pkg.top", "pkg.mid"),
    }
    assert find_cycles(edges) == []
