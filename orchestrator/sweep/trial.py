"""One trial, end to end, in the process that drives it (a Ray task in its placement group).

Glue only: the meta-training loop is ``training.MetaTrainer``; this file connects its callbacks to
MLflow (metric curves, the model), Optuna (intermediate values, pruning) and the trial's
checkpoints, and picks the farm. A trial started again -- after its node or process died, a
retry, or ``orch launch --resume`` -- continues from the checkpoint the sweep driver chose, in the
same MLflow run and the same Optuna trial, logging and reporting each step once.

While a store is away the trial trains on: its metric steps and intermediate values wait in
outboxes and its checkpoints in a background writer (``retry``), and are written once the store
is back. A store away for longer than ``services.outage_s`` ends the trial with
``retry.ServiceOutage``, which the sweep driver treats as the machinery's failure, not the
trial's: the trial stays resumable from its checkpoint.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import plots
from orchestrator.services import cluster, retry, tracking
from orchestrator.sweep import checkpoints, objectives
from orchestrator.config import Sweep
from orchestrator.training.meta_model import MetaModel
from orchestrator.training.initial import Init
from orchestrator.services.study import TrialReporter
from orchestrator.services.tracking import (TAG_DRIVER, TAG_NODES, TAG_RECOMPUTED, TAG_RESTARTS,
                                   TAG_RESUMED_FROM, TrialRun)
from orchestrator.training.loop import (LocalFarm, LoopState, MetaTrainer, ShardWorker, TrialDiverged,
                                   pick_device)


@dataclass(frozen=True)
class TrialRequest:
    """Everything a trial's driver needs, as plain data (it crosses process boundaries)."""

    sweep: dict[str, Any]
    algorithm: str
    number: int
    study_name: str
    knobs: dict[str, Any]
    run_id: str
    tracking_uri: str
    storage_url: str
    # The checkpoint to continue from (chosen and verified by the sweep driver); None: scratch.
    resume_from: str | None = None
    # ``model.init`` resolved by the sweep driver, its backbone weights included: the trial
    # never reads the init model's store or folder, which its node may not reach.
    init: Init | None = None


@dataclass(frozen=True)
class TrialResult:
    state: str  # complete, pruned or failed
    value: float | None  # the first objective's (search.metric's first)
    metrics: dict[str, float]
    reason: str = ""
    nodes: tuple[str, ...] = ()
    tasks_per_second: float = 0.0
    # A complete trial's value of each objective, in search.metric's order.
    values: tuple[float, ...] = ()


def make_farm(sweep: Sweep, request: TrialRequest):
    if sweep.workers.count == 0:
        device = pick_device(sweep.training.device)
        return LocalFarm(ShardWorker(request.sweep, request.algorithm, request.knobs,
                                     device=str(device)), cluster.current_node_id())
    return cluster.RayFarm(request.sweep, request.algorithm, request.knobs, sweep.workers,
                           device=sweep.training.device, group=cluster.current_placement_group())


def run_trial(request: TrialRequest) -> TrialResult:
    """Train, validate, report and log one trial; a diverging trial is returned as failed.
    Any other exception propagates, so the sweep driver can retry or restart the trial."""
    sweep = Sweep.model_validate(request.sweep)
    retry.configure(outage_s=sweep.services.outage_s)
    retry.reset_spent()  # a Ray worker process may have run other trials before
    run = TrialRun(request.tracking_uri, request.run_id)
    reporter = TrialReporter(request.storage_url, request.study_name, request.number, sweep.search)
    init_digest = request.init.digest if request.init else None
    saving = checkpoints.TrialCheckpoints.of(sweep, request.algorithm, request.number,
                                             request.knobs, init_digest=init_digest)
    state = resume(run, request, saving)
    farm = make_farm(sweep, request)
    try:
        nodes = tuple(farm.node_ids())
        run.set_tags({TAG_NODES: ",".join(sorted(set(nodes))),
                      TAG_DRIVER: f"{cluster.current_node_id()} {os.getpid()}"})
        trainer = MetaTrainer(sweep, request.algorithm, request.knobs, farm,
                              init=request.init.weights if request.init else None)
        extra = state.extra if state else {}
        train_curve: list[tuple[int, float]] = list(extra.get("train_curve", []))
        val_curve: list[tuple[int, float]] = list(extra.get("val_curve", []))
        # The training statistics logged every 10 iterations, kept in the checkpoint with the
        # validations (``LoopState.evaluations``): what an earlier start of the trial logged but
        # could not send before it died is sent by this one (``replay``).
        logged: list[tuple[int, dict[str, float]]] = list(extra.get("logged", []))
        metric = sweep.search.first_objective
        if state is not None:
            replay(run, reporter, state, logged, metric)

        def on_eval(iteration: int, metrics: dict[str, float]) -> bool:
            run.log_metrics(metrics, step=iteration, wait=False)
            val_curve.append((iteration, metrics[metric]))
            return reporter.report(metrics[metric], iteration)

        def on_iteration(iteration: int, stats: dict[str, float]) -> None:
            train_curve.append((iteration + 1, stats["train_loss"]))
            if iteration % 10 == 0:
                logged.append((iteration + 1, dict(stats)))
                run.log_metrics(stats, step=iteration + 1, wait=False)

        checkpointer = (checkpoints.TrialCheckpointer(saving, sweep.training)
                        if saving is not None else None)
        try:
            outcome = trainer.train(on_eval, on_iteration=on_iteration, resume=state,
                                    checkpointer=checkpointer,
                                    extra_state=lambda: {"train_curve": train_curve,
                                                         "logged": logged,
                                                         "val_curve": val_curve})
        except TrialDiverged as error:
            reporter.drain()
            run.finish("failed", str(error))
            return TrialResult("failed", None, {}, str(error), nodes)
        finally:
            if checkpointer is not None:
                checkpointer.close()
        reporter.drain()
        metrics = outcome.final
        value = metrics[metric]
        run.log_metrics({"tasks_per_second": outcome.tasks_per_second}, step=0)
        if checkpointer is not None:
            run.log_metrics({"checkpoint_seconds": checkpointer.cost_s}, step=0)
        with tempfile.TemporaryDirectory() as folder:
            run.log_artifact(plots.learning_curves(
                train_curve, val_curve, metric,
                f"{request.algorithm} trial {request.number}", Path(folder) / "learning_curves.png"),
                "plots")
        if outcome.stopped_early:
            run.finish("pruned")
            return TrialResult("pruned", value, metrics, "", nodes, outcome.tasks_per_second)
        recorded = {"init": request.init.record()} if request.init else {}
        model = MetaModel.build(request.sweep, request.algorithm, request.knobs, outcome.params,
                                **recorded)
        costs: dict[str, float] = {}
        if objectives.costs_asked(sweep):
            costs, timed_on = objectives.measure_costs(model, sweep)
            run.log_metrics(costs, step=sweep.training.iterations)
            run.set_tags({tracking.TAG_COSTS_TIMED_ON: timed_on})
        values = objectives.values(sweep.search.objectives, metrics, costs)
        model.spec["metric"] = dict(zip(sweep.search.objectives, values))
        with tempfile.TemporaryDirectory() as folder:
            run.log_model(model.save(Path(folder) / "meta_model"))
        log_store_seconds(run)
        run.finish("complete")
        return TrialResult("complete", value, metrics, "", nodes, outcome.tasks_per_second,
                           tuple(values))
    finally:
        if isinstance(farm, cluster.RayFarm):
            farm.shutdown()


def replay(run: TrialRun, reporter: TrialReporter, state: LoopState,
           logged: list[tuple[int, dict[str, float]]], metric: str) -> None:
    """Log and report what the trial's checkpoint holds and its stores do not: the metric steps
    and intermediate values an earlier start of the trial computed but could not send (its
    store was away) before it died. Steps already stored are skipped, so none is written twice."""
    for step, stats in logged:
        run.log_metrics(stats, step=step)
    for evaluation in state.evaluations:
        run.log_metrics(evaluation.metrics, step=evaluation.iteration)
        reporter.record(evaluation.metrics[metric], evaluation.iteration)


def log_store_seconds(run: TrialRun) -> None:
    """What the stores cost this start of the trial (``tracking.store_seconds``), up to here,
    the model's upload included."""
    run.log_metrics(tracking.store_seconds(retry.spent_s()), step=0)


def resume(run: TrialRun, request: TrialRequest,
           saving: checkpoints.TrialCheckpoints | None) -> LoopState | None:
    """The loop state to continue from, and the run's record of this start: a start after the
    first (the run already names a driver) counts as a restart, and the iterations done before
    it beyond the checkpoint -- as far as the run's metrics show -- as recomputed."""
    tags = run.continue_run()
    state, note = None, ""
    if request.resume_from and saving is not None:
        try:
            state = saving.load(request.resume_from)
        except checkpoints.CheckpointError as error:  # vanished or changed since the driver chose it
            note = f"; {error}; starting from scratch"
    if TAG_DRIVER not in tags:
        return state
    restarts = int(tags.get(TAG_RESTARTS, 0)) + 1
    done = max((step for key, step in run.logged_through.items()
                if key.startswith(("train_", "val_"))), default=0)
    recomputed = int(tags.get(TAG_RECOMPUTED, 0)) + max(0, done - (state.iteration if state else 0))
    run.set_tags({TAG_RESTARTS: restarts, TAG_RECOMPUTED: recomputed,
                  TAG_RESUMED_FROM: f"iteration {state.iteration if state else 0}"
                                    f"{f' ({request.resume_from})' if state else ''}{note}"})
    run.log_metrics({"restarts": restarts, "recomputed_iterations": recomputed}, step=restarts)
    return state


def describe_failure(error: BaseException) -> str:
    """One line for the tracking store and Optuna: the innermost exception and its message."""
    cause = getattr(error, "cause", None) or error
    message = str(cause).strip().splitlines()
    last = message[-1] if message else ""
    return f"{type(cause).__name__}: {last}"[:1000]
