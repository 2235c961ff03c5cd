"""Everything orch asks of Optuna: studies, samplers, pruners, and turning a search space into
suggestions.

One study per algorithm of a sweep, named ``<sweep>/<algorithm>``, in the sweep's storage
(SQLite under the run folder by default, any Optuna storage URL otherwise). The sweep driver asks
for trials and tells their results (ask/tell); each trial's remote driver re-opens the study to
report intermediate validation metrics and ask the pruner, so pruning works the same in-process
and on a cluster.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
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


def make_sampler(search: Search, seed: int) -> optuna.samplers.BaseSampler:
    """The sampler ``search.sampler`` names, seeded (a grid is the study's: ``SweepStudy``); the
    sweep file's validation has already refused a space it cannot search (a continuous range
    for grid, choices for cmaes)."""
    startup = min(5, max(1, search.trials // 2))
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if search.sampler == "grid":
        raise ValueError("a grid sampler is built from the algorithm's grid: SweepStudy makes it")
    if search.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    if search.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=startup)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)


def grid(space: Mapping[str, Any]) -> dict[str, list[Any]]:
    """Each searched knob of ``space`` with the values a grid search tries."""
    return {name: grid_values(knob) for name, knob in space.items()
            if isinstance(knob, (Range, Choices))}


class AskTellGridSampler(optuna.samplers.GridSampler):
    """Optuna's ``GridSampler`` without its stop at the end of the grid: its ``after_trial``
    calls ``study.stop()``, which raises outside ``study.optimize``, and orch asks and tells.
    The sweep driver stops at ``search.trials``, at most the grid's size (checked at load)."""

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, state: TrialState,
                    values: Any) -> None:
        pass


def make_pruner(search: Search) -> optuna.pruners.BasePruner:
    if search.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if search.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def existing_studies(url: str, sweep_name: str) -> list[str]:
    """Names of the studies of ``sweep_name`` already in the storage at ``url``."""
    prefix = study_name(sweep_name, "")
    return [s.study_name for s in optuna.get_all_study_summaries(storage(url), include_best_trial=False)
            if s.study_name.startswith(prefix)]


def sweep_exists(url: str, sweep_name: str) -> bool:
    """Whether the storage at ``url`` holds a study of ``sweep_name``; a local SQLite file that
    does not exist yet holds none (and is not created by asking)."""
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        return False
    return bool(existing_studies(url, sweep_name))


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


@dataclass(frozen=True)
class TrialRecord:
    """What the sweep driver needs to know of a trial, as plain data."""

    number: int
    trial_id: int  # the storage's id: what a trial's own process reports to
    state: str  # a value of STATES
    params: dict[str, Any]
    user_attrs: dict[str, Any]
    value: float | None = None


class SweepStudy:
    """One algorithm's study as the sweep driver uses it: ask for trials, record their ends,
    find the best, draw the study's plots. Trials are handed out as ``TrialRecord``s, so the
    driver never holds an Optuna object."""

    def __init__(self, sweep: Sweep, algorithm: str, *, load_if_exists: bool):
        self.search, self.seed = sweep.search, sweep.training.seed
        self.grid = grid(sweep.space(algorithm)) if sweep.search.sampler == "grid" else None
        self.name = study_name(sweep.name, algorithm)
        self.storage = storage(sweep.storage_url())
        self.study = optuna.create_study(
            study_name=self.name, storage=self.storage, direction=sweep.search.direction,
            sampler=self.sampler(self.seed), pruner=make_pruner(sweep.search),
            load_if_exists=load_if_exists)
        self.study_id = self.storage.get_study_id_from_name(self.name)

    def trials(self, *states: str) -> list[TrialRecord]:
        """The trials in the given states (``complete``, ``running``, ...), by number."""
        wanted = tuple(state for state, name in STATES.items() if name in states)
        return [self._record(t) for t in self.study.get_trials(deepcopy=False,
                                                              states=wanted or None)]

    def ask(self, seed: int, space: Mapping[str, Any]) -> tuple[TrialRecord, dict[str, Any]]:
        """A new trial and its knobs, from a sampler seeded ``seed``: the sweep driver seeds it
        by the trial's slot, so a resumed sweep asks what an uninterrupted one would have."""
        self.study.sampler = self.sampler(seed)
        trial = self.study.ask()
        knobs = suggest(trial, space)
        record = TrialRecord(trial.number, self._id_of(trial.number), "running",
                             dict(trial.params), dict(trial.user_attrs))
        return record, knobs

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        """The sampler of the next ask, seeded ``seed``. A grid instead keeps one order, shuffled
        by the sweep's seed, in which trial n takes point n: every ask's sampler agrees on it, a
        resumed sweep's too, so no point is drawn twice."""
        if self.grid is not None:
            return AskTellGridSampler(self.grid, seed=self.seed)
        return make_sampler(self.search, seed)

    def set_user_attr(self, trial: TrialRecord, key: str, value: Any) -> None:
        self.storage.set_trial_user_attr(trial.trial_id, key, value)

    def tell(self, trial: TrialRecord, state: str, value: float | None = None,
             reason: str = "") -> None:
        """Record a trial's end: ``complete`` with its value, ``pruned``, or ``failed`` and why."""
        if state == "complete":
            self.study.tell(trial.number, value)
        elif state == "pruned":
            self.study.tell(trial.number, state=TrialState.PRUNED)
        else:
            self.set_user_attr(trial, "fail_reason", reason)
            self.study.tell(trial.number, state=TrialState.FAIL)

    def best(self) -> TrialRecord | None:
        """The best complete trial, or None before the first."""
        try:
            return self._record(self.study.best_trial)
        except ValueError:
            return None

    def requeue_as_new(self, trial: TrialRecord, marker: str) -> None:
        """Record a running trial that cannot be continued as failed (flagged ``marker``, so it
        is not counted) and queue its parameters as a new trial."""
        self.set_user_attr(trial, marker, True)
        self.tell(trial, "failed", reason="interrupted; rerun on resume")
        self.study.enqueue_trial(trial.params, user_attrs={"orch_rerun_of": trial.number},
                                 skip_if_exists=False)

    def plots(self, folder: Path) -> list[Path]:
        return study_plots(self.study, folder)

    def _id_of(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def _record(self, frozen: optuna.trial.FrozenTrial) -> TrialRecord:
        return TrialRecord(frozen.number, self._id_of(frozen.number),
                           STATES.get(frozen.state, frozen.state.name.lower()),
                           dict(frozen.params), dict(frozen.user_attrs), frozen.value)


class TrialReporter:
    """A trial's handle on its study from the process that trains it: report and ask to prune.
    Steps the trial reported before it restarted are not reported again (Optuna would ignore
    them with a warning); the pruner is still asked, and answers as it did."""

    def __init__(self, storage_url: str, name: str, number: int, search: Search):
        store = storage(storage_url)
        study = optuna.load_study(study_name=name, storage=store, pruner=make_pruner(search))
        trial_id = store.get_trial_id_from_study_id_trial_number(
            store.get_study_id_from_name(name), number)
        self.reported = set(store.get_trial(trial_id).intermediate_values)
        self.trial = optuna.trial.Trial(study, trial_id)

    def report(self, value: float, step: int) -> bool:
        """Record an intermediate metric; True if the pruner says stop."""
        if step not in self.reported:
            self.trial.report(value, step)
            self.reported.add(step)
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


def study_plots(study: optuna.Study, folder: Path) -> list[Path]:
    """Optuna's optimisation history and parameter importances, each as PNG and HTML;
    importances are skipped while fewer than two complete trials vary a parameter."""
    import optuna.visualization.matplotlib

    from orchestrator.plots import save_figure  # sets matplotlib's file-only backend first

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    makers = {"optimization_history": (optuna.visualization.plot_optimization_history,
                                       optuna.visualization.matplotlib.plot_optimization_history),
              "param_importances": (optuna.visualization.plot_param_importances,
                                    optuna.visualization.matplotlib.plot_param_importances)}
    for name, (interactive, static) in makers.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna marks its matplotlib backend experimental
            try:
                interactive(study).write_html(folder / f"{name}.html", include_plotlyjs="cdn")
                axes = static(study)
            except (ValueError, RuntimeError, ZeroDivisionError):
                continue  # not enough complete trials, or no parameter varies
        written += [folder / f"{name}.html", save_figure(axes.figure, folder / f"{name}.png")]
    return written
