"""The package's import graph has no cycle between modules, read statically from the source.

Every ``.py`` under ``opdkit/`` and under the plug-in folders that install inside it (the
``[tool.setuptools.package-dir]`` table of pyproject.toml: ``rewards/`` is ``opdkit.rewards``, ...)
is parsed with :mod:`ast`; nothing is imported. Imports inside functions count as much as
module-level ones: a lazy import only moves a cycle from import time to call time, and the two
modules still cannot be understood, tested or changed apart. Imports under ``if TYPE_CHECKING:``
do not count (they never run).

An import is an edge to the module it names, not to the packages above it: ``from opdkit.shapes
import vocab`` inside ``opdkit.shapes.detect`` is an edge to ``opdkit.shapes.vocab`` only. Python
does run ``opdkit/shapes/__init__.py`` first, but an ``__init__`` that imports its submodules
would then put every pair of siblings in a false cycle. ``from opdkit.shapes import load_split``
(a name, not a submodule) is an edge to ``opdkit.shapes`` itself, so a submodule that imports its
own package's ``__init__``, which imports that submodule back, is reported.
"""

from __future__ import annotations

import ast
import graphlib
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest depends on tomli below 3.11
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parents[1]

Graph = dict[str, set[str]]

# Cycles tolerated until their owners break them: each entry is one edge (importer, imported),
# taken out of the graph before the search, with a comment naming the cycle it breaks. None is
# left today. The test fails on an entry that names no edge, so the list cannot outlive a cycle.
ALLOWED_EDGES: frozenset[tuple[str, str]] = frozenset()


def package_roots(repo_root: Path) -> dict[str, Path]:
    """Import name -> source folder of every package root: ``opdkit`` and its installed plug-in folders."""
    with (repo_root / "pyproject.toml").open("rb") as fh:
        package_dir: dict[str, str] = tomllib.load(fh)["tool"]["setuptools"].get("package-dir", {})
    roots = {"opdkit": repo_root / "opdkit"}
    roots.update({name: repo_root / folder for name, folder in package_dir.items() if name.startswith("opdkit.")})
    return roots


def discover_modules(roots: dict[str, Path]) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the roots (``__init__`` names its package)."""
    modules: dict[str, Path] = {}
    for root_name, folder in roots.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((root_name, *parts))] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    """``TYPE_CHECKING`` or ``typing.TYPE_CHECKING``."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(nodes: Iterable[ast.AST]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement in or below ``nodes`` (functions and classes included) that can run."""
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _runtime_imports(node.orelse)  # the else branch is what runs
        else:
            yield from _runtime_imports(ast.iter_child_nodes(node))


def _known_prefix(name: str, modules: dict[str, Path]) -> str | None:
    """The longest leading part of ``name`` that is one of ``modules`` (``None``: not ours)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imported_modules(module: str, modules: dict[str, Path]) -> set[str]:
    """The modules of ``modules`` that ``module`` imports (its edges; itself excluded)."""
    path = modules[module]
    # the package a relative import counts from: an __init__ is its own package
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in _runtime_imports([ast.parse(path.read_text(encoding="utf-8"), filename=str(path))]):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import name`: the submodule pkg.name when there is one, else pkg itself
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for name in names:
            target = _known_prefix(name, modules)
            if target is not None and target != module:
                targets.add(target)
    return targets


def import_graph(repo_root: Path = REPO_ROOT) -> Graph:
    """Module -> the package modules it imports, over ``opdkit`` and its plug-in folders."""
    modules = discover_modules(package_roots(repo_root))
    return {module: imported_modules(module, modules) for module in modules}


def find_cycles(graph: Graph) -> list[list[str]]:
    """Cycles of ``graph`` as closed chains ``[a, b, ..., a]`` (``a`` imports ``b`` ...), sorted.

    :mod:`graphlib` reports one cycle at a time; the closing edge of each is taken out before
    looking again, so every cycle of the graph shares an edge with a reported one. Each chain
    starts at its smallest module name, so the report does not depend on the search order.
    """
    remaining = {module: set(targets) for module, targets in graph.items()}
    chains: list[list[str]] = []
    while True:
        try:
            graphlib.TopologicalSorter(remaining).prepare()
        except graphlib.CycleError as exc:
            # graphlib lists each node before the nodes that import it: reversed, it reads as imports
            loop = exc.args[1][::-1][:-1]
            remaining[loop[-1]].discard(loop[0])
            first = loop.index(min(loop))
            chains.append([*loop[first:], *loop[:first], loop[first]])
        else:
            return sorted(chains)


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph()
    stale = sorted(edge for edge in ALLOWED_EDGES if edge[1] not in graph.get(edge[0], set()))
    assert not stale, f"ALLOWED_EDGES names edges that no longer exist, remove them: {stale}"
    for importer, imported in ALLOWED_EDGES:
        graph[importer].discard(imported)
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(chain) for chain in cycles)


def test_the_graph_covers_the_plug_in_folders() -> None:
    graph = import_graph()
    for module in ("opdkit.cli", "opdkit.rewards.shapes", "opdkit.teachers.routers", "opdkit.benchmarks.shapes"):
        assert module in graph, module
    assert "opdkit.data.records" in graph["opdkit.data.sources"]


def test_the_prompts_package_does_not_reach_the_recipe() -> None:
    """``opdkit.recipe`` may import ``opdkit.data``; nothing in ``opdkit.data`` leads back to it."""
    graph = import_graph()
    reached: set[str] = set()
    todo = [m for m in graph if m == "opdkit.data" or m.startswith("opdkit.data.")]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(graph[module])
    assert "opdkit.recipe" not in reached


def _write(root: Path, files: dict[str, str]) -> Path:
    (root / "pyproject.toml").write_text('[tool.setuptools.package-dir]\n"opdkit.plug" = "plug"\n')
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_edges_name_modules_not_the_packages_above_them(tmp_path: Path) -> None:
    root = _write(
        tmp_path,
        {
            "opdkit/__init__.py": "",
            "opdkit/pkg/__init__.py": "from opdkit.pkg.a import f\nfrom . import b\n",
            # siblings: not a cycle through the package's __init__
            "opdkit/pkg/a.py": "from opdkit.pkg import b\ndef f():\n    from .b import g\n",
            "opdkit/pkg/b.py": "import opdkit.pkg.c\nimport json\n",
            "opdkit/pkg/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import opdkit.pkg\n",
            "plug/__init__.py": "",
            "plug/p.py": "from opdkit.pkg import f\nfrom ..pkg import c\n",
        },
    )
    assert import_graph(root) == {
        "opdkit": set(),
        "opdkit.pkg": {"opdkit.pkg.a", "opdkit.pkg.b"},
        "opdkit.pkg.a": {"opdkit.pkg.b"},
        "opdkit.pkg.b": {"opdkit.pkg.c"},
        "opdkit.pkg.c": set(),
        "opdkit.plug": set(),
        "opdkit.plug.p": {"opdkit.pkg", "opdkit.pkg.c"},
    }


def test_a_cycle_is_reported_as_a_chain_lazy_imports_included(tmp_path: Path) -> None:
    root = _write(
        tmp_path,
        {
            "opdkit/__init__.py": "",
            "opdkit/shapes/__init__.py": "from opdkit.shapes.detect import score\n",
            # a submodule importing its own package's __init__, which imports it back
            "opdkit/shapes/detect.py": "from opdkit.shapes import render\nfrom opdkit.shapes import palette\n",
            "opdkit/shapes/render.py": "",
            "opdkit/recipe.py": "def check():\n    from opdkit import prompts\n",
            "opdkit/prompts.py": (
                "import typing\nif typing.TYPE_CHECKING:\n    pass\nelse:\n    import opdkit.recipe\n"
            ),
        },
    )
    assert find_cycles(import_graph(root)) == [
        ["opdkit.prompts", "opdkit.recipe", "opdkit.prompts"],
        ["opdkit.shapes", "opdkit.shapes.detect", "opdkit.shapes"],
    ]
