"""Everything orch asks of MLflow: experiments and runs, metrics, models and the registry.

Layout of a sweep in MLflow: one experiment named after the sweep; one parent run per algorithm;
one nested run per trial with every resolved parameter, metric curves over meta-iterations, the
Ray node ids of its workers (tag ``orch.worker_nodes``), the model it started from
(``orch.init.*``, with ``model.init``) and its final model as a pyfunc model. After each
algorithm's study the best trial's model becomes a new version of ``<prefix><algorithm>``; the
``champion`` alias moves to it only if it beats the current champion on the same task fingerprint
from the same initial weights.

A tracking server restarts now and then: every call waits it out (``RetryingClient``, up to
``services.outage_s``), creations are found-or-created so that a call repeated after a lost
answer makes no second run, experiment or version, and a trial's metric steps wait in its
outbox while it trains (``TrialRun``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import mlflow
from filelock import FileLock
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from learners.transduction import Transduction
from orchestrator.services import champion as champion_policy, retry
from orchestrator.errors import MachineryError, UserError, first_line
from orchestrator.config import URI_FORMS
from orchestrator.training.meta_model import MetaModel, ModelSource, decode_inputs, input_example

# MLflow logs table creation and migrations at INFO when a store opens; orch has its own output.
logging.getLogger("mlflow").setLevel(logging.WARNING)
# MLflow's own HTTP retries (7, backoff factor 2: minutes per call) and 120 s timeout would hide
# an outage inside one call; orch retries whole calls itself (``retry``), so each attempt is
# kept short. Set either variable to override.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
# Against a tracking server MLflow prints a "View run ... at" line to stdout for every run it
# ends; orch's own output says where to look.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

CHAMPION = "champion"
TAG_SWEEP = "orch.sweep"
TAG_ALGORITHM = "orch.algorithm"
TAG_TRIAL = "orch.trial"
TAG_KIND = "orch.kind"  # "algorithm" for parent runs, "trial" for nested runs
TAG_NODES = "orch.worker_nodes"
TAG_MODEL_URI = "orch.model_uri"
TAG_FAIL_REASON = "orch.fail_reason"
TAG_STATE = "orch.state"
# Where the trial's driver process runs ("<node id> <pid>"), at its latest start.
TAG_DRIVER = "orch.driver"
# Times the trial was started again after its first start (machine failure, retry or --resume),
# iterations it computed twice because of that, and the checkpoint it last continued from.
TAG_RESTARTS = "orch.restarts"
TAG_RECOMPUTED = "orch.recomputed_iterations"
TAG_RESUMED_FROM = "orch.resumed_from"
# What a trial run and a registered version were scored on: the first objective and its
# direction (orch.metric, orch.direction), and every objective in order as name:direction
# (orch.objectives); a version's value of each is orch.objective.<name>.
TAG_METRIC = "orch.metric"
TAG_DIRECTION = "orch.direction"
TAG_OBJECTIVES = "orch.objectives"
TAG_OBJECTIVE = "orch.objective."
# A version on its sweep's Pareto front (several objectives): "true".
TAG_FRONT = "orch.pareto_front"
# Why a version did not take the champion alias when it was registered (empty: it did).
TAG_CHAMPION_NOTE = "orch.champion_note"
# Where a trial's cost objectives (adapt_ms) were timed (compare.timing_context).
TAG_COSTS_TIMED_ON = "orch.costs_timed_on"


REACH_TIMEOUT_S = 5.0


def check_reachable(uri: str) -> None:
    """Fail within seconds, naming the URI, if a tracking server does not answer (MLflow's own
    client retries for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=REACH_TIMEOUT_S).close()
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise MachineryError(f"cannot reach the MLflow tracking server at {uri} ({reason}); "
                              "check tracking.uri / --tracking-uri / MLFLOW_TRACKING_URI") from None


def require_store(uri: str, what: str = "MLflow tracking store") -> str:
    """Refuse a local SQLite store that does not exist: reading it would create an empty one."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise FileNotFoundError(f"no {what} at {uri}; run `orch launch` first, or pass the URL "
                                "of the store the sweep used")
    return uri


def service_name(uri: str) -> str:
    return "MLflow tracking server" if uri.startswith(("http://", "https://")) else "MLflow tracking store"


def transient(error: BaseException) -> bool:
    """Whether ``error`` says the tracking server or its database was away (no connection, a
    timeout, a 5xx or 429 answer, a locked SQLite file) rather than that the call was wrong."""
    import requests
    import sqlalchemy.exc

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (retry.StoreUnavailable, requests.exceptions.ConnectionError,
                              requests.exceptions.Timeout, sqlalchemy.exc.OperationalError)):
            return True
        if isinstance(error, MlflowException):
            status = error.get_http_status_code()
            if status >= 500 or status == 429:
                return True
        error = error.__cause__ or error.__context__
    return False


class RetryingClient:
    """An ``MlflowClient`` whose every call waits out a tracking server or store that does not
    answer (``retry.call``); ``raw`` is the client itself, for a call that must not be repeated
    on its own (see ``find_or_create``)."""

    def __init__(self, raw: MlflowClient, uri: str):
        self.raw, self.uri = raw, uri

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.raw, name)
        if not callable(attribute):
            return attribute

        @functools.wraps(attribute)
        def retried(*args: Any, **kwargs: Any) -> Any:
            return self.retrying(lambda: attribute(*args, **kwargs))

        return retried

    def retrying(self, function: Any) -> Any:
        return retry.call(function, service=service_name(self.uri), url=self.uri,
                          transient=transient)


def client(uri: str) -> RetryingClient:
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    # An explicit client, never mlflow.set_tracking_uri: that also sets MLFLOW_TRACKING_URI in
    # the environment, which would redirect every later sweep of this process and its children.
    if not uri.startswith("sqlite:///"):
        return RetryingClient(MlflowClient(tracking_uri=uri, registry_uri=uri), uri)
    # Opening a store creates its tables (the client's constructor already opens the tracking
    # store); two sweeps starting at once on a new file would race to create them. Open both
    # stores, tracking and registry, under a file lock.
    with FileLock(uri.removeprefix("sqlite:///") + ".lock"):
        mlflow_client = RetryingClient(MlflowClient(tracking_uri=uri, registry_uri=uri), uri)
        mlflow_client.search_registered_models(max_results=1)
    return mlflow_client


def find_or_create(mlflow_client: RetryingClient, find: Any, create: Any) -> Any:
    """``find()`` or else ``create()``, retried as one: a creation whose answer an outage lost
    is found on the next attempt instead of being made twice. ``create`` uses the raw client."""
    return mlflow_client.retrying(lambda: find() or create())


def artifact_location(uri: str, run_dir: Path) -> str | None:
    """Artifacts live under the run folder when tracking is a local SQLite file; a tracking
    server decides for itself."""
    if uri.startswith("sqlite:///"):
        return (run_dir.resolve() / "artifacts").as_uri()
    return None


def find_experiment(mlflow_client: MlflowClient | RetryingClient,
                    sweep_name: str) -> str | None:
    experiment = mlflow_client.get_experiment_by_name(sweep_name)
    return experiment.experiment_id if experiment is not None else None


def experiment_exists(uri: str, name: str) -> bool:
    """Whether the tracking store at ``uri`` has an experiment ``name``; a local store that
    does not exist yet has none (and is not created by asking)."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return False
    return find_experiment(client(uri), name) is not None


def experiment_tags(uri: str, name: str) -> dict[str, str] | None:
    """The tags of the experiment ``name`` in the store at ``uri``; None where there is none."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None
    experiment = client(uri).get_experiment_by_name(name)
    return dict(experiment.tags) if experiment is not None else None


def create_experiment(mlflow_client: RetryingClient, sweep_name: str, run_dir: Path,
                      tracking_uri: str, tags: Mapping[str, str]) -> str:
    """The sweep's experiment, made once (a repeat after a lost answer finds it)."""
    return find_or_create(
        mlflow_client, lambda: find_experiment(mlflow_client.raw, sweep_name),
        lambda: mlflow_client.raw.create_experiment(sweep_name, artifact_location=artifact_location(
            tracking_uri, run_dir), tags=dict(tags)))


def parent_run(mlflow_client: RetryingClient, experiment_id: str, sweep_name: str,
               algorithm: str) -> str:
    """The algorithm's parent run, created on first use and found again on resume."""
    def find() -> str | None:
        existing = mlflow_client.raw.search_runs(
            [experiment_id], filter_string=f"tags.`{TAG_KIND}` = 'algorithm' and "
                                           f"tags.`{TAG_ALGORITHM}` = '{algorithm}'", max_results=1)
        return existing[0].info.run_id if existing else None

    return find_or_create(mlflow_client, find, lambda: mlflow_client.raw.create_run(
        experiment_id, run_name=algorithm, tags={TAG_SWEEP: sweep_name, TAG_ALGORITHM: algorithm,
                                                 TAG_KIND: "algorithm"}).info.run_id)


def finish_parent(mlflow_client: RetryingClient, run_id: str, best: Mapping[str, Any] | None, *,
                  extra: Mapping[str, float] | None = None) -> None:
    """End an algorithm's run with its best trial; ``extra`` metrics are logged at the step
    that counts this driver's launches of the study (0 first, 1 after a ``--resume``, ...)."""
    if best:
        mlflow_client.log_batch(run_id, metrics=[Metric(f"best_{k}", float(v), 0, 0)
                                                 for k, v in best.get("metrics", {}).items()],
                                tags=[RunTag("orch.best_trial", str(best.get("number")))])
    if extra:
        logged = mlflow_client.get_run(run_id).data.metrics
        step = max((len(mlflow_client.get_metric_history(run_id, key)) for key in extra
                    if key in logged), default=0)
        now = int(time.time() * 1000)
        mlflow_client.log_batch(run_id, metrics=[Metric(k, float(v), now, step)
                                                 for k, v in extra.items()])
    mlflow_client.set_terminated(run_id, "FINISHED")


class TrialRun:
    """The nested MLflow run of one trial, used from the process that trains it.

    Metric steps logged while the trial trains (``log_metrics(..., wait=False)``) go through
    its outbox: while the tracking server is away the trial trains on and the steps are sent,
    in order and each once (MLflow keeps one copy of an identical metric), when it is back.
    Everything else waits for the server (``retry.call``)."""

    def __init__(self, uri: str, run_id: str):
        self.uri = uri
        self.client = client(uri)
        self.run_id = run_id
        # Per metric, the last step already in the run: not logged again (see ``continue_run``).
        self.logged_through: dict[str, int] = {}
        self.outbox = retry.Outbox()

    @classmethod
    def create(cls, uri: str, experiment_id: str, parent_run_id: str, *, sweep_name: str,
               algorithm: str, number: int) -> "TrialRun":
        """The trial's nested run, made once; the sweep driver makes it so that a trial whose
        process dies still has exactly one run, which the driver can mark failed."""
        mlflow_client = client(uri)

        def find() -> str | None:
            runs = trial_runs(mlflow_client.raw, experiment_id, algorithm=algorithm, number=number)
            return runs[0].info.run_id if runs else None

        run_id = find_or_create(mlflow_client, find, lambda: mlflow_client.raw.create_run(
            experiment_id, run_name=f"{algorithm}-{number}", tags={
                MLFLOW_PARENT_RUN_ID: parent_run_id, TAG_SWEEP: sweep_name,
                TAG_ALGORITHM: algorithm, TAG_TRIAL: str(number),
                TAG_KIND: "trial"}).info.run_id)
        return cls(uri, run_id)

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(k, _short(v)) for k, v in sorted(params.items())]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def continue_run(self) -> dict[str, str]:
        """Prepare to continue a run whose trial restarted: steps it already holds (logged
        before the restart, recomputed since its checkpoint) are not logged a second time, so
        every metric keeps one value per step. Returns the run's tags."""
        run = self.client.get_run(self.run_id)
        self.logged_through = {
            key: max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=-1)
            for key in run.data.metrics}
        return dict(run.data.tags)

    def log_metrics(self, metrics: Mapping[str, float], step: int, *, wait: bool = True) -> None:
        """Log ``metrics`` at ``step``; ``wait=False``: through the outbox, without waiting
        for a server that is away."""
        fresh = [Metric(k, float(v), int(time.time() * 1000), step) for k, v in metrics.items()
                 if step > self.logged_through.get(k, -1)]
        if not fresh:
            return
        if wait:
            self.flush()
            self.client.log_batch(self.run_id, metrics=fresh)
        else:
            self.outbox.send(lambda: self.client.log_batch(self.run_id, metrics=fresh))

    def flush(self) -> None:
        """Wait until every metric step in the outbox is logged."""
        self.outbox.drain()

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, _short(v)) for k, v in tags.items()])

    def log_model(self, model_folder: Path) -> str:
        """Log the saved meta-model folder as this run's pyfunc model (run artifact ``model``);
        returns its ``runs:/`` URI. Saved locally and uploaded with this run's client, so no
        process-wide MLflow state is touched."""
        with tempfile.TemporaryDirectory() as staging:
            path = Path(staging) / "model"
            mlflow.pyfunc.save_model(
                path, python_model=PyfuncMetaModel(), artifacts={"meta_model": str(model_folder)},
                pip_requirements=pip_requirements(), signature=pyfunc_signature(),
                input_example=input_example(MetaModel.load(model_folder)))
            self.client.log_artifacts(self.run_id, str(path), "model")
        uri = f"runs:/{self.run_id}/model"
        self.set_tags({TAG_MODEL_URI: uri})
        return uri

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        self.client.log_dict(self.run_id, dict(data), artifact_file)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def finish(self, state: str, reason: str = "") -> None:
        """``state``: complete, pruned or failed (MLflow FINISHED, KILLED or FAILED), once every
        metric step is logged."""
        self.flush()
        tags = {TAG_STATE: state}
        if reason:
            tags[TAG_FAIL_REASON] = reason
        self.set_tags(tags)
        status = {"complete": "FINISHED", "pruned": "KILLED"}.get(state, "FAILED")
        self.client.set_terminated(self.run_id, status)


def store_seconds(spent: Mapping[str, float]) -> dict[str, float]:
    """``retry.spent_s()`` as metrics ``store_seconds.<store>``: the seconds a trial (or, on an
    algorithm's run, the sweep driver) spent in calls to each store, waits for an outage
    included; ``..._background`` ones overlapped the work (checkpoints written while training
    went on, heartbeats)."""
    return {"store_seconds." + re.sub(r"[^a-z]+", "_", service.lower()).strip("_"): seconds
            for service, seconds in spent.items()}


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:5000]


def log_finished_run(uri: str, experiment_name: str, run_dir: Path, *, run_name: str, kind: str,
                     metrics: Mapping[str, float], params: Mapping[str, Any],
                     tags: Mapping[str, str], files: Sequence[Path]) -> str:
    """A complete run, at once, in the experiment ``experiment_name`` (created if new, tagged
    ``orch.kind``): metrics at step 0, params, tags, files as artifacts. Returns its id."""
    mlflow_client = client(uri)
    experiment = find_experiment(mlflow_client, experiment_name) or create_experiment(
        mlflow_client, experiment_name, run_dir, uri, {TAG_KIND: kind})
    run_id = mlflow_client.create_run(experiment, run_name=run_name, tags={TAG_KIND: kind}).info.run_id
    mlflow_client.log_batch(run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()],
                            params=[Param(k, str(v)[:6000]) for k, v in params.items()],
                            tags=[RunTag(k, _short(v)) for k, v in tags.items()])
    for path in files:
        mlflow_client.log_artifact(run_id, str(path))
    mlflow_client.set_terminated(run_id, "FINISHED")
    return run_id


# -- the registry ------------------------------------------------------------------------------

@dataclass
class Registration:
    name: str
    version: str
    metric: float
    champion: bool
    note: str = ""  # why it did not take the champion alias (champion.Decision.reason)


# A trial run's and a registered version's record of the model its backbone started from
# (``model.init``, ``pretrained.Init.record``): orch.init.uri, .from, .run_id and .digest (of the
# backbone weights); absent: from scratch.
TAG_INIT = "orch.init."
TAG_INIT_DIGEST = TAG_INIT + "digest"


def init_tags(record: Mapping[str, str] | None) -> dict[str, str]:
    """``orch.init.<key>`` tags of a ``pretrained.Init.record()``; none for a start from scratch."""
    return {TAG_INIT + key: value for key, value in (record or {}).items()}


def objective_tags(objectives: Sequence[str], directions: Sequence[str]) -> dict[str, str]:
    """``orch.metric``, ``orch.direction`` (the first objective's) and ``orch.objectives``."""
    return {TAG_METRIC: objectives[0], TAG_DIRECTION: directions[0],
            TAG_OBJECTIVES: ",".join(f"{n}:{d}" for n, d in zip(objectives, directions))}


def register(mlflow_client: RetryingClient, *, model_uri: str, name: str, run_id: str,
             sweep_name: str, trial: int, metric_name: str, metric: float, direction: str,
             fingerprint: str, init: Mapping[str, str] | None = None,
             objectives: Mapping[str, float] | None = None, directions: Sequence[str] = (),
             front: bool = False, may_be_champion: bool = True,
             not_champion_why: str = "") -> Registration:
    """A new version of ``name``, tagged with what it was scored on; the champion alias moves
    to it as ``champion.decide`` says (same metric, direction, task fingerprint and initial
    weights, and better), and otherwise the version records why not (``orch.champion_note``).
    ``init``: the ``pretrained.Init.record()`` of a model trained from a pretrained backbone,
    kept as ``orch.init.*`` tags. ``objectives``: each objective's value (several objectives;
    ``directions`` in the same order), ``front``: the version is on its sweep's Pareto front;
    ``may_be_champion`` False (``not_champion_why`` says why) registers it without offering it
    the alias."""
    try:
        mlflow_client.get_registered_model(name)
    except MlflowException:
        try:
            mlflow_client.create_registered_model(name, tags={TAG_METRIC: metric_name,
                                                              TAG_DIRECTION: direction})
        except MlflowException:  # another sweep created it in between
            mlflow_client.get_registered_model(name)
    # The version's source is the run's artifact folder, which a tracking server accepts.
    source = f"{mlflow_client.get_run(run_id).info.artifact_uri}/{model_uri.rsplit('/', 1)[-1]}"
    names = list(objectives or {metric_name: metric})
    tags = {"orch.sweep": sweep_name, "orch.trial": str(trial),
            **objective_tags(names, list(directions) or [direction]),
            "orch.metric_value": repr(float(metric)), "orch.task_fingerprint": fingerprint,
            **init_tags(init)}
    if objectives:
        tags.update({TAG_OBJECTIVE + key: repr(float(v)) for key, v in objectives.items()})
    if front:
        tags[TAG_FRONT] = "true"
    # Found if registered before a crash, or before an answer an outage lost.
    version = str(find_or_create(
        mlflow_client, lambda: _version_of_run(mlflow_client.raw, name, run_id),
        lambda: mlflow_client.raw.create_model_version(name, source, run_id=run_id,
                                                       tags=tags).version))
    if _is_champion(mlflow_client, name, version):
        return Registration(name, version, metric, True)
    if may_be_champion:
        decision = champion_policy.decide(champion_policy.Score.from_tags(tags),
                                          *_current_champion(mlflow_client, name))
    else:
        decision = champion_policy.Decision(False, not_champion_why)
    if decision.take:
        mlflow_client.set_registered_model_alias(name, CHAMPION, version)
    mlflow_client.set_model_version_tag(name, version, TAG_CHAMPION_NOTE, decision.reason)
    return Registration(name, version, metric, decision.take, decision.reason)


def _version_of_run(mlflow_client: MlflowClient | RetryingClient, name: str,
                    run_id: str) -> str | None:
    for version in mlflow_client.search_model_versions(f"name = '{name}'"):
        if version.run_id == run_id:
            return str(version.version)
    return None


def _is_champion(mlflow_client: RetryingClient, name: str, version: str) -> bool:
    try:
        return str(mlflow_client.get_model_version_by_alias(name, CHAMPION).version) == str(version)
    except MlflowException:
        return False


def _current_champion(mlflow_client: RetryingClient,
                      name: str) -> tuple[champion_policy.Score | None, str]:
    """What the current champion of ``name`` was scored on, and its version (None, "": none)."""
    try:
        current = mlflow_client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, ""
    return champion_policy.Score.from_tags(current.tags), str(current.version)


def promote(uri: str, name: str, version: str) -> None:
    """Move the champion alias by hand; the version must exist."""
    mlflow_client = client(require_store(uri))
    try:
        mlflow_client.get_model_version(name, version)
    except MlflowException:
        raise ModelReferenceError(f"no version {version} of registered model {name!r} in {uri} "
                                  "(see: orch models)") from None
    mlflow_client.set_registered_model_alias(name, CHAMPION, version)


def registered_models(mlflow_client: RetryingClient, prefix: str = "") -> list[dict[str, Any]]:
    rows = []
    for model in mlflow_client.search_registered_models(max_results=1000):
        if not model.name.startswith(prefix):
            continue
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for version in mlflow_client.search_model_versions(f"name = '{model.name}'"):
            held = aliases.get(str(version.version), [])
            note = "" if CHAMPION in held else version.tags.get(TAG_CHAMPION_NOTE, "")
            if CHAMPION not in held and not note and CHAMPION in (model.aliases or {}):
                holder = model.aliases[CHAMPION]
                note = (f"champion until the alias moved to v{holder}"
                        if TAG_CHAMPION_NOTE in version.tags else
                        f"registered before orch recorded why; the champion is v{holder}")
            rows.append({"name": model.name, "version": version.version,
                         "metric": version.tags.get(TAG_METRIC, ""),
                         "direction": version.tags.get(TAG_DIRECTION, ""),
                         "value": version.tags.get("orch.metric_value", ""),
                         "sweep": version.tags.get("orch.sweep", ""),
                         "front": version.tags.get(TAG_FRONT) == "true",
                         "aliases": ",".join(sorted(held)), "note": note})
    return sorted(rows, key=lambda r: (r["name"], int(r["version"])))


def delete_runs(mlflow_client: RetryingClient, run_ids: Sequence[str]) -> None:
    for run_id in run_ids:
        mlflow_client.delete_run(run_id)


def log_artifacts(mlflow_client: RetryingClient, run_id: str, paths: Sequence[Path],
                  folder: str | None = None) -> None:
    for path in paths:
        mlflow_client.log_artifact(run_id, str(path), folder)


def model_uri_of_run(mlflow_client: RetryingClient, run_id: str) -> str | None:
    """The ``runs:/`` URI of the model a trial's run logged (tag ``orch.model_uri``), if any."""
    return mlflow_client.get_run(run_id).data.tags.get(TAG_MODEL_URI)


def trial_runs(mlflow_client: MlflowClient | RetryingClient, experiment_id: str, *,
               algorithm: str | None = None, number: int | None = None) -> list[Any]:
    """The trial runs of a sweep's experiment, or of one algorithm, or of one trial (found by
    tags: the driver may have died before it noted the run id in Optuna)."""
    conditions = [f"tags.`{TAG_KIND}` = 'trial'"]
    if algorithm is not None:
        conditions.append(f"tags.`{TAG_ALGORITHM}` = '{algorithm}'")
    if number is not None:
        conditions.append(f"tags.`{TAG_TRIAL}` = '{number}'")
    return mlflow_client.search_runs([experiment_id], filter_string=" and ".join(conditions),
                                     max_results=10000)


# -- finding a logged or registered model -------------------------------------------------------

class ModelReferenceError(UserError):
    """A model URI that names nothing in the tracking store; the message is one line."""


def resolve_model(uri: str, store: str) -> ModelSource:
    """Where the ``models:/`` or ``runs:/`` URI ``uri`` points in the tracking store ``store``.
    Registry URIs are resolved to their model version first, so an evaluation can be recorded
    on that version as tags."""
    try:
        mlflow_client = client(require_store(store))
    except FileNotFoundError as error:
        raise ModelReferenceError(str(error)) from None
    try:
        if uri.startswith("runs:/"):
            run_id = uri.removeprefix("runs:/").strip("/").partition("/")[0]
            return ModelSource(uri, _run_model_location(mlflow_client, uri, store), store,
                               run_id=run_id)
        name, version = _registry_version(mlflow_client, uri, store)
        if version is None:  # models:/m-<id>, a logged model without a registered version
            logged = mlflow_client.get_logged_model(name)
            return ModelSource(uri, logged.artifact_location, store, run_id=logged.source_run_id)
        return ModelSource(uri, mlflow_client.get_model_version_download_uri(name, version), store,
                           name, version, mlflow_client.get_model_version(name, version).run_id)
    except MlflowException as error:
        raise ModelReferenceError(f"{uri}: not found in {store} ({first_line(error)})") from None


def _registry_version(mlflow_client, uri: str, store: str) -> tuple[str, str | None]:
    """(registered model name, version) of a ``models:/`` URI; (logged model id, None) for
    ``models:/m-<id>``."""
    path = uri.removeprefix("models:/").strip("/")
    name, alias, version = path, None, None
    if "@" in path:
        name, alias = path.rsplit("@", 1)
    elif "/" in path:
        name, version = path.rsplit("/", 1)
        if not version.isdigit():
            raise ModelReferenceError(f"cannot read model URI {uri!r}; use {URI_FORMS}")
    elif path.startswith("m-"):
        return path, None
    else:
        raise ModelReferenceError(f"{uri}: name a version or alias, e.g. models:/{path}@champion")
    try:
        model = mlflow_client.get_registered_model(name)
    except MlflowException:
        raise ModelReferenceError(f"no registered model {name!r} in {store} "
                                  "(see: orch models)") from None
    if alias is not None:
        aliases = dict(model.aliases or {})
        if alias not in aliases:
            known = ", ".join(f"{a} (version {v})" for a, v in sorted(aliases.items())) or "none"
            raise ModelReferenceError(f"registered model {name!r} has no alias {alias!r}; "
                                      f"aliases: {known}")
        return name, str(aliases[alias])
    try:
        mlflow_client.get_model_version(name, version)
    except MlflowException:
        versions = sorted(int(v.version) for v in mlflow_client.search_model_versions(f"name = '{name}'"))
        raise ModelReferenceError(f"registered model {name!r} has no version {version}; "
                                  f"versions: {', '.join(map(str, versions)) or 'none'}") from None
    return name, version


def _run_model_location(mlflow_client, uri: str, store: str) -> str:
    """The artifact location of ``runs:/RUN_ID/PATH``: the model logged from that run under
    that name (MLflow 3), else that path among the run's own artifacts."""
    run_id, _, path = uri.removeprefix("runs:/").strip("/").partition("/")
    path = path or "model"
    try:
        run = mlflow_client.get_run(run_id)
    except MlflowException:
        raise ModelReferenceError(f"no run {run_id!r} in {store}") from None
    logged = mlflow_client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{path}'", max_results=1)
    if logged:
        return logged[0].artifact_location
    return f"{run.info.artifact_uri.rstrip('/')}/{path}"


def download_model(source: ModelSource, folder: str) -> str:
    """Download the model's artifacts into ``folder``; returns the local path."""
    import mlflow.artifacts

    return retry.call(lambda: mlflow.artifacts.download_artifacts(
        artifact_uri=source.location, dst_path=folder, tracking_uri=source.tracking_uri),
        service=service_name(source.tracking_uri), url=source.tracking_uri, transient=transient)


def tag_model_version(source: ModelSource, tags: Mapping[str, str]) -> None:
    mlflow_client = client(source.tracking_uri)
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(source.name, source.version, key, value)


# -- the served model --------------------------------------------------------------------------

def pip_requirements() -> list[str]:
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
            "pillow", "pandas"]


def pyfunc_signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("string", "role"), ColSpec("string", "input"),
                     ColSpec("string", "label", required=False)])
    # ``std``: only for regression models whose predictions carry uncertainty (ALPaCA).
    outputs = Schema([ColSpec("string", "prediction"), ColSpec("string", "scores"),
                      ColSpec("string", "std", required=False)])
    # ``steps``: inner steps for gradient-based learners (default: as trained); ``transductive``:
    # a transductive method for the request's queries, METHOD[:KNOB=VALUE,...] or none
    # (default: the one the model was validated with).
    return ModelSignature(inputs=inputs, outputs=outputs,
                          params=ParamSchema([ParamSpec("steps", "long", None),
                                              ParamSpec("transductive", "string", None)]))


class PyfuncMetaModel(mlflow.pyfunc.PythonModel):
    """A meta-model as an MLflow pyfunc: one request holds a task.

    Input rows: ``role`` is ``support`` or ``query``; ``input`` is a JSON array of numbers
    (regression inputs) or a base64-encoded image file (PNG/JPEG, any size: the training data's
    preprocessing is applied); ``label`` is the support row's class name or JSON target.
    Output, one row per query: ``prediction`` (class name, or JSON array of values) and
    ``scores`` (JSON object class -> probability, or the values again); regression models whose
    predictions carry uncertainty (ALPaCA) add ``std``, the JSON array of predictive standard
    deviations of the values. A model validated with a transductive method classifies the
    request's queries together with it (param ``transductive`` picks another, or ``none``), so
    a request should hold the task's whole query set.
    """

    # Skip MLflow's type-hint validation: the input is a DataFrame of rows with roles, described
    # by the explicit signature of ``pyfunc_signature`` instead.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        self.model = MetaModel.load(context.artifacts["meta_model"])

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd

        steps = int(params["steps"]) if params and params.get("steps") is not None else None
        model = self.model
        if params and params.get("transductive") is not None:
            model = model.with_transduction(Transduction.parse(str(params["transductive"])))
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        support = frame[frame["role"] == "support"]
        query = frame[frame["role"] == "query"]
        support_x = decode_inputs(model, list(support["input"]))
        query_x = decode_inputs(model, list(query["input"]))
        if model.classification:
            result = model.predict(support_x, list(support["label"]), query_x, steps=steps)
            scores = result.scores.tolist()
            return pd.DataFrame({"prediction": result.labels, "scores": [
                json.dumps(dict(zip(result.classes, row))) for row in scores]})
        targets = [json.loads(label) for label in support["label"]]
        result = model.predict(support_x, targets, query_x, steps=steps)
        values = [json.dumps(row) for row in result.outputs.tolist()]
        columns = {"prediction": values, "scores": values}
        if result.std is not None:
            columns["std"] = [json.dumps(row) for row in result.std.tolist()]
        return pd.DataFrame(columns)
