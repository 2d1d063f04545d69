"""The shape of the house: imports point down, never in a circle, and no stage imports another.

Tiers, bottom to top: ``vq_core`` (plain PyTorch); the shared pieces of ``pipelines`` (run
machinery, ``pipelines.data``, ``pipelines.evaluation``, models and generation); the stages
(``pipelines.stages.*``); what drives the stages (the runner, ``vqpipe status``, the one-off
tools); ``jobs``. A module may import its own tier or a lower one. Every import counts, those
inside functions included: an import moved into a function to dodge a cycle is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("vq_core", "pipelines", "jobs")

# The modules above the stages: they read the stage registry.
DRIVERS = ("pipelines.runner", "pipelines.status", "pipelines.tools")


def module_files() -> dict[str, Path]:
    mods = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def imported_names(module: str, path: Path) -> set[str]:
    """Every module name an import in ``path`` mentions (absolute and relative, at any depth)."""
    names: set[str] = set()
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (a name resolves to its longest known prefix)."""
    mods = module_files()
    graph: dict[str, set[str]] = {}
    for module, path in mods.items():
        targets = set()
        for name in imported_names(module, path):
            while name and name not in mods:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def tier(module: str) -> int:
    if module.startswith("vq_core"):
        return 0
    if module.startswith("jobs"):
        return 4
    if module == "pipelines.stages" or any(
        module == d or module.startswith(d + ".") for d in DRIVERS
    ):
        return 3  # the stage registry (pipelines.stages/__init__) sits with its readers
    if module.startswith("pipelines.stages."):
        return 2
    return 1


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), and self-loops."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


GRAPH = import_graph()


def test_the_graph_is_read():
    # A parser that found nothing would pass every check below.
    assert "pipelines.stages" in GRAPH["pipelines.runner"]
    assert "pipelines.stage" in GRAPH["pipelines.stages.tokenize"]
    assert "pipelines.data.storage" in GRAPH["pipelines.data.shards"]
    assert tier("pipelines.stages.sample") == 2 and tier("pipelines.runner") == 3


def test_no_import_cycles():
    assert cycles(GRAPH) == []


def test_imports_point_down():
    upward = [
        f"{m} (tier {tier(m)}) imports {t} (tier {tier(t)})"
        for m, targets in sorted(GRAPH.items())
        for t in sorted(targets)
        if tier(t) > tier(m)
    ]
    assert upward == []


def test_no_stage_imports_another_stage():
    offending = [
        f"{m} imports {t}"
        for m, targets in sorted(GRAPH.items())
        if tier(m) == 2
        for t in sorted(targets)
        if tier(t) == 2 and t != m
    ]
    assert offending == []


@pytest.mark.parametrize("banned", ["ray", "mlflow", "webdataset", "pipelines", "jobs"])
def test_vq_core_is_plain_pytorch(banned):
    users = [
        str(path.relative_to(ROOT))
        for module, path in module_files().items()
        if module.startswith("vq_core")
        and any(n == banned or n.startswith(banned + ".") for n in imported_names(module, path))
    ]
    assert users == []


def test_the_checks_catch_what_they_guard():
    """The checks themselves, on a graph with the faults they exist for."""
    graph = {
        "pipelines.a": {"pipelines.b"},
        "pipelines.b": {"pipelines.a"},
        "pipelines.stages.x": {"pipelines.stages.y", "pipelines.runner"},
        "pipelines.stages.y": set(),
        "pipelines.runner": set(),
    }
    assert cycles(graph) == [["pipelines.a", "pipelines.b"]]
    assert tier("pipelines.runner") > tier("pipelines.stages.x") == tier("pipelines.stages.y")
