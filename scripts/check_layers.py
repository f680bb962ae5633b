"""The layering rule, checked: ``impls`` never imports ``harness``, and no two modules import each other in a cycle.

    python scripts/check_layers.py [ROOT]

Reads every ``.py`` under ROOT/harness and ROOT/impls (ROOT: this repository) with ``ast``, so every import counts,
also those inside functions or ``if`` blocks. An import names the module it loads: ``import a.b`` and ``from a import
b`` (when ``a/b.py`` or ``a/b/`` exists) point at ``a.b``, ``from a import name`` at ``a`` (its ``__init__``);
relative imports are resolved; anything outside the two packages is ignored. Prints one line per offending import
and per cycle (the modules in import order, each import's file and line) and exits 1, else one ``ok`` line and 0.
Standard library only, so it runs before anything is installed.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("harness", "impls")
LOWER, UPPER = "impls", "harness"  # the lower layer must never import the upper one


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    where: str  # path:line of the import statement


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the checked packages (a package is its ``__init__.py``)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _resolve_relative(importer: str, is_package: bool, level: int, module: str | None) -> str:
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imported_modules(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool,
                     modules: dict[str, Path]) -> list[str]:
    """The checked modules one import statement loads (see the module docstring for what an import names)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        target = _resolve_relative(importer, is_package, node.level, node.module) if node.level else node.module
        names = [f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target for alias in node.names]
    return sorted({name for name in names if name in modules})


def import_edges(root: Path, modules: dict[str, Path]) -> list[Edge]:
    """Every import from one checked module of another."""
    edges = []
    for importer, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for imported in imported_modules(node, importer, path.name == "__init__.py", modules):
                    if imported != importer:
                        edges.append(Edge(importer, imported, f"{path.relative_to(root)}:{node.lineno}"))
    return edges


def layer_violations(edges: list[Edge]) -> list[str]:
    return [f"{LOWER} -> {UPPER}: {e.importer} imports {e.imported} ({e.where})" for e in edges
            if e.importer.split(".")[0] == LOWER and e.imported.split(".")[0] == UPPER]


def cycles(edges: list[Edge]) -> list[list[Edge]]:
    """One cycle (as its edges) through each group of modules that import each other (Tarjan's strongly connected
    components, iteratively)."""
    graph: dict[str, dict[str, Edge]] = {}
    for edge in edges:
        graph.setdefault(edge.importer, {}).setdefault(edge.imported, edge)
        graph.setdefault(edge.imported, {})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(component)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return [_cycle_in(component, graph) for component in components]


def _cycle_in(component: set[str], graph: dict[str, dict[str, Edge]]) -> list[Edge]:
    """A shortest cycle through the component's first module (breadth-first inside the component)."""
    start = min(component)
    came_from: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child, edge in sorted(graph[node].items()):
                if child == start:
                    path = [edge]
                    while path[0].importer != start:
                        path.insert(0, came_from[path[0].importer])
                    return path
                if child in component and child not in came_from:
                    came_from[child] = edge
                    following.append(child)
        frontier = following
    raise AssertionError(f"{sorted(component)} is not strongly connected")


def describe_cycle(cycle: list[Edge]) -> str:
    modules = " -> ".join([cycle[0].importer, *(edge.imported for edge in cycle)])
    return f"cycle: {modules} ({', '.join(edge.where for edge in cycle)})"


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else Path(__file__).resolve().parent.parent
    modules = module_names(root)
    edges = import_edges(root, modules)
    problems = layer_violations(edges) + [describe_cycle(cycle) for cycle in cycles(edges)]
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    print(f"ok: {len(modules)} modules, {len(edges)} imports between them; {LOWER} never imports {UPPER}, "
          "no import cycles")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
