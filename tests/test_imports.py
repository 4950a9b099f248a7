"""The package's import graph has no cycles (docs/architecture.md: arrows point down the layers).

The graph is read from the source with `ast`, so every import counts: module level, inside
functions (the lazy ones that hide a cycle from a plain `import deit.x`) and under
`TYPE_CHECKING`. An edge goes to the module a statement names: `from deit import data` is
`deit.data`, `from deit.export import CONFIG` is `deit.export`. Parent packages are not edges
(`deit/__init__.py` loads its names lazily, by string).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "deit"


def _modules() -> dict[str, Path]:
    """`{"deit.model": path, "deit.data": path/__init__.py, ...}`: every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """`{module: the package's modules it imports}`, every import statement in the file."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolved against this module's package
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join([*pkg, base] if base else pkg)
                # `from pkg import sub` names a module; `from mod import obj` the module itself.
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                    for a in node.names
                ]
            for target in targets:
                # `import deit.data.config` runs the module, the nearest one in the package.
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target != "deit":
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle `[a, b, ..., a]`, or None (depth-first search, colouring nodes)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_walk_sees_lazy_and_type_checking_imports(tmp_path):
    graph = import_graph()
    assert "deit.model" in graph and "deit.data" in graph and "deit.data.index" in graph
    # cli imports the run layer inside its command functions only.
    assert "deit.run" in graph["deit.cli"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])
