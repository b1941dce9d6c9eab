"""The package's import graph flows one way: no module imports, at module level, one that imports it back."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dime_lightning"


def module_level_imports(path: Path) -> set[str]:
    """The package modules ``path`` imports in its module body (not inside functions)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dime_lightning"):
            if node.module == "dime_lightning":
                found |= {alias.name for alias in node.names}
            else:
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("dime_lightning.")}
    return found


def test_the_import_graph_has_no_cycle():
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    graph = {path.stem: module_level_imports(path) & modules - {path.stem} for path in PACKAGE.glob("*.py")
             if path.stem != "__init__"}
    assert {"module", "data", "checkpointing", "checkpoint_schema"} <= graph["fit"]  # the parse finds the edges
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as err:
        raise AssertionError(f"import cycle: {err.args[1]}") from None
    assert order.index("errors") < order.index("update_settings") < order.index("update") < order.index("module")
    assert order.index("checkpoint_schema") < order.index("checkpointing") < order.index("fit")


def test_no_test_module_imports_another():
    tests = Path(__file__).resolve().parent
    for path in tests.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [
                alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            assert not any(name.startswith("test_") for name in names), (
                f"{path.name} imports {names}: shared helpers go in fit_runs.py, tiny_networks.py or conftest.py")
