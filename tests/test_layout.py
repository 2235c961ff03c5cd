"""The layout STYLE.md promises, checked on the source: each outside system is touched from one
module (imports anywhere in a file, module-level or inside functions), learners and pipelines
touch none of them, pipelines never import the orchestrator, and orch's modules import each other
without a cycle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("learners", "pipelines", "orchestrator")
# Outside system -> the one module allowed to import it.
# optuna-dashboard reads and writes the Optuna storage: it belongs to Optuna's one module.
OWNERS = {"mlflow": "orchestrator/tracking.py", "optuna": "orchestrator/study.py",
          "optuna_dashboard": "orchestrator/study.py", "ray": "orchestrator/cluster.py"}


def sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, wherever the import statement stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def relative(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


@pytest.mark.parametrize("system", sorted(OWNERS))
def test_each_outside_system_is_imported_by_its_one_module(system):
    importers = sorted(relative(p) for p in sources()
                       if any(m == system or m.startswith(f"{system}.") for m in imported_modules(p)))
    assert importers == [OWNERS[system]]


def test_pipelines_never_import_the_orchestrator():
    offenders = [relative(p) for p in (REPO / "pipelines").rglob("*.py")
                 if any(m.startswith("orchestrator") for m in imported_modules(p))]
    assert offenders == []


def test_optuna_is_used_through_its_public_api():
    """No reaching into Optuna's private attributes (``study._storage``, ``trial._trial_id``)."""
    text = (REPO / OWNERS["optuna"]).read_text()
    assert re.findall(r"\.(_storage|_trial_id|_study_id|_cached_frozen_trial)\b", text) == []


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def test_no_import_cycles():
    names = {module_name(p): p for p in sources()}
    graph = {name: {m for m in imported_modules(path) if m in names and m != name}
             for name, path in names.items()}
    # ``from orchestrator import tracking`` names the module orchestrator.tracking too.
    for name, path in names.items():
        for m in imported_modules(path):
            parent, _, leaf = m.rpartition(".")
            if parent in names and f"{parent}.{leaf}" in names and m != name:
                graph[name].add(m)
        graph[name].discard("orchestrator")
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []
