"""The package's import structure (docs/architecture.md): no cycle between its parts, no import
of `tests`, and model code free of the engines around it. Every import statement counts, those
inside functions included, read from the source with `ast` (nothing is imported here)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("capsdist", "data_tools")


def _part(module: str) -> str | None:
    """The part of the code base a dotted module belongs to: `capsdist.X` (a subpackage or a
    top-level module) or `data_tools`; None for third-party modules."""
    top, _, rest = module.partition(".")
    if top == "data_tools":
        return "data_tools"
    if top == "capsdist":
        return f"capsdist.{rest.split('.')[0]}" if rest else "capsdist"
    return None


def _imports(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) of every import statement in a file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            # `from capsdist import eval` imports the subpackage capsdist.eval
            names = [f"{base}.{a.name}" for a in node.names] if base in PACKAGES else [base]
            found += [(name, node.lineno) for name in names]
    return found


def _source_files() -> list[Path]:
    return [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


def import_graph() -> dict[str, dict[str, str]]:
    """part → {imported part: 'file:line' of one such import}."""
    graph: dict[str, dict[str, str]] = defaultdict(dict)
    for path in _source_files():
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        here = _part(module.removesuffix(".__init__"))
        for name, line in _imports(path):
            there = _part(name)
            if there and there != here and there != "capsdist":
                graph[here].setdefault(there, f"{path.relative_to(ROOT)}:{line}")
    return graph


def find_cycle(graph: dict[str, dict[str, str]]) -> list[str]:
    """One cycle as [a, b, ..., a], or [] if the graph has none (depth-first search)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        stack.append(node)
        for nxt in graph.get(node, {}):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return []

    for node in list(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_no_import_cycle_between_parts_of_the_package():
    graph = import_graph()
    cycle = find_cycle(graph)
    where = [graph[a][b] for a, b in zip(cycle, cycle[1:], strict=False)]
    assert cycle == [], f"import cycle {' → '.join(cycle)} (at {', '.join(where)})"


def test_the_cycle_check_sees_imports_inside_functions():
    """The check itself: it finds a cycle, and it sees imports made inside functions (the CLI
    imports the training loop only inside its `train` handler)."""
    graph = {"capsdist.a": {"capsdist.b": "a.py:1"}, "capsdist.b": {"capsdist.a": "b.py:9"}}
    assert find_cycle(graph) == ["capsdist.a", "capsdist.b", "capsdist.a"]
    assert "capsdist.train" in import_graph()["capsdist.cli"]


def test_nothing_in_the_package_imports_tests():
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in _source_files()
        for name, line in _imports(path)
        if name == "tests" or name.startswith("tests.")
    ]
    assert offenders == []


def test_model_code_imports_no_engine():
    """capsdist/models is single-device tensor code: DeepSpeed, Ray, W&B and webdataset wrap it
    from outside (STYLE.md)."""
    engines = ("deepspeed", "ray", "wandb", "webdataset")
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in sorted((ROOT / "capsdist" / "models").rglob("*.py"))
        for name, line in _imports(path)
        if name.split(".")[0] in engines
    ]
    assert offenders == []
