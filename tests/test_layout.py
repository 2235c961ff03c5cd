"""The layout STYLE.md promises, checked on the source: each outside system is touched from one
module (imports anywhere in a file, module-level or inside functions, and modules named to
``importlib.import_module`` or ``__import__``), learners and pipelines touch none of them, the
benchmarks reach them through orch's modules too, pipelines never import the orchestrator,
nothing of orch imports the benchmarks, and orch's modules import each other without a cycle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("learners", "pipelines", "orchestrator")
# The top of the layers (benchmarks -> orchestrator -> learners -> pipelines): held to the same
# rule on outside systems, and imported by none of the packages.
BENCHMARKS = "benchmarks"
# Outside system -> the one module allowed to import it.
# optuna-dashboard reads and writes the Optuna storage: it belongs to Optuna's one module.
OWNERS = {"mlflow": "orchestrator/services/tracking.py", "optuna": "orchestrator/services/study.py",
          "optuna_dashboard": "orchestrator/services/study.py",
          "ray": "orchestrator/services/cluster.py"}
# The orchestrator's sub-packages by role, each importing (of orch) only the shared modules and
# the sub-packages before it here: what their docstrings say.
LAYERS = ("training", "services", "models", "sweep", "cli")
SHARED = {"orchestrator", "orchestrator.config", "orchestrator.config_reference",
          "orchestrator.errors", "orchestrator.plots"}


def sources(*, benchmarks: bool = False) -> list[Path]:
    roots = PACKAGES + ((BENCHMARKS,) if benchmarks else ())
    return sorted(p for root in roots for p in (REPO / root).rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, wherever the import statement stands, and every module it
    names to ``importlib.import_module(...)`` or ``__import__(...)``; a dynamic import whose
    name is not a string in the source is refused, since nothing could check it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and _dynamic_import(node.func):
            name = node.args[0] if node.args else None
            assert isinstance(name, ast.Constant) and isinstance(name.value, str), (
                f"{path.name}:{node.lineno}: a dynamic import of a computed name")
            found.add(name.value)
    return found


def _dynamic_import(function: ast.expr) -> bool:
    """``importlib.import_module``, ``import_module`` (imported from importlib) or ``__import__``."""
    if isinstance(function, ast.Attribute):
        return function.attr == "import_module"
    return isinstance(function, ast.Name) and function.id in ("import_module", "__import__")


def relative(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


@pytest.mark.parametrize("system", sorted(OWNERS))
def test_each_outside_system_is_imported_by_its_one_module(system):
    importers = sorted(relative(p) for p in sources(benchmarks=True)
                       if any(m == system or m.startswith(f"{system}.") for m in imported_modules(p)))
    assert importers == [OWNERS[system]]


def test_nothing_of_orch_imports_the_benchmarks():
    benchmark_modules = {p.stem for p in (REPO / BENCHMARKS).glob("*.py")}
    offenders = [relative(p) for p in sources()
                 if any(m == BENCHMARKS or m.startswith(f"{BENCHMARKS}.") or m in benchmark_modules
                        for m in imported_modules(p))]
    assert offenders == []


def test_dynamic_imports_are_seen(tmp_path):
    """The check above cannot be dodged with importlib: a module named to it counts as imported."""
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text("import importlib\nfrom importlib import import_module\n"
                      "def f():\n    importlib.import_module('mlflow.tracking')\n"
                      "    import_module('ray')\n    __import__('optuna')\n")
    found = imported_modules(sneaky)
    assert {"mlflow.tracking", "ray", "optuna"} <= found
    computed = tmp_path / "computed.py"
    computed.write_text("import importlib\nname = 'ml' + 'flow'\nimportlib.import_module(name)\n")
    with pytest.raises(AssertionError, match="dynamic import of a computed name"):
        imported_modules(computed)


def layer_of(module: str) -> str | None:
    """The sub-package of ``LAYERS`` an orchestrator module belongs to; None for a shared one."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_each_sub_package_imports_only_the_ones_before_it():
    offenders = []
    for path in (REPO / "orchestrator").rglob("*.py"):
        module = module_name(path)
        if module == "orchestrator":  # re-exports load_meta_model for notebooks, lazily
            continue
        own = layer_of(module)
        allowed = set(LAYERS[:LAYERS.index(own) + 1]) if own else set()
        for imported in imported_modules(path):
            if not imported.startswith("orchestrator."):
                continue
            target = layer_of(imported)
            if target is None and imported.rsplit(".", 1)[0] in SHARED | {"orchestrator"}:
                continue
            if target not in allowed:
                offenders.append(f"{relative(path)} imports {imported}")
    assert offenders == []


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
    # ``from orchestrator import tracking`` names the module orchestrator.services.tracking too.
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
