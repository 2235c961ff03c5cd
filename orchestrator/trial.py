"""One trial, end to end, in the process that drives it (a Ray task in its placement group).

Glue only: the meta-training loop is ``training.MetaTrainer``; this file connects its callbacks to
MLflow (metric curves, the model) and Optuna (intermediate values, pruning) and picks the farm.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import cluster, plots
from orchestrator.config import Sweep
from orchestrator.meta_model import MetaModel
from orchestrator.study import TrialReporter
from orchestrator.tracking import TAG_NODES, TrialRun
from orchestrator.training import LocalFarm, MetaTrainer, ShardWorker, TrialDiverged, pick_device


@dataclass(frozen=True)
class TrialRequest:
    """Everything a trial's driver needs, as plain data (it crosses process boundaries)."""

    sweep: dict[str, Any]
    algorithm: str
    number: int
    trial_id: int
    study_name: str
    knobs: dict[str, Any]
    run_id: str
    tracking_uri: str
    storage_url: str


@dataclass(frozen=True)
class TrialResult:
    state: str  # complete, pruned or failed
    value: float | None
    metrics: dict[str, float]
    reason: str = ""
    nodes: tuple[str, ...] = ()
    tasks_per_second: float = 0.0


def make_farm(sweep: Sweep, request: TrialRequest):
    if sweep.workers.count == 0:
        device = pick_device(sweep.training.device)
        return LocalFarm(ShardWorker(request.sweep, request.algorithm, request.knobs,
                                     device=str(device)), cluster.current_node_id())
    return cluster.RayFarm(request.sweep, request.algorithm, request.knobs, sweep.workers,
                           device=sweep.training.device, group=cluster.current_placement_group())


def run_trial(request: TrialRequest) -> TrialResult:
    """Train, validate, report and log one trial; a diverging trial is returned as failed.
    Any other exception propagates, so the sweep driver can retry the trial."""
    sweep = Sweep.model_validate(request.sweep)
    run = TrialRun(request.tracking_uri, request.run_id)
    reporter = TrialReporter(request.storage_url, request.study_name, request.trial_id, sweep.search)
    farm = make_farm(sweep, request)
    try:
        nodes = tuple(farm.node_ids())
        run.set_tags({TAG_NODES: ",".join(sorted(set(nodes)))})
        trainer = MetaTrainer(sweep, request.algorithm, request.knobs, farm)

        train_curve: list[tuple[int, float]] = []
        val_curve: list[tuple[int, float]] = []

        def on_eval(iteration: int, metrics: dict[str, float]) -> bool:
            run.log_metrics(metrics, step=iteration)
            val_curve.append((iteration, metrics[sweep.search.metric]))
            return reporter.report(metrics[sweep.search.metric], iteration)

        def on_iteration(iteration: int, stats: dict[str, float]) -> None:
            train_curve.append((iteration + 1, stats["train_loss"]))
            if iteration % 10 == 0:
                run.log_metrics(stats, step=iteration + 1)

        try:
            outcome = trainer.train(on_eval, on_iteration=on_iteration)
        except TrialDiverged as error:
            run.finish("failed", str(error))
            return TrialResult("failed", None, {}, str(error), nodes)
        metrics = outcome.final
        value = metrics[sweep.search.metric]
        run.log_metrics({"tasks_per_second": outcome.tasks_per_second}, step=0)
        with tempfile.TemporaryDirectory() as folder:
            run.log_artifact(plots.learning_curves(
                train_curve, val_curve, sweep.search.metric,
                f"{request.algorithm} trial {request.number}", Path(folder) / "learning_curves.png"),
                "plots")
        if outcome.stopped_early:
            run.finish("pruned")
            return TrialResult("pruned", value, metrics, "", nodes, outcome.tasks_per_second)
        model = MetaModel.build(request.sweep, request.algorithm, request.knobs, outcome.params,
                                metric={sweep.search.metric: value})
        with tempfile.TemporaryDirectory() as folder:
            run.log_model(model.save(Path(folder) / "meta_model"))
        run.finish("complete")
        return TrialResult("complete", value, metrics, "", nodes, outcome.tasks_per_second)
    finally:
        if isinstance(farm, cluster.RayFarm):
            farm.shutdown()


def describe_failure(error: BaseException) -> str:
    """One line for the tracking store and Optuna: the innermost exception and its message."""
    cause = getattr(error, "cause", None) or error
    message = str(cause).strip().splitlines()
    last = message[-1] if message else ""
    return f"{type(cause).__name__}: {last}"[:1000]
