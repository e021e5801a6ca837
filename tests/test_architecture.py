"""The package's shape: no import cycles, in-function imports included.

Every ``import``/``from … import`` anywhere in a module (at its top, inside a
function, under ``if``) is an edge; only imports under ``if TYPE_CHECKING:`` are left
out, since they never run.  A cycle between modules means neither can be read, tested
or moved without the other: this test names the first one found.
"""

from __future__ import annotations

import ast
import os

from conftest import SRC

PACKAGE = os.path.join(SRC, "mesobox")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, SRC)[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _modules() -> dict[str, str]:
    found = {}
    for top, _dirs, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(top, name)
                found[_module_name(path)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, known: set[str]) -> set[str]:
    """The package's modules that ``module`` imports when it runs."""
    edges: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            edges.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.rsplit(".", node.level)[0]
                base = f"{package}.{base}" if base else package
            for alias in node.names:
                # `from mesobox.launch import execute` imports the module launch.execute.
                if f"{base}.{alias.name}" in known:
                    edges.add(f"{base}.{alias.name}")
                elif base in known:
                    edges.add(base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    edges.discard(module)
    return edges


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        with open(path, encoding="utf-8") as f:
            graph[name] = _imports(ast.parse(f.read(), path), name, known)
    # Importing a.b.c runs a/__init__ and a/b/__init__ first: packages are edges too.
    for name in list(graph):
        parts = name.split(".")
        for i in range(1, len(parts)):
            parent = ".".join(parts[:i])
            if parent in graph and parent != name:
                graph[name].add(parent)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := walk(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := walk(node)) is not None:
            return found
    return None


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 40, "the walk found too few modules: is SRC right?"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or ())


def test_the_cycle_finder_sees_in_function_imports() -> None:
    """The check itself: a cycle made only by an import inside a function is found,
    and one under TYPE_CHECKING is not."""
    known = {"p", "p.a", "p.b"}
    a = ast.parse("def f():\n    from p import b\n")
    b = ast.parse("from p.a import thing\nif TYPE_CHECKING:\n    import p.b\n")
    graph = {"p": set(), "p.a": _imports(a, "p.a", known), "p.b": _imports(b, "p.b", known)}
    assert find_cycle(graph) == ["p.a", "p.b", "p.a"]
    graph["p.a"] = _imports(ast.parse("if TYPE_CHECKING:\n    from p import b\n"), "p.a", known)
    assert find_cycle(graph) is None


def test_the_launch_path_stays_below_the_cli() -> None:
    """Rooms that launch containers never import the CLI (wiring only, on top)."""
    graph = import_graph()
    for name, edges in graph.items():
        if not name.startswith(("mesobox.cli", "mesobox.__main__")):
            assert not any(e.startswith("mesobox.cli") for e in edges), f"{name} imports the CLI: {edges}"
