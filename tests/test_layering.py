"""The package layering: every import arrow points down, and no module imports itself round a circle.

``LAYERS`` is the one statement of the layering (the README's layout section shows it): a module
may import from its own package and from packages in lower layers, never from a higher or a
sibling layer. Imports under ``if TYPE_CHECKING:`` count too: a type-only arrow is still an arrow
a reader must follow. The graph is read with ``ast`` (no module is imported).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "expint_jax"

# Lowest first. "expint_jax" holds the shared records and utilities at the top of the package
# (records, storage, config, retrieval); each later entry may use every earlier one.
LAYERS = (
    "expint_jax",
    "expint_jax.parallel",
    "expint_jax.models",
    "expint_jax.llm",
    "expint_jax.experience",
    "expint_jax.rollout",
    "expint_jax.distill",
    "expint_jax.analysis",
    "expint_jax.organism",
    "expint_jax.loop",
    "expint_jax.cli",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _package(module: str) -> str:
    """The layer a module belongs to: ``expint_jax.<package>``, or ``expint_jax`` for top-level modules."""
    parts = module.split(".")
    if len(parts) >= 2 and f"expint_jax.{parts[1]}" in LAYERS:
        return f"expint_jax.{parts[1]}"
    return "expint_jax"


def _imports(module: str) -> set[str]:
    """The project modules ``module`` imports (``from pkg import mod`` names the module ``pkg.mod``)."""
    path = MODULES[module]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "expint_jax"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "expint_jax":
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in MODULES else node.module)
    return {name for name in found if name != module}


GRAPH = {module: _imports(module) for module in MODULES}


def test_every_package_is_in_a_layer():
    packages = {".".join(m.split(".")[:2]) for m in MODULES if m.count(".") >= 1 and MODULES[m].name == "__init__.py"}
    assert packages <= set(LAYERS), f"packages missing from LAYERS: {sorted(packages - set(LAYERS))}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    rank = LAYERS.index(_package(module))
    upward = sorted(target for target in GRAPH[module]
                    if _package(target) != _package(module) and LAYERS.index(_package(target)) > rank)
    assert not upward, f"{module} (layer {_package(module)}) imports from higher layers: {upward}"


def test_no_file_level_import_cycle():
    state: dict[str, str] = {}  # "active" while on the DFS stack, "done" afterwards

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "active"
        for target in sorted(GRAPH[module]):
            if state.get(target) == "active":
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, stack + [target])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


def test_graph_names_real_modules():
    """Guards the test itself: every project import it parsed resolves to a module or package."""
    unknown = sorted({t for targets in GRAPH.values() for t in targets if t not in MODULES})
    assert not unknown, unknown
