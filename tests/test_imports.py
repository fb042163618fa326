"""No import circles inside ``app/`` and ``workers/``: the modules stand on one-way floors.

The graph is read from the source with ``ast``, so nothing is imported to draw it. Every
``import`` statement counts: at the top of a module, inside a function (a lazy import still ties
the two modules together: moving one breaks the other) and under ``if TYPE_CHECKING:`` (it never
runs, but a reader and a drawing of the imports see it all the same). ``from pkg import name`` counts as an import of
``pkg.name`` when that is a module of the tree, else of ``pkg``; a package's ``__init__`` counts as
the package itself, so ``import app.web.server`` does not also tie ``app.web`` to its submodule.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "workers")


def _modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of app/ and workers/ it imports."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    pkg = ".".join(base + ([node.module] if node.module else []))
                else:
                    pkg = node.module or ""
                for alias in node.names:
                    sub = f"{pkg}.{alias.name}"
                    targets.append(sub if sub in modules else pkg)
            for target in targets:
                # the deepest module of the tree that the dotted name lies in
                parts = target.split(".")
                while parts and ".".join(parts) not in modules:
                    parts.pop()
                name = ".".join(parts)
                if name and name != mod:
                    graph[mod].add(name)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _ties(graph: dict[str, set[str]], comp: list[str]) -> str:
    return "; ".join(f"{a} -> {b}" for a in comp for b in sorted(graph[a]) if b in comp)


def test_no_import_circle_in_app_or_workers():
    graph = import_graph()
    found = circles(graph)
    assert not found, "import circles:\n" + "\n".join(_ties(graph, c) for c in found)


def test_the_circle_finder_sees_a_lazy_import_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]
    assert "app.cli" in import_graph()  # the graph is read from the tree
