"""Fail on import cycles between MergeArena's modules: ``python scripts/check_import_cycles.py [ROOT]``.

A cycle makes a module's behaviour depend on which of its members was imported first, and it hides
a concept without one home (two modules that each need the other are one module, or share a third).
This checker reads the source with `ast` (nothing is imported, so it runs before any dependency is
installed) and builds the graph of imports between the modules under `PACKAGES`:

* ``import a.b`` and ``from a.b import c`` are edges to ``a.b`` (and to ``a.b.c`` when that is a
  module); a package's ``__init__`` that runs on the way is not counted, since Python resolves a
  partially imported package without trouble;
* imports inside functions and under ``if TYPE_CHECKING:`` count too: a lazy import is still a
  dependency, only deferred;
* ``importlib.import_module("a.b")`` with a literal name counts as an import of ``a.b``.

`ALLOWED` lists the edges designed to close a loop; every cycle left once they are removed is
printed (one line each, its modules in import order) and the exit status is 1.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

PACKAGES = ("bench", "defenses", "attacks", "merges", "tasks", "leaderboard")

ALLOWED: frozenset[tuple[str, str]] = frozenset({
    # The registry imports the index of built-in plugins on first lookup, by name; the index imports
    # the registry to fill it. Designed: it keeps `import bench.registry` cheap (DESIGN §2).
    ("bench.registry", "bench.builtins"),
})

Graph = dict[str, set[str]]


def module_files(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` file under the packages in ``root``."""
    out: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute module a (possibly relative) ``from ... import`` names."""
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    keep = len(parts) - node.level + (1 if is_package else 0)
    base = parts[:keep]
    return ".".join([*base, node.module] if node.module else base)


def imported_names(module: str, tree: ast.AST, is_package: bool) -> Iterator[str]:
    """Every module name ``tree`` imports, wherever the import statement sits."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(module, node, is_package)
            yield target
            yield from (f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and _is_import_module(node.func):
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                yield arg.value


def _is_import_module(func: ast.expr) -> bool:
    if isinstance(func, ast.Attribute):
        return func.attr == "import_module" and isinstance(func.value, ast.Name) and func.value.id == "importlib"
    return isinstance(func, ast.Name) and func.id in ("import_module", "__import__")


def import_graph(root: Path, packages: Iterable[str] = PACKAGES) -> Graph:
    """Module -> the modules of the same packages it imports."""
    files = module_files(root, packages)
    graph: Graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        names = imported_names(module, tree, path.name == "__init__.py")
        graph[module] = {name for name in names if name in files and name != module}
    return graph


def cycles(graph: Graph, allowed: frozenset[tuple[str, str]] = ALLOWED) -> list[list[str]]:
    """The cycles left after removing the ``allowed`` edges: for each module on one, the shortest cycle
    through it (each cycle once, starting at its first module in name order).

    Not every elementary cycle (there can be exponentially many), but every module on a cycle appears
    in the output, and one cut per printed cycle leaves none.
    """
    edges = {m: sorted(t for t in targets if (m, t) not in allowed) for m, targets in graph.items()}
    found: set[tuple[str, ...]] = set()
    for component in _components(edges):
        if len(component) < 2:
            continue
        for module in component:
            cycle = _shortest_cycle(edges, module, set(component))[:-1]
            first = cycle.index(min(cycle))
            found.add((*cycle[first:], *cycle[:first]))
    return sorted([*cycle, cycle[0]] for cycle in found)


def _components(edges: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components (Tarjan, iterative: module graphs can be deep)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(edges.get(start, ())))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges.get(child, ()))))
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
                out.append(sorted(component))
    return out


def _shortest_cycle(edges: dict[str, list[str]], start: str, component: set[str]) -> list[str]:
    """The shortest path ``start -> ... -> start`` inside ``component`` (breadth first)."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in edges.get(node, ()):
                if child not in component:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if child not in parents:
                    parents[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"{start} is in a strongly connected component but on no cycle")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0]) if args else Path(__file__).resolve().parent.parent
    packages = tuple(args[1:]) or PACKAGES
    graph = import_graph(root, packages)
    found = cycles(graph)
    for cycle in found:
        print("import cycle: " + " -> ".join(cycle))
    if found:
        print(f"{len(found)} import cycle(s) among {len(graph)} modules; break each one (move the shared "
              "concept to its own module), or, if it is designed, add the closing edge to ALLOWED with a reason.")
        return 1
    print(f"no import cycles among {len(graph)} modules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
