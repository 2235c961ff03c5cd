"""``orch launch``: run every algorithm's study of a sweep and register the winners.

For each algorithm, in file order: an Optuna study (ask/tell) proposes knob values; each trial is
a Ray task in its own placement group, at most ``search.parallel`` at once; finished trials are
told back to the study; the best complete trial's model is registered. Optuna ask/tell driving Ray
tasks was chosen over Ray Tune so that Optuna's own pruners and storage (and so ``--resume``) work
unchanged, and each trial's placement group can hold its shard workers' bundles.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
import ray
from optuna.trial import TrialState

from orchestrator import cluster, study as studies, tracking
from orchestrator.config import ConfigError, ImageData, Sweep
from orchestrator.trial import TrialRequest, TrialResult, describe_failure, run_trial

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclass
class AlgorithmSummary:
    algorithm: str
    metric: str
    best_value: float | None = None
    best_trial: int | None = None
    registration: tracking.Registration | None = None
    counts: dict[str, int] = field(default_factory=lambda: {"complete": 0, "pruned": 0, "failed": 0})


# Progress callback: (algorithm, counts, running, best value, total trials).
Progress = Callable[[str, dict[str, int], int, float | None, int], None]


def resolve_paths(sweep: Sweep) -> Sweep:
    """Absolute run folder and data path: trial processes may start in another directory."""
    updates: dict[str, Any] = {"run_dir": str(Path(sweep.run_dir).resolve())}
    if isinstance(sweep.data, ImageData):
        updates["data"] = sweep.data.model_copy(update={"path": str(Path(sweep.data.path).resolve())})
    return sweep.model_copy(update=updates)


def launch(sweep: Sweep, *, tracking_uri: str | None = None, address: str | None = None,
           resume: bool = False, progress: Progress | None = None) -> list[AlgorithmSummary]:
    sweep = resolve_paths(sweep)
    uri = sweep.tracking_uri(tracking_uri)
    storage_url = sweep.storage_url()
    cluster.connect(address or sweep.ray.address)
    check_cluster(sweep, uri, storage_url)
    mlflow_client = tracking.client(uri)
    experiment_id = _experiment(mlflow_client, sweep, uri, storage_url, resume)
    summaries = []
    for algorithm in sweep.algorithms:
        summaries.append(run_study(sweep, algorithm, mlflow_client, experiment_id, uri, storage_url,
                                   resume=resume, progress=progress))
    return summaries


def check_cluster(sweep: Sweep, uri: str, storage_url: str) -> None:
    """Refuse what cannot work on this cluster before anything is written."""
    cluster.check_fits(sweep.workers)
    if len(cluster.alive_nodes()) > 1:
        for what, url, use in (("tracking URI", uri, "an MLflow tracking server (http://HEAD:5000)"),
                               ("Optuna storage", storage_url, "a database URL (postgresql://...)")):
            if url.startswith("sqlite:") or url.startswith("file:"):
                raise ConfigError(f"the Ray cluster has {len(cluster.alive_nodes())} nodes but the {what} "
                                  f"{url} is a local file other nodes cannot reach; use {use}")


def _experiment(mlflow_client, sweep: Sweep, uri: str, storage_url: str, resume: bool) -> str:
    experiment_id = tracking.find_experiment(mlflow_client, sweep.name)
    existing = studies.existing_studies(storage_url, sweep.name)
    if resume:
        if experiment_id is None and not existing:
            raise ConfigError(f"--resume: no sweep named {sweep.name!r} in {uri}; launch it without --resume")
    elif experiment_id is not None or existing:
        raise ConfigError(f"a sweep named {sweep.name!r} already exists in {uri if experiment_id else storage_url}; "
                          "use --resume to continue it, or give the sweep another name")
    if experiment_id is None:
        experiment_id = tracking.create_experiment(mlflow_client, sweep.name, sweep.run_path(), uri,
                                                   {"orch.sweep": sweep.name,
                                                    "orch.task_fingerprint": sweep.task_fingerprint()})
    return experiment_id


@dataclass
class _Running:
    trial: optuna.trial.Trial
    request: TrialRequest
    group: Any
    attempt: int = 0


def run_study(sweep: Sweep, algorithm: str, mlflow_client, experiment_id: str, uri: str,
              storage_url: str, *, resume: bool, progress: Progress | None) -> AlgorithmSummary:
    study = studies.create_study(sweep, algorithm, load_if_exists=resume)
    parent = tracking.parent_run(mlflow_client, experiment_id, sweep.name, algorithm)
    summary = AlgorithmSummary(algorithm, sweep.search.metric)
    for trial in study.get_trials(deepcopy=False, states=FINISHED):
        summary.counts[studies.STATES[trial.state]] += 1
    launched = sum(summary.counts.values())
    running: dict[ray.ObjectRef, _Running] = {}
    space = sweep.algorithms[algorithm].knobs()
    sweep_dict = sweep.model_dump(mode="json")

    def report() -> None:
        if progress is not None:
            best = _best(study)
            progress(algorithm, summary.counts, len(running), best.value if best else None,
                     sweep.search.trials)

    def start(entry: _Running) -> None:
        entry.group = cluster.reserve(sweep.workers, sweep.ray.placement_strategy)
        running[cluster.submit_trial(run_trial, entry.group, sweep.workers, entry.request)] = entry

    report()
    while launched < sweep.search.trials or running:
        while launched < sweep.search.trials and len(running) < sweep.search.parallel:
            trial = study.ask()
            knobs = studies.suggest(trial, space)
            run = tracking.TrialRun.create(uri, experiment_id, parent, sweep_name=sweep.name,
                                           algorithm=algorithm, number=trial.number)
            run.log_params({**knobs, "algorithm": algorithm, "meta_batch": knobs.get(
                "meta_batch", sweep.training.meta_batch), "iterations": sweep.training.iterations,
                "seed": sweep.training.seed, "workers": sweep.workers.count,
                "task_fingerprint": sweep.task_fingerprint()})
            run.log_dict(sweep_dict, "sweep.json")
            trial.set_user_attr("mlflow_run_id", run.run_id)
            start(_Running(trial, TrialRequest(
                sweep=sweep_dict, algorithm=algorithm, number=trial.number, trial_id=trial._trial_id,
                study_name=study.study_name, knobs=knobs, run_id=run.run_id, tracking_uri=uri,
                storage_url=storage_url), group=None))
            launched += 1
            report()
        done, _ = ray.wait(list(running), num_returns=1)
        entry = running.pop(done[0])
        cluster.release(entry.group)
        try:
            result: TrialResult = ray.get(done[0])
        except Exception as error:  # the trial's process raised or died
            reason = describe_failure(error)
            if entry.attempt < sweep.search.retries:
                entry.attempt += 1
                start(entry)
                continue
            tracking.TrialRun(uri, entry.request.run_id).finish("failed", reason)
            result = TrialResult("failed", None, {}, reason)
        _tell(study, entry.trial, result)
        summary.counts[result.state] += 1
        report()
    best = _best(study)
    if best is not None:
        summary.best_value, summary.best_trial = best.value, best.number
        summary.registration = _register(sweep, algorithm, mlflow_client, best)
    tracking.finish_parent(mlflow_client, parent, {"number": summary.best_trial, "metrics": {
        sweep.search.metric: summary.best_value}} if best else None)
    return summary


def _tell(study: optuna.Study, trial: optuna.trial.Trial, result: TrialResult) -> None:
    if result.state == "complete":
        study.tell(trial, result.value)
    elif result.state == "pruned":
        study.tell(trial, state=TrialState.PRUNED)
    else:
        trial.set_user_attr("fail_reason", result.reason)
        study.tell(trial, state=TrialState.FAIL)


def _best(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no complete trial yet
        return None


def _register(sweep: Sweep, algorithm: str, mlflow_client, best) -> tracking.Registration | None:
    run_id = best.user_attrs.get("mlflow_run_id")
    model_uri = mlflow_client.get_run(run_id).data.tags.get(tracking.TAG_MODEL_URI) if run_id else None
    if model_uri is None:
        return None
    return tracking.register(mlflow_client, model_uri=model_uri,
                             name=f"{sweep.tracking.registry_prefix}{algorithm}", run_id=run_id,
                             sweep_name=sweep.name, trial=best.number,
                             metric_name=sweep.search.metric, metric=best.value,
                             direction=sweep.search.direction, fingerprint=sweep.task_fingerprint())
