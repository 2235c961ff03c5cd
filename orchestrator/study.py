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

from orchestrator.config import Choices, Range, Search, Sweep

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
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(5, max(1, search.trials // 2)))


def make_pruner(search: Search) -> optuna.pruners.BasePruner:
    if search.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if search.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def create_study(sweep: Sweep, algorithm: str, *, load_if_exists: bool) -> optuna.Study:
    return optuna.create_study(
        study_name=study_name(sweep.name, algorithm), storage=storage(sweep.storage_url()),
        direction=sweep.search.direction, sampler=make_sampler(sweep.search, sweep.training.seed),
        pruner=make_pruner(sweep.search), load_if_exists=load_if_exists)


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


def trial_id(trial: optuna.trial.Trial) -> int:
    """The storage's id of a trial: what a trial's own process needs to report to it."""
    return trial._trial_id


def trial_handle(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> optuna.trial.Trial:
    """A live handle on a trial a sweep driver that died left running, to continue it."""
    return optuna.trial.Trial(study, frozen._trial_id)


def mark_interrupted(study: optuna.Study, frozen: optuna.trial.FrozenTrial, marker: str) -> None:
    """Record a running trial that cannot be continued as failed (flagged ``marker``, so it is
    not counted) and queue its parameters as a new trial."""
    handle = trial_handle(study, frozen)
    handle.set_user_attr(marker, True)
    handle.set_user_attr("fail_reason", "interrupted; rerun on resume")
    study.tell(handle, state=TrialState.FAIL)
    study.enqueue_trial(frozen.params, user_attrs={"orch_rerun_of": frozen.number},
                        skip_if_exists=False)


class TrialReporter:
    """A trial's handle on its study from the process that trains it: report and ask to prune.
    Steps the trial reported before it restarted are not reported again (Optuna would ignore
    them with a warning); the pruner is still asked, and answers as it did."""

    def __init__(self, storage_url: str, name: str, number: int, search: Search):
        study = optuna.load_study(study_name=name, storage=storage(storage_url),
                                  pruner=make_pruner(search))
        (frozen,) = [t for t in study.get_trials(deepcopy=False) if t.number == number]
        self.reported = set(frozen.intermediate_values)
        self.trial = optuna.trial.Trial(study, frozen._trial_id)

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
