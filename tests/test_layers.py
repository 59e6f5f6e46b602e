"""The import graph follows DESIGN.md's layers (math -> nn -> methods -> lightning -> entry): every
``import entreg...`` in the package, including the ones inside functions, points down, and neither the graph of
sub-packages nor the modules inside one sub-package form a cycle. A new upward import or cycle fails here, not in
a user's circular-import error."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "entreg"
LAYERS = {
    "math": {"entropy", "distributions", "policy_gradient"},
    "nn": {"nn"},
    "methods": {"tta", "diffusion", "flow", "rl"},
    "lightning": {"callbacks", "modules", "data", "distributed", "loggers", "metrics", "images"},
    "entry": {"cli", "train", "adapt", "sample", "finetune", "checkpoint_kind"},
}
ORDER = list(LAYERS)


def unit(module: str) -> str:
    """``entreg.flow.rewards`` -> ``flow``; ``entreg.cli`` -> ``cli``; ``entreg`` -> ``entreg``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def module_name(path: Path) -> str:
    """``entreg/data/shifts.py`` -> ``entreg.data.shifts``; ``entreg/data/__init__.py`` -> ``entreg.data``."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_graph() -> dict[str, set[str]]:
    """Module -> the entreg modules it imports (``from entreg.data import shifts`` imports ``entreg.data.shifts``)."""
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = defaultdict(set)
    for source, path in paths.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in paths else node.module for a in node.names
                ]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            edges[source] |= {name for name in names if name.startswith("entreg.")} - {source}
    return edges


def import_graph() -> dict[str, set[str]]:
    """Sub-package (or top-level module) -> the others it imports."""
    edges: dict[str, set[str]] = defaultdict(set)
    for source, targets in module_graph().items():
        edges[unit(source)] |= {unit(target) for target in targets} - {unit(source)}
    return edges


def layer(name: str) -> str:
    (found,) = [key for key, members in LAYERS.items() if name in members] or [None]
    assert found is not None, f"entreg/{name} belongs to no layer of DESIGN.md: add it to LAYERS"
    return found


def test_every_import_points_down_the_layers():
    for source, targets in import_graph().items():
        if source == "entreg":  # the package's __init__ re-exports the public API
            continue
        for target in targets:
            upward = ORDER.index(layer(target)) > ORDER.index(layer(source))
            methods_sideways = layer(source) == layer(target) == "methods"
            assert not upward, f"entreg/{source} ({layer(source)}) imports entreg/{target} ({layer(target)})"
            assert not methods_sideways, f"methods stay independent: entreg/{source} imports entreg/{target}"


def assert_no_cycle(edges: dict[str, set[str]]) -> None:
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            assert state.get(target) != "open", "import cycle: " + " -> ".join([*path, node, target])
            if target not in state:
                visit(target, [*path, node])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])


def test_the_graph_of_subpackages_has_no_cycle():
    assert_no_cycle(import_graph())


def test_the_modules_inside_each_subpackage_import_each_other_without_a_cycle():
    """Within entreg/data, entreg/tta...: the cycle digits_c <-> shifts worked only because one side imported
    lazily, inside a function."""
    edges = module_graph()
    assert "entreg.data.shifts" in edges["entreg.data"]  # __init__ re-exports are edges of the package module
    assert_no_cycle({source: {t for t in targets if unit(t) == unit(source)} for source, targets in edges.items()})


def test_data_does_not_import_flow():
    """The data and the nets trained on it (ring centres, digits classifiers and densities) stand apart from the
    flow methods that use them: the old data <-> flow cycle stays broken even where the layers would allow it."""
    assert "flow" not in import_graph()["data"]


def test_every_lazy_top_level_name_is_the_object_of_its_module() -> None:
    """``entreg.<Name>`` resolves to the object its module defines under that name; an unknown name raises."""
    import importlib

    import pytest

    import entreg

    for name, module in entreg._LAZY.items():
        assert getattr(entreg, name) is getattr(importlib.import_module(module), name), name
    assert {"SACModule", "PPOModule", "SAC", "GaussianActorCritic"} <= set(entreg.__all__)
    import entreg.modules

    for name, module in entreg.modules._LAZY.items():  # the RL modules load on first use (optional extra)
        assert getattr(entreg.modules, name) is getattr(importlib.import_module(module), name), name
    with pytest.raises(AttributeError, match="no attribute 'PPO'"):
        entreg.PPO  # noqa: B018
