"""The project's packages import each other only downwards, and no module closes an import
cycle. Imports inside functions count too: a function-local import that closes a cycle works
only as long as nothing imports the two modules in the other order at load time, and one that
reaches up a layer still runs the upper package's code."""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("oecl_model", "kernels", "oecl_runtime", "oecl_train")
# The layers: each package and the packages it may import. The network and its views
# (oecl_model) depend on no other package, the loss kernels only on the runtime's atomic
# writer; the runtime serves without the training code; training, evaluation and export
# sit on top of all three.
MAY_IMPORT: dict[str, set[str]] = {
    "oecl_model": set(),
    "kernels": {"oecl_runtime"},
    "oecl_runtime": {"oecl_model"},
    "oecl_train": {"oecl_model", "kernels", "oecl_runtime"},
}
# Layer edges allowed from the named modules alone: the runtime rebuilds the network only in
# its optional torch backend, so importing oecl_runtime (or scoring with onnxruntime) never
# imports torch.
ONLY_FROM: dict[tuple[str, str], set[str]] = {
    ("oecl_runtime", "oecl_model"): {"oecl_runtime.backends.torch_model"},
    # The kernels' offline compile report is written atomically, as every result file is.
    ("kernels", "oecl_runtime"): {"kernels.targets"},
}
# Imports known to close a cycle, left out of the check until their module is reshaped.
KNOWN_CYCLE_EDGES: set[tuple[str, str]] = set()

Graph = dict[str, set[str]]


def module_files(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Module name -> source file, walking the package directories (a package is its
    __init__)."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterable[ast.Import | ast.ImportFrom]:
    # Imports under `if TYPE_CHECKING:` never run, so they cannot close a cycle.
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        children = node.body if isinstance(node, ast.If) and _is_type_checking(node) else []
        skipped = {id(c) for c in children}
        todo.extend(c for c in ast.iter_child_nodes(node) if id(c) not in skipped)


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module `import name` loads: the longest prefix of name that is one."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in modules:
            return ".".join(parts)
        parts.pop()
    return None


def import_graph(root: Path, packages: Iterable[str]) -> Graph:
    """Module -> the project modules it imports, at module level or inside functions."""
    modules = module_files(root, packages)
    graph: Graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets = set()
        for node in _import_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(_resolve(a.name, modules) for a in node.names)
                continue
            base = node.module or ""
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                # `from pkg import mod` loads the submodule; `from mod import name` the module.
                targets.add(sub if sub in modules else _resolve(base, modules))
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def layer_violations(graph: Graph, may_import: dict[str, set[str]],
                     only_from: dict[tuple[str, str], set[str]]) -> list[str]:
    """`importer -> imported` for each import that crosses packages against the layers: to a
    package the importer's may not import, or from a module an allowed edge is not open to."""
    found = []
    for importer, targets in sorted(graph.items()):
        here = importer.split(".")[0]
        for imported in sorted(targets):
            there = imported.split(".")[0]
            if there == here:
                continue
            allowed = only_from.get((here, there))
            if there not in may_import[here] or (allowed is not None and importer not in allowed):
                found.append(f"{importer} -> {imported}")
    return found


def find_cycles(graph: Graph) -> list[list[str]]:
    """One cycle (first module repeated at the end) per group of modules that import each
    other, empty when the graph has none."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, group) for group in groups]


def _cycle_in(graph: Graph, group: set[str]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group."""
    start = min(group)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{sorted(group)} is not strongly connected")


def test_packages_have_no_import_cycle():
    graph = import_graph(ROOT, PACKAGES)
    assert {"oecl_train", "oecl_train.cli", "oecl_runtime", "kernels"} <= set(graph)
    for importer, imported in KNOWN_CYCLE_EDGES:
        graph[importer].discard(imported)
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_packages_import_only_downwards():
    graph = import_graph(ROOT, PACKAGES)
    assert set(MAY_IMPORT) == set(PACKAGES)
    assert "oecl_model.model" in graph and "oecl_runtime.backends.torch_model" in graph
    assert "oecl_model.model" in graph["oecl_runtime.backends.torch_model"]
    bad = layer_violations(graph, MAY_IMPORT, ONLY_FROM)
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_layer_check_finds_upward_and_misplaced_imports(tmp_path):
    for pkg, body in {"low": "def f():\n    import high.a\n", "mid": "from low import x\n",
                      "high": ""}.items():
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
        (tmp_path / pkg / "x.py").write_text(body)
    (tmp_path / "high" / "a.py").write_text("from low import x\nfrom mid import x as y\n")
    graph = import_graph(tmp_path, ["low", "mid", "high"])
    may = {"low": set(), "mid": {"low"}, "high": {"low", "mid"}}
    assert layer_violations(graph, may, {}) == ["low.x -> high.a"]
    assert layer_violations(graph, may, {("mid", "low"): {"mid.y"}}) == [
        "low.x -> high.a", "mid.x -> low.x"]
    (tmp_path / "low" / "x.py").write_text("")
    assert layer_violations(import_graph(tmp_path, ["low", "mid", "high"]), may, {}) == []


def test_cycle_check_finds_a_cycle_and_resolves_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import a\n")
    (pkg / "a.py").write_text("import os\nfrom pkg.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
        "def g():\n    import pkg.a\n"
    )
    graph = import_graph(tmp_path, ["pkg"])
    assert graph == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.sub.b"},
        "pkg.sub": set(),
        "pkg.sub.b": {"pkg.c"},
        "pkg.c": {"pkg.a"},
    }
    assert find_cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]
    assert find_cycles({"x": {"y"}, "y": set()}) == []
