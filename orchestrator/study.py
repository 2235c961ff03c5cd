"""Everything orch asks of Optuna: studies, samplers, pruners, and turning a search space into
suggestions.

One study per algorithm of a sweep, named ``<sweep>/<algorithm>``, in the sweep's storage
(SQLite under the run folder by default, any Optuna storage URL otherwise). The sweep driver asks
for trials and tells their results (ask/tell); each trial's remote driver re-opens the study to
report intermediate validation metrics and ask the pruner, so pruning works the same in-process
and on a cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import optuna
from filelock import FileLock
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from orchestrator.config import Choices, Range, Search, Sweep, grid_values

optuna.logging.set_verbosity(optuna.logging.WARNING)

STATES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
          TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}


def study_name(sweep_name: str, algorithm: str) -> str:
    return f"{sweep_name}/{algorithm}"


def storage(url: str) -> RDBStorage:
    """An Optuna storage object for ``url`` (SQLite gets a generous lock timeout: trials on
    several processes write to it at once)."""
    if not url.startswith("sqlite:///"):
        return RDBStorage(url, heartbeat_interval=None)
    path = Path(url.removeprefix("sqlite:///"))
    path.parent.mkdir(parents=True, exist_ok=True)
    # Creating the storage creates its tables: serialise that between sweeps starting at once.
    with FileLock(f"{path}.lock"):
        return RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}}, heartbeat_interval=None)


# The study's user attribute holding its algorithm's grid and the seed that orders it
# (``search.sampler: grid``).
GRID = "orch_grid"


def make_sampler(search: Search, seed: int) -> optuna.samplers.BaseSampler:
    """The sampler ``search.sampler`` names, seeded; the sweep file's validation has already
    refused a space it cannot search (a continuous range for grid, choices for cmaes)."""
    startup = min(5, max(1, search.trials // 2))
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if search.sampler == "grid":
        return StudyGridSampler()
    if search.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    if search.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=startup)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)


def grid(space: Mapping[str, Any]) -> dict[str, list[Any]]:
    """Each searched knob of ``space`` with the values a grid search tries."""
    return {name: grid_values(knob) for name, knob in space.items()
            if isinstance(knob, (Range, Choices))}


class StudyGridSampler(optuna.samplers.BaseSampler):
    """Optuna's ``GridSampler`` over the grid ``create_study`` stored in the study.

    The sweep driver makes a new sampler from ``search`` alone before each ask, so the grid,
    which is the algorithm's, travels with the study (and a resumed sweep walks the same one).
    GridSampler hands trial ``n`` point ``n`` of the grid in an order its seed shuffles: the
    seed is the study's, not the one each ask's sampler gets, or two trials could draw one
    point. Its ``after_trial`` is not called: it stops ``study.optimize`` once the grid is used
    up, which raises under ask/tell; the driver stops at ``search.trials``, at most the grid's
    size.
    """

    def __init__(self) -> None:
        self.grid: optuna.samplers.GridSampler | None = None

    def grid_of(self, study: optuna.Study) -> optuna.samplers.GridSampler:
        if self.grid is None:
            stored = study.user_attrs[GRID]
            self.grid = optuna.samplers.GridSampler(stored["values"], seed=stored["seed"])
        return self.grid

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.grid_of(study).before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study,
                                    trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
        return {}

    def sample_relative(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                        search_space: dict[str, Any]) -> dict[str, Any]:
        return {}

    def sample_independent(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                           param_name: str, param_distribution: Any) -> Any:
        return self.grid_of(study).sample_independent(study, trial, param_name,
                                                      param_distribution)


def make_pruner(search: Search) -> optuna.pruners.BasePruner:
    if search.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if search.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def create_study(sweep: Sweep, algorithm: str, *, load_if_exists: bool) -> optuna.Study:
    study = optuna.create_study(
        study_name=study_name(sweep.name, algorithm), storage=storage(sweep.storage_url()),
        direction=sweep.search.direction, sampler=make_sampler(sweep.search, sweep.training.seed),
        pruner=make_pruner(sweep.search), load_if_exists=load_if_exists)
    if sweep.search.sampler == "grid":
        study.set_user_attr(GRID, {"values": grid(sweep.space(algorithm)),
                                   "seed": sweep.training.seed})
    return study


def existing_studies(url: str, sweep_name: str) -> list[str]:
    """Names of the studies of ``sweep_name`` already in the storage at ``url``."""
    prefix = study_name(sweep_name, "")
    return [s.study_name for s in optuna.get_all_study_summaries(storage(url), include_best_trial=False)
            if s.study_name.startswith(prefix)]


def suggest(trial: optuna.Trial, knobs: Mapping[str, Any]) -> dict[str, Any]:
    """Resolve a search space into concrete values: ranges and choices become suggestions."""
    values: dict[str, Any] = {}
    for name, knob in knobs.items():
        if isinstance(knob, Range):
            if knob.int:
                values[name] = trial.suggest_int(name, int(knob.low), int(knob.high), log=knob.log,
                                                 step=int(knob.step or 1))
            else:
                values[name] = trial.suggest_float(name, knob.low, knob.high, log=knob.log,
                                                   step=knob.step)
        elif isinstance(knob, Choices):
            values[name] = trial.suggest_categorical(name, knob.choices)
        else:
            values[name] = knob
    return values


class TrialReporter:
    """A trial's handle on its study from the process that trains it: report and ask to prune."""

    def __init__(self, storage_url: str, name: str, trial_id: int, search: Search):
        study = optuna.load_study(study_name=name, storage=storage(storage_url),
                                  pruner=make_pruner(search))
        self.trial = optuna.trial.Trial(study, trial_id)

    def report(self, value: float, step: int) -> bool:
        """Record an intermediate metric; True if the pruner says stop."""
        self.trial.report(value, step)
        return self.trial.should_prune()


def trial_rows(url: str, sweep_name: str) -> list[dict[str, Any]]:
    """Every trial of every study of a sweep, as plain rows for ``orch runs``."""
    rows = []
    for name in existing_studies(url, sweep_name):
        study = optuna.load_study(study_name=name, storage=storage(url))
        for trial in study.get_trials(deepcopy=False):
            rows.append({"algorithm": name.split("/", 1)[1], "number": trial.number,
                         "state": STATES.get(trial.state, trial.state.name.lower()),
                         "value": trial.value, "params": dict(trial.params),
                         "reason": trial.user_attrs.get("fail_reason", "")})
    return rows
