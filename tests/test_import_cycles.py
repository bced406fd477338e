"""No import cycle among meshctl's modules, counting `if TYPE_CHECKING:` imports and imports
inside functions: the graph is read from the source with `ast`, not from what Python happens
to execute, so a cycle hidden behind a lazy or type-only import fails here too. A back-edge
is broken with a small `typing.Protocol` next to the module that needs it, or by moving the
shared thing to a module lower down."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "meshctl"


def module_files(package_root: Path) -> dict[str, tuple[Path, bool]]:
    """Every module under `package_root`: dotted name -> (file, whether it is a package's __init__)."""
    modules = {}
    for path in sorted(package_root.rglob("*.py")):
        parts = list(path.relative_to(package_root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        modules[".".join(parts)] = (path, is_package)
    return modules


def imported_modules(tree: ast.AST, module: str, is_package: bool, known: set[str] | frozenset[str]) -> set[str]:
    """The modules of `known` that `tree` imports anywhere (top level, functions, TYPE_CHECKING blocks).

    Relative imports are resolved against `module`; `from package import name` counts as an
    import of `package.name` when that is a module, else of `package`.
    """
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = "%s.%s" % (source, alias.name)
                found.add(submodule if submodule in known else source)
    return {name for name in found if name in known and name != module}


def import_graph(package_root: Path) -> dict[str, set[str]]:
    modules = module_files(package_root)
    known = frozenset(modules)
    return {
        name: imported_modules(ast.parse(path.read_text(), str(path)), name, is_package, known)
        for name, (path, is_package) in modules.items()
    }


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The cycles of `graph`: for each module on one, a shortest cycle through it, each as a path
    that starts and ends at its smallest member; without repeats, sorted."""
    cycles = set()
    for component in _strongly_connected(graph):
        for member in component:
            cycle = _shortest_cycle(graph, component, member)
            turn = cycle.index(min(cycle))
            cycles.add(tuple(cycle[turn:-1] + cycle[:turn + 1]))
    return sorted(list(cycle) for cycle in cycles)


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components that hold a cycle (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = lowlink[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = lowlink[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph.get(successor, ())))))
                    break
                if successor in on_stack:
                    lowlink[node] = min(lowlink[node], index[successor])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    lowlink[parent] = min(lowlink[parent], lowlink[node])
                if lowlink[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in graph.get(node, ()):
                        components.append(component)
    return components


def _shortest_cycle(graph: dict[str, set[str]], component: set[str], start: str) -> list[str]:
    """A shortest cycle from `start` back to it inside its strongly connected component (breadth-first)."""
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for successor in sorted(graph.get(node, ())):
                if successor == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), start]
                if successor in component and successor not in came_from:
                    came_from[successor] = node
                    following.append(successor)
        frontier = following
    raise AssertionError("%s is not a cycle" % sorted(component))


def test_the_cycle_finder_names_each_cycle_and_passes_a_dag() -> None:
    graph = {
        "a": {"b"},
        "b": {"c", "d"},
        "c": {"a"},  # a -> b -> c -> a
        "d": {"e"},
        "e": set(),
        "x": {"y"},
        "y": {"x", "e"},  # x -> y -> x
        "self": {"self"},
    }
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["self", "self"], ["x", "y", "x"]]
    # Two cycles through one module are both named, each once.
    assert find_cycles({"a": {"b", "c"}, "b": {"a"}, "c": {"a"}}) == [["a", "b", "a"], ["a", "c", "a"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_imports_are_read_from_every_place_and_resolved(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from . import leaf\n")
    (package / "sub" / "leaf.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from ..top import Thing\n"
        "def lazy():\n    import pkg.other\n"
        "from pkg.sub import leaf, name_in_init\n"
    )
    (package / "top.py").write_text("from pkg.sub.leaf import lazy\n")
    (package / "other.py").write_text("")
    graph = import_graph(package)
    assert graph == {
        "pkg": set(),
        "pkg.sub": {"pkg.sub.leaf"},
        "pkg.sub.leaf": {"pkg.top", "pkg.other", "pkg.sub"},
        "pkg.top": {"pkg.sub.leaf"},
        "pkg.other": set(),
    }
    assert find_cycles(graph) == [["pkg.sub", "pkg.sub.leaf", "pkg.sub"], ["pkg.sub.leaf", "pkg.top", "pkg.sub.leaf"]]


def test_meshctl_has_no_import_cycle() -> None:
    cycles = find_cycles(import_graph(PACKAGE_ROOT))
    assert not cycles, "import cycles (break each with a Protocol next to its user, or move the shared thing lower):\n" + "\n".join(
        " -> ".join(cycle) for cycle in cycles
    )


def test_the_sidecar_imports_nothing_of_the_agent_or_the_cli() -> None:
    """Statically, every import anywhere: tests/test_install.py checks what a running sidecar loads."""
    graph = import_graph(PACKAGE_ROOT)
    sidecar = [name for name in graph if name == "meshctl.proxy" or name.startswith("meshctl.proxy.")]
    foreign = {
        "%s -> %s" % (name, imported)
        for name in sidecar
        for imported in graph[name]
        if not imported.startswith("meshctl.proxy")
    }
    assert sorted(foreign) == []
