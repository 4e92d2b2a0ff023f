"""The package's drawing: layers that import only downwards, no import circles, a short list of top-level modules,
and engines at the edge (training never imports Flower). See docs/architecture.md."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "feda2v_toolkit"

#: layer of every part of the package; a module may import only modules of its own or a lower layer
LAYERS: dict[str, int] = {
    "errors": 0, "runtime": 0, "specs": 0, "hookspecs": 0, "": 0,
    "config.schema": 1, "config.document": 1,
    "plugins": 2,
    "config": 3,
    "components": 4, "default_plugins": 4,
    "generators": 5, "reducers": 5, "upsamplers": 5, "data": 5,
    "model": 6, "audio": 6, "privacy": 6,
    "training": 7,
    "federated": 8, "analysis": 8,
    "testing": 9, "commands": 9,
    "cli": 10, "__main__": 10,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


class _Imports(ast.NodeVisitor):
    """Every import of the package's own modules, function-level ones included, ``if TYPE_CHECKING:`` excluded."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.module, self.is_package, self.found, self.other = module, is_package, set(), set()

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING":
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def _add(self, name: str) -> None:
        if name.split(".")[0] == "feda2v_toolkit":
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != self.module:
                self.found.add(name)
        else:
            self.other.add(name.split(".")[0])

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            parts = self.module.split(".")[: None if self.is_package else -1]
            parts = parts[: len(parts) - node.level + 1]
            base = ".".join([*parts, *([node.module] if node.module else [])])
        for alias in node.names:
            full = f"{base}.{alias.name}"
            self._add(full if full in MODULES else base)


def _imports() -> dict[str, _Imports]:
    out = {}
    for name, path in MODULES.items():
        visitor = _Imports(name, path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text(encoding="utf-8")))
        out[name] = visitor
    return out


IMPORTS = _imports()


def layer(module: str) -> int:
    rest = module.removeprefix("feda2v_toolkit").removeprefix(".")
    while rest not in LAYERS:
        rest = rest.rpartition(".")[0]
    return LAYERS[rest]


def test_every_module_has_a_layer():
    for module in MODULES:
        layer(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_point_down(module):
    up = sorted(m for m in IMPORTS[module].found if layer(m) > layer(module))
    assert not up, f"{module} (layer {layer(module)}) imports {up} from higher layers"


def test_no_import_circles():
    graph = {m: v.found for m, v in IMPORTS.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles


def test_at_most_a_dozen_modules_at_the_top_of_the_package():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 12, top


def test_the_engines_stay_at_the_edge():
    """Training, its stages and its sites never import Flower or torch.distributed's launchers; analysis is read
    by nothing below it."""
    for module, found in IMPORTS.items():
        if module.startswith("feda2v_toolkit.training"):
            assert "flwr" not in found.other, module
        if layer(module) < LAYERS["analysis"] and not module.startswith("feda2v_toolkit.analysis"):
            assert not any(m.startswith("feda2v_toolkit.analysis") for m in found.found), module
