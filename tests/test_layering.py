"""The package's dependencies point one way (workflows -> optimisation -> losses/networks -> tensors): every module
imports, none imports a layer above its own, and the module graph has no cycle. Read from the source (AST), so an
import hidden inside a function counts like one at the top."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import elastic_hypermorph_bundle as package

ROOT = Path(package.__file__).parent
NAME = package.__name__

#: the layer of each top-level module or subpackage, lowest first; a module may import its own layer and below
LAYERS = {
    "": 0, "flags": 0, "physics": 0, "atomic": 0, "cli": 0, "console": 0,
    "networks": 1, "losses": 1, "data": 1, "displacement": 1,
    "metrics": 2, "hyperparams": 2, "forward": 2,
    "optimize": 3, "model_card": 3, "visualize": 3, "simulation": 3,
    "workflow": 4,
    "discovery": 5,
}
#: imports inside a function that are there for an optional or heavy dependency, not to dodge the layering: figures
#: need matplotlib, which a run that writes none never imports; the error hook the package installs on import
#: (cli) reaches the atomic writer's torch/ignite/MONAI imports only when an error is reported
LAZY_ALLOWED = {("workflow.writers", "visualize"), ("simulation.dataset", "visualize"), ("cli", "atomic")}
#: import cycles the package still has (none: the simulator's was removed by its split, issue 23 item 4)
CYCLE_ALLOWED: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom | ast.Import, is_package: bool) -> list[str]:
    """The package modules an import statement names (relative to the package root, "" for the root)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif node.level == 0:
        names = [node.module or ""] + [f"{node.module}.{alias.name}" for alias in node.names]
    else:
        base = module.split(".") if module else []
        base = base if is_package else base[:-1]
        base = base[: len(base) - (node.level - 1)]
        stem = ".".join(base + ([node.module] if node.module else []))
        names = [f"{NAME}.{stem}".rstrip(".")] + [f"{NAME}.{stem}.{alias.name}".replace("..", ".") for alias in node.names]
    result = []
    for name in names:
        if name == NAME or name.startswith(NAME + "."):
            inner = name[len(NAME) + 1:] if name != NAME else ""
            if inner in MODULES:
                result.append(inner)
    return result


def _imports(module: str) -> list[tuple[str, bool]]:
    """``(imported module, inside a function)`` for every package import of ``module``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend((target, in_function) for target in _resolve(module, child, path.name == "__init__.py"))
            visit(child, inner)

    visit(tree, False)
    return [(target, lazy) for target, lazy in found if target != module]


def _layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def test_every_module_has_a_layer_and_imports():
    for module in sorted(MODULES):
        assert module.split(".")[0] in LAYERS, f"{module} has no layer: add it to LAYERS in {__file__}"
        importlib.import_module(f"{NAME}.{module}".rstrip("."))
    # and pkgutil sees the same modules (no file left out of the walk)
    walked = {info.name[len(NAME) + 1:] for info in pkgutil.walk_packages([str(ROOT)], NAME + ".")}
    assert walked <= set(MODULES)


def test_no_import_runs_up_the_layers():
    upward = [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module in MODULES
        for target, _ in _imports(module)
        if _layer(target) > _layer(module)
    ]
    assert not upward, "\n".join(upward)


def test_losses_and_networks_never_import_workflows():
    for module in MODULES:
        if module.split(".")[0] in ("losses", "networks"):
            for target, _ in _imports(module):
                assert target.split(".")[0] not in ("workflow", "discovery", "optimize", "model_card"), (module, target)


def test_no_import_inside_a_function_dodges_the_layering():
    lazy = {
        (module, target.split(".")[0] if target.split(".")[0] == "visualize" else target)
        for module in MODULES
        for target, inside in _imports(module)
        if inside
    }
    assert lazy <= LAZY_ALLOWED | CYCLE_ALLOWED, sorted(lazy - LAZY_ALLOWED - CYCLE_ALLOWED)


def test_module_graph_has_no_cycle():
    graph = {module: {target for target, _ in _imports(module)} for module in MODULES}
    # a package's __init__ re-exporting its submodules is not a cycle with them
    edges = {
        (a, b) for a, targets in graph.items() for b in targets
        if not (b.startswith(a + ".") or (a == "" and b))
    } - CYCLE_ALLOWED
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for a, b in edges:
            if a != node:
                continue
            if state.get(b) == 1:
                pytest.fail("import cycle: " + " -> ".join(path + [b]))
            if b not in state:
                visit(b, path + [b])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_layering_check_sees_a_violation(tmp_path):
    """The checker itself: an upward relative import is resolved to the module it names."""
    node = ast.parse("from ..workflow import parse_flag").body[0]
    assert _resolve("losses.registration", node, is_package=False) == ["workflow"]
    node = ast.parse("from .similarity import get_similarity").body[0]
    assert _resolve("losses.registration", node, is_package=False) == ["losses.similarity"]
    node = ast.parse("from . import parse_flag").body[0]
    assert _resolve("workflow", node, is_package=True) == ["workflow"]
