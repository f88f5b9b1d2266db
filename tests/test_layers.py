"""The layers run one way: the import graph of the package has no cycle and no upward edge.

Every ``import`` statement of ``kldiv_spec/``, ``backends/`` and ``conformance/`` is
read from the source (those inside functions and ``TYPE_CHECKING`` blocks too: an
import hidden in a function is still a dependency), and each module is placed in a
layer of :data:`LAYERS`. A module may import its own layer and those below it, never
one above, and the graph of the three folders together has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"kldiv_spec": "kldiv_spec", "kldiv_spec.backends": "backends",
           "kldiv_spec.conformance": "conformance"}  # fmt: skip

#: Bottom to top. Modules not listed take the layer of their folder's ``*`` entry.
LAYERS: tuple[tuple[str, ...], ...] = (
    # foundations: settings, floating-point state, the core, the registry, the protocol
    (
        "kldiv_spec._settings",
        "kldiv_spec._floating_point",
        "kldiv_spec._core",
        "kldiv_spec._core_logits",
        "kldiv_spec._core_gaussian",
        "kldiv_spec.backends._registry",
        "kldiv_spec.backends._protocol",
    ),
    ("kldiv_spec._validation",),
    # the references, with autodiff on PyTorch and JAX
    (
        "kldiv_spec._reference",
        "kldiv_spec._reference_logits",
        "kldiv_spec._reference_gaussian",
        "kldiv_spec._reference_hidden",
        "kldiv_spec._autodiff_torch",
        "kldiv_spec._autodiff_jax",
        "kldiv_spec._autodiff_logits_torch",
        "kldiv_spec._autodiff_logits_jax",
        "kldiv_spec._autodiff_gaussian_torch",
        "kldiv_spec._autodiff_gaussian_jax",
    ),
    ("kldiv_spec.backends", "kldiv_spec.backends.*"),
    ("kldiv_spec._dispatch",),
    # the public API
    (
        "kldiv_spec",
        "kldiv_spec._functional",
        "kldiv_spec._logits",
        "kldiv_spec._gaussian",
        "kldiv_spec._loss",
        "kldiv_spec._torch_loss",
        "kldiv_spec._torch_logits",
        "kldiv_spec._hidden",
        "kldiv_spec._torch_hidden",
        "kldiv_spec.torch",
    ),
    ("kldiv_spec.conformance", "kldiv_spec.conformance.*"),
    # the command line, which serves both the package and the suite
    ("kldiv_spec._cli", "kldiv_spec.__main__"),
)


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = path
    return found


MODULES = _modules()


def _imports(name: str, source: str, /, *, is_package: bool = False) -> set[str]:
    """Return the package modules that module ``name`` imports, wherever the statement is."""
    package = name if is_package else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            for alias in node.names:
                if f"{source}.{alias.name}" in MODULES:
                    edges.add(f"{source}.{alias.name}")
                elif source in MODULES:
                    edges.add(source)
        elif isinstance(node, ast.Import):
            edges.update(alias.name for alias in node.names if alias.name in MODULES)
    edges.discard(name)
    return edges


GRAPH = {
    name: _imports(name, path.read_text(encoding="utf-8"), is_package=path.stem == "__init__")
    for name, path in MODULES.items()
}


def upward(name: str, imports: set[str], /) -> list[str]:
    """Return the modules of ``imports`` that lie in a layer above ``name``'s."""
    return sorted(dep for dep in imports if layer_of(dep) > layer_of(name))


def layer_of(name: str, /) -> int:
    """Return the index of ``name``'s layer in :data:`LAYERS`."""
    for index, members in enumerate(LAYERS):
        if name in members:
            return index
    for index, members in enumerate(LAYERS):
        if any(m.endswith(".*") and name.startswith(m[:-1]) for m in members):
            return index
    msg = f"{name} is in no layer: add it to LAYERS"
    raise LookupError(msg)


def test_the_graph_is_read() -> None:
    assert len(MODULES) > 60
    assert "kldiv_spec._validation" in GRAPH["kldiv_spec._functional"]
    assert "kldiv_spec._core" in GRAPH["kldiv_spec.backends.numpy"]  # from kldiv_spec import
    assert "kldiv_spec.backends._blocks" in GRAPH["kldiv_spec.backends.numpy"]  # from . import


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_upward_import(name: str) -> None:
    above = upward(name, GRAPH[name])
    assert not above, f"{name} (layer {layer_of(name)}) imports a layer above it: {above}"


def test_no_cycle() -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(GRAPH[node]):
            if state.get(dep) == 1:
                cycle = [*path[path.index(dep) :], dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)


def test_the_checker_finds_upward_imports_hidden_in_functions() -> None:
    """The check can fail: the backend imports that issue 19 found are caught."""
    source = """
from kldiv_spec import _core, _functional
from ._protocol import Recast

def helper():
    from kldiv_spec._dispatch import evaluate
    import kldiv_spec._logits
"""
    found = _imports("kldiv_spec.backends.torch", source)
    assert found == {
        "kldiv_spec._core",
        "kldiv_spec._functional",
        "kldiv_spec.backends._protocol",
        "kldiv_spec._dispatch",
        "kldiv_spec._logits",
    }
    assert upward("kldiv_spec.backends.torch", found) == [
        "kldiv_spec._dispatch",
        "kldiv_spec._functional",
        "kldiv_spec._logits",
    ]
