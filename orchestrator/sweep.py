"""``orch launch``: run every algorithm's study of a sweep and register the winners.

For each algorithm, in file order: an Optuna study (ask/tell) proposes knob values; each trial is
a Ray task in its own placement group, at most ``search.parallel`` at once; finished trials are
told back to the study; the best complete trial's model is registered. Optuna ask/tell driving Ray
tasks was chosen over Ray Tune so that Optuna's own pruners and storage (and so ``--resume``) work
unchanged, and each trial's placement group can hold its shard workers' bundles.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
import ray
from optuna.trial import TrialState

from orchestrator import cluster, plots, study as studies, tracking
from orchestrator.config import ConfigError, ImageData, Sweep
from orchestrator.trial import TrialRequest, TrialResult, describe_failure, run_trial
from orchestrator.training import build_family, split_names

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
# User attribute of a trial whose driver died; it is rerun on resume and not counted.
INTERRUPTED = "orch_interrupted"


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
           resume: bool = False, progress: Progress | None = None, source: str = "sweep",
           connect_timeout: float = cluster.CONNECT_TIMEOUT_S) -> list[AlgorithmSummary]:
    """Run the sweep; ``source`` (the sweep file) prefixes error messages."""
    sweep = resolve_paths(sweep)
    validate_data(sweep, source)
    uri = sweep.tracking_uri(tracking_uri)
    storage_url = sweep.storage_url()
    tracking.check_reachable(uri)
    cluster.connect(address or sweep.ray.address, timeout_s=connect_timeout)
    check_cluster(sweep, uri, storage_url)
    mlflow_client = tracking.client(uri)
    experiment_id = _experiment(mlflow_client, sweep, uri, storage_url, resume)
    summaries = []
    for algorithm in sweep.algorithms:
        summaries.append(run_study(sweep, algorithm, mlflow_client, experiment_id, uri, storage_url,
                                   resume=resume, progress=progress))
    return summaries


def validate_data(sweep: Sweep, source: str = "sweep") -> None:
    """Open the data and draw one task of each split before anything is written, so a wrong
    path, a folder that is not an import, or ways/shots the split cannot serve fail at once."""
    train_split, val_split = split_names(sweep.data)
    try:
        family = build_family(sweep.data)
        for split in (train_split, val_split):
            family.task(split, sweep.training.seed, 0)
    except (ValueError, OSError) as error:
        raise ConfigError(f"{source}: data: {str(error).strip().splitlines()[0]}") from None


def check_cluster(sweep: Sweep, uri: str, storage_url: str) -> None:
    """Refuse what cannot work on this cluster before anything is written."""
    cluster.check_fits(sweep.workers)
    check_shared_stores(cluster.alive_nodes(), uri, storage_url)


def check_shared_stores(nodes: list[dict[str, Any]], uri: str, storage_url: str) -> None:
    """A local SQLite file is only reachable if every node runs on this machine."""
    hosts = sorted({node.get("NodeManagerAddress", "") for node in nodes})
    if len(hosts) < 2:
        return
    for what, url, use in (("tracking URI", uri, "an MLflow tracking server (http://HEAD:5000)"),
                           ("Optuna storage", storage_url, "a database URL (postgresql://...)")):
        if url.startswith(("sqlite:", "file:")) or "://" not in url:
            raise ConfigError(f"the Ray cluster spans {len(hosts)} hosts ({', '.join(hosts)}) but the "
                              f"{what} {url} is a local file the other hosts cannot reach; use {use}")


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
    group: Any = None
    attempt: int = 0


def run_study(sweep: Sweep, algorithm: str, mlflow_client, experiment_id: str, uri: str,
              storage_url: str, *, resume: bool, progress: Progress | None) -> AlgorithmSummary:
    runner = StudyRunner(sweep, algorithm, mlflow_client, experiment_id, uri, storage_url,
                         resume=resume, progress=progress)
    return runner.run()


class StudyRunner:
    """One algorithm's study: keep ``search.parallel`` trials on Ray until ``search.trials`` have
    finished, then log the study's plots and register the best model."""

    def __init__(self, sweep: Sweep, algorithm: str, mlflow_client, experiment_id: str, uri: str,
                 storage_url: str, *, resume: bool, progress: Progress | None):
        self.sweep, self.algorithm = sweep, algorithm
        self.client, self.experiment_id, self.uri, self.storage_url = (
            mlflow_client, experiment_id, uri, storage_url)
        self.progress = progress
        self.study = studies.create_study(sweep, algorithm, load_if_exists=resume)
        self.parent = tracking.parent_run(mlflow_client, experiment_id, sweep.name, algorithm)
        self.summary = AlgorithmSummary(algorithm, sweep.search.metric)
        self.space = sweep.space(algorithm)
        self.sweep_dict = sweep.model_dump(mode="json")
        self.running: dict[ray.ObjectRef, _Running] = {}
        self.recover_interrupted()
        for trial in self.study.get_trials(deepcopy=False, states=FINISHED):
            if not trial.user_attrs.get(INTERRUPTED):
                self.summary.counts[studies.STATES[trial.state]] += 1
        self.launched = sum(self.summary.counts.values())

    def run(self) -> AlgorithmSummary:
        self.report()
        while self.launched < self.sweep.search.trials or self.running:
            while self.launched < self.sweep.search.trials and len(self.running) < self.sweep.search.parallel:
                self.launch_next()
            self.collect_one()
        return self.finish()

    def recover_interrupted(self) -> None:
        """Trials left running by a driver that died: their runs are deleted, they are marked
        failed (and ignored in counts), and their parameters are queued to run again."""
        storage = self.study._storage
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            for run_id in tracking.runs_of_trial(self.client, self.experiment_id, self.algorithm,
                                                 trial.number):
                self.client.delete_run(run_id)
            storage.set_trial_user_attr(trial._trial_id, INTERRUPTED, True)
            storage.set_trial_user_attr(trial._trial_id, "fail_reason", "interrupted; rerun on resume")
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            self.study.enqueue_trial(trial.params, user_attrs={"orch_rerun_of": trial.number},
                                     skip_if_exists=False)

    def launch_next(self) -> None:
        # A sampler seeded by the trial's slot: a resumed sweep asks exactly what an
        # uninterrupted one would have asked, given the same finished trials.
        self.study.sampler = studies.make_sampler(self.sweep.search,
                                                  self.sweep.training.seed + self.launched)
        trial = self.study.ask()
        knobs = studies.suggest(trial, self.space)
        sweep = self.sweep
        run = tracking.TrialRun.create(self.uri, self.experiment_id, self.parent,
                                       sweep_name=sweep.name, algorithm=self.algorithm,
                                       number=trial.number)
        run.log_params({**knobs, "algorithm": self.algorithm,
                        "meta_batch": knobs.get("meta_batch", sweep.training.meta_batch),
                        "iterations": sweep.training.iterations, "seed": sweep.training.seed,
                        "workers": sweep.workers.count, "task_fingerprint": sweep.task_fingerprint()})
        run.log_dict(self.sweep_dict, "sweep.json")
        trial.set_user_attr("mlflow_run_id", run.run_id)
        self.start(_Running(trial, TrialRequest(
            sweep=self.sweep_dict, algorithm=self.algorithm, number=trial.number,
            trial_id=trial._trial_id, study_name=self.study.study_name, knobs=knobs,
            run_id=run.run_id, tracking_uri=self.uri, storage_url=self.storage_url)))
        self.launched += 1
        self.report()

    def start(self, entry: _Running) -> None:
        entry.group = cluster.reserve(self.sweep.workers, self.sweep.ray.placement_strategy)
        ref = cluster.submit_trial(run_trial, entry.group, self.sweep.workers, entry.request)
        self.running[ref] = entry

    def collect_one(self) -> None:
        done, _ = ray.wait(list(self.running), num_returns=1)
        entry = self.running.pop(done[0])
        cluster.release(entry.group)
        try:
            result: TrialResult = ray.get(done[0])
        except Exception as error:  # the trial's process raised or died
            reason = describe_failure(error)
            if entry.attempt < self.sweep.search.retries:
                entry.attempt += 1
                self.start(entry)
                return
            tracking.TrialRun(self.uri, entry.request.run_id).finish("failed", reason)
            result = TrialResult("failed", None, {}, reason)
        _tell(self.study, entry.trial, result)
        self.summary.counts[result.state] += 1
        self.report()

    def report(self) -> None:
        if self.progress is not None:
            best = _best(self.study)
            self.progress(self.algorithm, self.summary.counts, len(self.running),
                          best.value if best else None, self.sweep.search.trials)

    def finish(self) -> AlgorithmSummary:
        summary, sweep = self.summary, self.sweep
        _log_study_plots(self.client, self.parent, self.study)
        best = _best(self.study)
        if best is not None:
            summary.best_value, summary.best_trial = best.value, best.number
            summary.registration = _register(sweep, self.algorithm, self.client, best)
        tracking.finish_parent(self.client, self.parent, {"number": summary.best_trial, "metrics": {
            sweep.search.metric: summary.best_value}} if best else None)
        return summary


def _log_study_plots(mlflow_client, parent_run_id: str, study: optuna.Study) -> None:
    with tempfile.TemporaryDirectory() as folder:
        for path in plots.study_plots(study, Path(folder)):
            mlflow_client.log_artifact(parent_run_id, str(path), "plots")


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
