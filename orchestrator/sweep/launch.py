"""``orch launch``: run every algorithm's study of a sweep and register the winners.

For each algorithm, in file order: an Optuna study (ask/tell) proposes knob values; each trial is
a Ray task in its own placement group, at most ``search.parallel`` at once; finished trials are
told back to the study; the best complete trial's model is registered. Optuna ask/tell driving Ray
tasks was chosen over Ray Tune so that Optuna's own pruners and storage (and so ``--resume``) work
unchanged, and each trial's placement group can hold its shard workers' bundles.

A trial whose process or node dies -- a failure of the machine, not of its code -- is started
again from its last checkpoint, up to ``search.restarts`` times, as the same Optuna trial and the
same MLflow run; so are the trials a killed ``orch launch`` left running, on ``--resume``.
Failures of the machinery never fail a trial: one whose restarts ran out is set aside unfinished
(resumable), a store away for longer than ``services.outage_s`` and a Ray that lost this
machine's node stop the sweep with one line, every unfinished trial kept for ``--resume``.

A sweep with ``model.init`` resolves that model here, once, before anything is written; every
trial's request carries its backbone weights (``pretrained``).

With several objectives (``search.metric`` a list) every model on the study's Pareto front is
registered, tagged ``orch.pareto_front``; only the member best on the first objective is offered
the champion alias. The front is also a table (``pareto/front.csv``) and a plot on the
algorithm's run.
"""

from __future__ import annotations

import csv
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from orchestrator.models import pretrained
from orchestrator.services import cluster, retry, study as studies, tracking
from orchestrator.sweep import checkpoints
from orchestrator.config import Choices, ConfigError, ImageData, Range, Sweep
from orchestrator.errors import MachineryError, first_line
from orchestrator.sweep.trial import TrialRequest, TrialResult, describe_failure, run_trial
from orchestrator.training.factory import build_family, split_names, task_shape
from pipelines.base import TaskFamily

# User attribute of a trial whose driver died and that could not be continued (its knobs were
# never recorded); it is rerun as a new trial on resume and not counted.
INTERRUPTED = "orch_interrupted"


@dataclass
class AlgorithmSummary:
    algorithm: str
    metric: str
    best_value: float | None = None
    best_trial: int | None = None
    registration: tracking.Registration | None = None  # the best trial's, on the first objective
    # Several objectives: the Pareto front's trial numbers and every member's registration.
    front: list[int] = field(default_factory=list)
    front_registrations: list[tracking.Registration] = field(default_factory=list)
    # "unfinished": trials the machinery failed beyond their restarts, kept for --resume.
    counts: dict[str, int] = field(default_factory=lambda: {"complete": 0, "pruned": 0, "failed": 0,
                                                            "unfinished": 0})
    restarts: int = 0  # trials started again after their process or node died


# Progress callback: (algorithm, counts, running, best value, total trials, restarts).
Progress = Callable[[str, dict[str, int], int, float | None, int, int], None]
# Notice callback: one line worth the user's attention (a restart, a refused checkpoint).
Notice = Callable[[str], None]


def resolve_paths(sweep: Sweep) -> Sweep:
    """Absolute run folder, data path and ``model.init`` folder: trial processes may start in
    another directory."""
    updates: dict[str, Any] = {"run_dir": str(Path(sweep.run_dir).resolve())}
    init = sweep.model.init
    if init is not None and not init.startswith(("models:/", "runs:/")):
        updates["model"] = sweep.model.model_copy(update={"init": str(Path(init).resolve())})
    storage = sweep.training.checkpoint_storage
    if storage and "://" not in storage:
        updates["training"] = sweep.training.model_copy(
            update={"checkpoint_storage": str(Path(storage).resolve())})
    if isinstance(sweep.data, ImageData):
        updates["data"] = sweep.data.resolved()
    return sweep.model_copy(update=updates)


def launch(sweep: Sweep, *, tracking_uri: str | None = None, address: str | None = None,
           resume: bool = False, progress: Progress | None = None, notice: Notice | None = None,
           source: str = "sweep",
           connect_timeout: float = cluster.CONNECT_TIMEOUT_S) -> list[AlgorithmSummary]:
    """Run the sweep; ``source`` (the sweep file) prefixes error messages."""
    relative_data = sweep.data.relative_paths() if isinstance(sweep.data, ImageData) else []
    retry.configure(outage_s=sweep.services.outage_s, notice=notice)
    sweep = resolve_paths(sweep)
    family = validate_data(sweep, source)
    uri = sweep.tracking_uri(tracking_uri)
    storage_url = sweep.storage_url()
    tracking.check_reachable(uri)
    init = pretrained.resolve(sweep, uri, input_shape=task_shape(family)["input_shape"],
                              source=source)
    check_sweep_name(sweep, uri, storage_url, resume)
    if resume:
        check_same_init(sweep, uri, init)
        studies.check_same_objectives(storage_url, sweep)
        studies.check_no_live_driver(storage_url, sweep.name)
    cluster.connect(address or sweep.ray.address, timeout_s=connect_timeout)
    check_cluster(sweep, uri, storage_url, relative_data)
    if sweep.training.checkpoints_enabled():
        checkpoints.CheckpointStore(sweep.checkpoint_uri()).check()
    mlflow_client = tracking.client(uri)
    experiment_id = tracking.create_experiment(
        mlflow_client, sweep.name, sweep.run_path(), uri,
        {"orch.sweep": sweep.name, "orch.task_fingerprint": sweep.task_fingerprint(),
         **tracking.init_tags(init.record() if init else None)})
    summaries = []
    try:
        for algorithm in sweep.algorithms:
            summaries.append(StudyRunner(sweep, algorithm, mlflow_client, experiment_id, uri,
                                         storage_url, resume=resume, progress=progress,
                                         notice=notice, init=init).run())
    except MachineryError as error:  # a store away past the bound, Ray without this node
        raise type(error)(f"{first_line(error)}; every unfinished trial is kept: continue with "
                          f"orch launch {source} --resume") from None
    return summaries


def check_same_init(sweep: Sweep, uri: str, init: pretrained.Init | None) -> None:
    """Refuse to resume a sweep whose ``model.init`` now names other weights than it started
    from (an alias moved since): its trials would not share one starting point."""
    tags = tracking.experiment_tags(uri, sweep.name)
    if tags is None:
        return
    started = tags.get(tracking.TAG_INIT_DIGEST, "")
    now = init.digest if init else ""
    if started != now:
        was = (f"backbone weights {started} ({tags.get(tracking.TAG_INIT + 'from', '?')})"
               if started else "scratch")
        is_now = f"weights {now} ({init.origin})" if init else "scratch"
        raise ConfigError(f"--resume: sweep {sweep.name!r} started from {was}, but model.init now "
                          f"gives {is_now}; pin the version it started from "
                          "(models:/NAME/VERSION) or launch a new sweep")


def validate_data(sweep: Sweep, source: str = "sweep") -> TaskFamily:
    """Open the data and draw one task of each split before anything is written, so a wrong
    path, a folder that is not an import, or ways/shots the split cannot serve fail at once.
    Returns the task family."""
    train_split, val_split = split_names(sweep.data)
    try:
        family = build_family(sweep.data)
        for split in (train_split, val_split):
            family.task(split, sweep.training.seed, 0)
    except (ValueError, OSError) as error:
        raise ConfigError(f"{source}: data: {first_line(error)}") from None
    return family


def check_cluster(sweep: Sweep, uri: str, storage_url: str,
                  relative_data: list[str] | None = None) -> None:
    """Refuse what cannot work on this cluster before anything is written."""
    cluster.check_fits(sweep.workers)
    check_shared_stores(cluster.alive_nodes(), uri, storage_url,
                        sweep.checkpoint_uri() if sweep.training.checkpoints_enabled() else None,
                        relative_data or [])


def check_shared_stores(nodes: list[dict[str, Any]], uri: str, storage_url: str,
                        checkpoint_uri: str | None = None,
                        relative_data: list[str] | None = None) -> None:
    """A local file or folder is only reachable if every node runs on this machine; a data
    path given relative to the driver's working directory names no folder the other hosts
    have (an absolute one may: an image, a shared mount, the checkout the launcher copies)."""
    hosts = sorted({node.get("NodeManagerAddress", "") for node in nodes})
    if len(hosts) < 2:
        return
    stores = [("tracking URI", uri, "an MLflow tracking server (http://HEAD:5000)"),
              ("Optuna storage", storage_url, "a database URL (postgresql://...)")]
    if checkpoint_uri is not None:
        stores.append(("checkpoint storage", checkpoint_uri,
                       "training.checkpoint_storage: s3://BUCKET/PREFIX (or gs://, hdfs://)"))
    for what, url, use in stores:
        if url.startswith(("sqlite:", "file:")) or "://" not in url:
            raise ConfigError(f"the Ray cluster spans {len(hosts)} hosts ({', '.join(hosts)}) but the "
                              f"{what} {url} is a local file the other hosts cannot reach; use {use}")
    if relative_data:
        raise ConfigError(f"the Ray cluster spans {len(hosts)} hosts ({', '.join(hosts)}) but "
                          f"data.path {relative_data[0]} is a relative local path the other hosts cannot "
                          "reach; use a URI every node can read (s3://BUCKET/PREFIX, gs://, "
                          "hdfs://) or an absolute path that exists on every node")


def check_sweep_name(sweep: Sweep, uri: str, storage_url: str, resume: bool) -> None:
    """Refuse, before Ray starts or anything is written, a new sweep whose name is taken and a
    ``--resume`` of a sweep that does not exist."""
    in_tracking = tracking.experiment_exists(uri, sweep.name)
    in_storage = studies.sweep_exists(storage_url, sweep.name)
    if resume and not (in_tracking or in_storage):
        raise ConfigError(f"--resume: no sweep named {sweep.name!r} in {uri}; launch it without --resume")
    if not resume and (in_tracking or in_storage):
        raise ConfigError(f"a sweep named {sweep.name!r} already exists in "
                          f"{uri if in_tracking else storage_url}; use --resume to continue it, or "
                          "give the sweep another name")


@dataclass
class _Running:
    trial: studies.TrialRecord
    request: TrialRequest
    saves: checkpoints.TrialCheckpoints | None = None  # its checkpoints; None: the sweep saves none
    group: Any = None
    attempt: int = 0  # retries after the trial's code raised
    restarts: int = 0  # restarts after its process or node died


class StudyRunner:
    """One algorithm's study: keep ``search.parallel`` trials on Ray until ``search.trials`` have
    finished, then log the study's plots and register the best model."""

    def __init__(self, sweep: Sweep, algorithm: str, mlflow_client, experiment_id: str, uri: str,
                 storage_url: str, *, resume: bool, progress: Progress | None,
                 notice: Notice | None = None, init: pretrained.Init | None = None):
        self.sweep, self.algorithm, self.init = sweep, algorithm, init
        self.client, self.experiment_id, self.uri, self.storage_url = (
            mlflow_client, experiment_id, uri, storage_url)
        self.progress, self.notice = progress, notice
        self.study = studies.SweepStudy(sweep, algorithm, load_if_exists=resume)
        self.parent = tracking.parent_run(mlflow_client, experiment_id, sweep.name, algorithm)
        self.summary = AlgorithmSummary(algorithm, sweep.search.first_objective)
        self.space = sweep.space(algorithm)
        self.sweep_dict = sweep.model_dump(mode="json")
        self.running: dict[Any, _Running] = {}  # by the Ray task that drives the trial
        self.queued: list[_Running] = self.continue_interrupted()
        for trial in self.study.trials("complete", "pruned", "failed"):
            if not trial.user_attrs.get(INTERRUPTED):
                self.summary.counts[trial.state] += 1
        self.launched = sum(self.summary.counts.values()) + len(self.queued)

    def run(self) -> AlgorithmSummary:
        retry.reset_spent()  # what the stores cost the driver for this study: logged by finish
        self.study.drive(lambda: [entry.trial.trial_id for entry in list(self.running.values())])
        try:
            self.report()
            while self.launched < self.sweep.search.trials or self.running or self.queued:
                while len(self.running) < self.sweep.search.parallel and (
                        self.queued or self.launched < self.sweep.search.trials):
                    if self.queued:
                        self.start(self.queued.pop(0))
                    else:
                        self.launch_next()
                self.collect_one()
            return self.finish()
        finally:
            self.study.release()

    def continue_interrupted(self) -> list[_Running]:
        """Trials left running by a sweep driver that died continue as they were: the same
        Optuna trial and MLflow run, from their last checkpoint. One whose knobs were never
        fully suggested cannot: it is marked failed (not counted) and its parameters queued as a
        new trial."""
        continued = []
        searched = [name for name, knob in self.space.items() if isinstance(knob, (Range, Choices))]
        for trial in self.study.trials("running"):
            runs = [run.info.run_id for run in tracking.trial_runs(
                self.client, self.experiment_id, algorithm=self.algorithm, number=trial.number)]
            if any(name not in trial.params for name in searched):
                tracking.delete_runs(self.client, runs)
                self.study.requeue_as_new(trial, INTERRUPTED)
                continue
            knobs = {name: trial.params[name] if name in searched else knob
                     for name, knob in self.space.items()}
            run_id = trial.user_attrs.get("mlflow_run_id") or next(iter(runs), None)
            if run_id is None:
                run_id = self.create_run(trial, knobs)
            continued.append(self.entry(trial, knobs, run_id))
        return continued

    def launch_next(self) -> None:
        trial, knobs = self.study.ask(self.space)
        entry = self.entry(trial, knobs, self.create_run(trial, knobs))
        if entry.saves is not None:  # left by an earlier sweep of the same name, deleted
            entry.saves.remove()
        self.start(entry)
        self.launched += 1
        self.report()

    def create_run(self, trial: studies.TrialRecord, knobs: dict[str, Any]) -> str:
        sweep = self.sweep
        run = tracking.TrialRun.create(self.uri, self.experiment_id, self.parent,
                                       sweep_name=sweep.name, algorithm=self.algorithm,
                                       number=trial.number)
        run.log_params({**knobs, "algorithm": self.algorithm,
                        "meta_batch": knobs.get("meta_batch", sweep.training.meta_batch),
                        "iterations": sweep.training.iterations, "seed": sweep.training.seed,
                        "workers": sweep.workers.count, "task_fingerprint": sweep.task_fingerprint(),
                        **data_mix_params(sweep)})
        run.set_tags({**tracking.objective_tags(sweep.search.objectives, sweep.search.directions),
                      **tracking.init_tags(self.init.record() if self.init else None)})
        run.log_dict(self.sweep_dict, "sweep.json")
        self.study.set_user_attr(trial, "mlflow_run_id", run.run_id)
        return run.run_id

    def entry(self, trial: studies.TrialRecord, knobs: dict[str, Any], run_id: str) -> _Running:
        """A trial ready to start: what its process needs, and where its checkpoints live."""
        request = TrialRequest(sweep=self.sweep_dict, algorithm=self.algorithm,
                               number=trial.number, study_name=self.study.name, knobs=knobs,
                               run_id=run_id, tracking_uri=self.uri, storage_url=self.storage_url,
                               init=self.init)
        return _Running(trial, request, checkpoints.TrialCheckpoints.of(
            self.sweep, self.algorithm, trial.number, knobs,
            init_digest=self.init.digest if self.init else None))

    def start(self, entry: _Running) -> None:
        """Place the trial on Ray, continuing from its newest loadable checkpoint if any."""
        if entry.saves is not None:
            found = entry.saves.latest()
            for line in found.refused:
                self.say(line)
            if found.path is not None:
                self.say(f"{self.algorithm} trial {entry.request.number} continues from its "
                         f"checkpoint at iteration {found.iteration}")
            elif found.refused:
                self.say(f"{self.algorithm} trial {entry.request.number} starts from scratch: "
                         "no loadable checkpoint")
            entry.request = replace(entry.request, resume_from=found.path)
        entry.group = cluster.reserve(self.sweep.workers, self.sweep.ray.placement_strategy)
        ref = cluster.submit_trial(run_trial, entry.group, self.sweep.workers, entry.request)
        self.running[ref] = entry

    def collect_one(self) -> None:
        done = cluster.first_done(list(self.running))
        entry = self.running.pop(done)
        cluster.release(entry.group)
        try:
            result: TrialResult = cluster.result(done)
        except Exception as error:  # the trial's process raised or died
            if self.machinery_failed(entry, error):
                return
            if entry.attempt < self.sweep.search.retries:
                entry.attempt += 1
                self.start(entry)
                return
            reason = describe_failure(error)
            tracking.TrialRun(self.uri, entry.request.run_id).finish("failed", reason)
            result = TrialResult("failed", None, {}, reason)
        self.study.tell(entry.trial, result.state, result.values, result.reason)
        self.summary.counts[result.state] += 1
        self.forget_checkpoints(entry)
        self.report()

    def machinery_failed(self, entry: _Running, error: Exception) -> bool:
        """Deal with a trial that failed because the machinery did, never marking it failed:
        restart it from its checkpoint while ``search.restarts`` allows, then set it aside
        unfinished; stop the sweep where no trial can go on (a store away past the bound, or
        the Ray of this process without its node). False: the trial's own code failed."""
        cause = getattr(error, "cause", None) or error
        if isinstance(cause, retry.ServiceOutage):
            raise cause
        if not cluster.is_machine_failure(error):
            return False
        reason = describe_failure(error)
        number = entry.request.number
        if cluster.lost_local_node(error):
            raise MachineryError(f"the Ray this sweep runs on lost this machine's node ({reason}), "
                                 "so every trial would fail the same way: stopped at "
                                 f"{self.algorithm} trial {number}, nothing marked failed")
        search = self.sweep.search
        if entry.restarts < search.restarts:
            entry.restarts += 1
            self.summary.restarts += 1
            self.say(f"{self.algorithm} trial {number}: {reason}; restart {entry.restarts} of "
                     f"{search.restarts}")
            self.start(entry)
        else:
            self.summary.counts["unfinished"] += 1
            self.say(f"{self.algorithm} trial {number}: {reason} after {entry.restarts} restarts "
                     "(search.restarts); set aside unfinished, for orch launch --resume")
        self.report()
        return True

    def forget_checkpoints(self, entry: _Running) -> None:
        """A finished trial's checkpoints are of no further use."""
        if entry.saves is None:
            return
        try:
            entry.saves.remove()
        except OSError as error:
            self.say(f"could not delete {entry.saves.folder}: {first_line(error)}")

    def say(self, line: str) -> None:
        if self.notice is not None:
            self.notice(line)

    def report(self) -> None:
        if self.progress is not None:
            best = self.study.best()
            self.progress(self.algorithm, self.summary.counts, len(self.running),
                          best.value if best else None, self.sweep.search.trials,
                          self.summary.restarts)

    def finish(self) -> AlgorithmSummary:
        summary, sweep = self.summary, self.sweep
        with tempfile.TemporaryDirectory() as folder:
            tracking.log_artifacts(self.client, self.parent, self.study.plots(Path(folder)), "plots")
        best = self.study.best()
        if best is not None:
            summary.best_value, summary.best_trial = best.value, best.number
        if best is not None and self.study.several:
            self.register_front(best)
        elif best is not None:
            summary.registration = _register(sweep, self.algorithm, self.client, best, self.init)
        tracking.finish_parent(self.client, self.parent, {"number": summary.best_trial, "metrics": {
            sweep.search.first_objective: summary.best_value}} if best else None,
            extra=tracking.store_seconds(retry.spent_s()))
        return summary

    def register_front(self, best: studies.TrialRecord) -> None:
        """Register every model of the Pareto front (only ``best``, the member best on the
        first objective, may take the champion alias) and log the front as a table."""
        summary, search = self.summary, self.sweep.search
        rows = []
        for trial in self.study.front():
            why = ("" if trial.number == best.number else
                   f"Pareto front member; the champion follows {search.first_objective}, on "
                   f"which trial {best.number} is best")
            registration = _register(self.sweep, self.algorithm, self.client, trial, self.init,
                                     front=True, not_champion_why=why)
            summary.front.append(trial.number)
            if registration is not None:
                summary.front_registrations.append(registration)
            if trial.number == best.number:
                summary.registration = registration
            rows.append({"trial": trial.number,
                         **dict(zip(search.objectives, trial.values or ())),
                         **{f"param.{k}": v for k, v in sorted(trial.params.items())},
                         "model_version": registration.version if registration else "",
                         "champion": bool(registration and registration.champion),
                         "mlflow_run_id": trial.user_attrs.get("mlflow_run_id", "")})
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "front.csv"
            columns = list(dict.fromkeys(key for row in rows for key in row))
            with path.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
                writer.writeheader()
                writer.writerows(rows)
            tracking.log_artifacts(self.client, self.parent, [path], "pareto")


def data_mix_params(sweep: Sweep) -> dict[str, str]:
    """A multi-source sweep's imports and their shares of the meta-training episodes, as run
    parameters; nothing for one import."""
    if not isinstance(sweep.data, ImageData) or isinstance(sweep.data.path, str):
        return {}
    return {"data_sources": " ".join(sweep.data.paths()),
            "data_weights": ",".join(f"{w:.4g}" for w in sweep.data.source_weights())}


def _register(sweep: Sweep, algorithm: str, mlflow_client, trial: studies.TrialRecord,
              init: pretrained.Init | None, *, front: bool = False,
              not_champion_why: str = "") -> tracking.Registration | None:
    """Register ``trial``'s model; ``not_champion_why`` set: without offering it the alias."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    model_uri = tracking.model_uri_of_run(mlflow_client, run_id) if run_id else None
    if model_uri is None:
        return None
    search = sweep.search
    several = len(search.objectives) > 1
    return tracking.register(mlflow_client, model_uri=model_uri,
                             name=f"{sweep.tracking.registry_prefix}{algorithm}", run_id=run_id,
                             sweep_name=sweep.name, trial=trial.number,
                             metric_name=search.first_objective, metric=trial.value,
                             direction=search.directions[0], fingerprint=sweep.task_fingerprint(),
                             init=init.record() if init else None,
                             objectives=dict(zip(search.objectives, trial.values))
                             if several else None,
                             directions=search.directions, front=front,
                             may_be_champion=not not_champion_why,
                             not_champion_why=not_champion_why)
