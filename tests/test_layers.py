"""The architecture is a test: the layers contract (README, "Architecture").

Every import of a jaxmixed module by another, at module level or inside a function, is read
from the source (an AST walk, so lazy imports count too). A module may import only modules of
its own layer or of layers below it, and the module graph has no cycle.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "jaxmixed"

#: lowest first; a layer may import the layers before it. ``errors`` and ``settings`` are the
#: foundation every layer may use; ``functional`` is a public facade at the level of ``api``;
#: the package root (``jaxmixed/__init__.py``) and ``__main__`` sit on top.
LAYERS = ["errors", "settings", "runtime", "model", "syntax", "data", "engine", "fit", "inference",
          "results", "api", "app", "root"]
FOUNDATION = {"errors": 0, "settings": 1}
FACADES = {"functional": "api", "__main__": "root"}


def _module_name(path: pathlib.Path, pkg: pathlib.Path = PKG) -> str:
    parts = list(path.relative_to(pkg.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts == ["jaxmixed"]:
        return "root"
    head = parts[1]
    if head in FACADES:
        return FACADES[head]
    if head in FOUNDATION:
        return head
    if head not in LAYERS:
        raise AssertionError(f"{module} is in no layer: add its folder to tests/test_layers.py and the README")
    return head


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(pkg: pathlib.Path = PKG) -> dict[str, set[str]]:
    """{module: jaxmixed modules it imports}, ``from pkg import name`` counted as pkg.name when
    that is a module."""
    files = {_module_name(p, pkg): p for p in pkg.rglob("*.py")}
    out: dict[str, set[str]] = {}
    for mod, path in files.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(mod, path.name == "__init__.py", node) if node.level else (node.module or "")
                if not target.startswith("jaxmixed"):
                    continue
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in files]
                deps.update(subs or [target])
                if len(subs) < len(node.names):
                    deps.add(target)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("jaxmixed"))
        deps.discard(mod)
        out[mod] = {d for d in deps if d in files or d == "jaxmixed"}
    return out


GRAPH = imports()


def test_every_module_has_a_layer():
    for mod in GRAPH:
        layer_of(mod)


def upward(graph, module) -> list[str]:
    """The imports of ``module`` that go to a higher layer."""
    mine = LAYERS.index(layer_of(module))
    return sorted(d for d in graph[module] if LAYERS.index(layer_of(d)) > mine and not module.startswith(d + "."))


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_import_from_a_higher_layer(module):
    bad = upward(GRAPH, module)
    assert not bad, f"{module} ({layer_of(module)}) imports higher layers: " + \
        ", ".join(f"{d} ({layer_of(d)})" for d in bad)


def find_cycle(graph) -> list[str] | None:
    """One import cycle of the module graph, or None. Edges from a module to its own parent
    package are left out (the parent's __init__ runs first anyway)."""
    graph = {m: {d for d in ds if not m.startswith(d + ".")} for m, ds in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checker_sees_lazy_upward_imports_and_cycles(tmp_path):
    """The checker itself, on a small package: an import inside a function from a higher layer
    and a two-module cycle are both found."""
    pkg = tmp_path / "jaxmixed"
    for folder in ("engine", "results"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "engine" / "dense.py").write_text("def f():\n    from ..results import report\n")
    (pkg / "results" / "report.py").write_text("from jaxmixed.results import table\n")
    (pkg / "results" / "table.py").write_text("from . import report\n")
    graph = imports(pkg)
    assert upward(graph, "jaxmixed.engine.dense") == ["jaxmixed.results.report"]
    assert upward(graph, "jaxmixed.results.report") == []
    assert set(find_cycle(graph)) == {"jaxmixed.results.report", "jaxmixed.results.table"}
