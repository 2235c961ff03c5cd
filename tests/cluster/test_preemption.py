"""A lost machine costs minutes, not the trial: on a real 3-node Ray cluster on 127.0.0.1, the node
running a trial's driver is killed (its raylet and every process of it, as a reclaimed spot
instance is), or only the trial's own process is SIGKILLed, mid-trial. The sweep finishes; the
trial is complete, not failed; it continued from a checkpoint (fewer iterations recomputed than
done) in the same MLflow run with one value per metric step; and its final metric equals that of
the same trial run uninterrupted in one process. One cluster for the module."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import optuna
import pytest
import ray
from ray.cluster_utils import Cluster

from orchestrator.services import tracking
from orchestrator.sweep import checkpoints
from orchestrator.config import sweep_from_dict
from orchestrator.sweep.launch import launch
from orchestrator.training.loop import LocalFarm, MetaTrainer, ShardWorker

KNOBS = {"inner_lr": 0.01, "inner_steps": 1, "outer_lr": 0.003}
ITERATIONS = 400
CHECKPOINT_EVERY = 40


def sweep_dict(name: str, run_dir: Path, *, workers: int = 1) -> dict:
    """One MAML sinusoid trial, every knob fixed; long enough (a few seconds) to be killed
    between its second checkpoint and its end. Its result is the same with or without a shard
    worker (tests/orchestrator/test_farm.py), so one reference serves both tests."""
    return {"name": name, "run_dir": str(run_dir),
            "data": {"family": "sinusoid", "shots": 5, "queries": 5},
            "training": {"meta_batch": 10, "iterations": ITERATIONS, "eval_every": CHECKPOINT_EVERY,
                         "eval_tasks": 20},
            "workers": {"count": workers, "cpus": 1, "driver_cpus": 1},
            "search": {"trials": 1, "pruner": "none"},
            "algorithms": {"maml": dict(KNOBS)}}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> float:
    """The trial's final val_loss, trained in this process without interruption."""
    sweep = sweep_from_dict(sweep_dict("reference", tmp_path_factory.mktemp("reference")))
    farm = LocalFarm(ShardWorker(sweep.model_dump(mode="json"), "maml", KNOBS))
    return MetaTrainer(sweep, "maml", KNOBS, farm).train().final["val_loss"]


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory) -> Iterator[Cluster]:
    """A head without CPUs (this test process drives from it, so it must survive) and two
    2-CPU worker nodes. The GCS checks nodes every 500 ms and declares one dead after two missed
    checks (Ray's defaults take about 15 s to notice a killed node)."""
    if ray.is_initialized():
        ray.shutdown()
    # A short folder: Ray's socket paths under it must fit AF_UNIX's 107 bytes, which pytest's
    # per-worker temporary folders (pytest-of-root/pytest-N/popen-gw1/...) do not leave room for.
    temp_dir = tempfile.mkdtemp(prefix="orch-ray-", dir="/tmp")
    node = dict(node_ip_address="127.0.0.1", include_dashboard=False,
                dashboard_agent_listen_port=None, temp_dir=temp_dir)
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        node, num_cpus=0, _system_config={"health_check_initial_delay_ms": 0,
                                          "health_check_period_ms": 500,
                                          "health_check_timeout_ms": 500,
                                          "health_check_failure_threshold": 2}))
    try:
        for _ in range(2):
            cluster.add_node(**node, num_cpus=2)
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def run_killing(sweep: dict, kill) -> tuple[list, list[str]]:
    """Launch ``sweep`` in a thread; once the trial has a checkpoint past its first and names
    its driver, call ``kill(node_id, pid)``; return the summaries and the notices printed."""
    config = sweep_from_dict(sweep)
    store = checkpoints.CheckpointStore(config.checkpoint_uri())
    folder = store.trial_folder(config.name, "maml", 0)
    notices: list[str] = []
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(
        summaries=launch(config, notice=notices.append)), daemon=True)
    thread.start()
    uri = config.tracking_uri()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and thread.is_alive():
        listed = store.listing(folder) if Path(folder).exists() else []
        if listed and listed[0][0] >= 2 * CHECKPOINT_EVERY:
            client = tracking.client(uri)
            (run,) = tracking.trial_runs(client, client.get_experiment_by_name(config.name).experiment_id)
            if tracking.TAG_DRIVER in run.data.tags:
                node_id, pid = run.data.tags[tracking.TAG_DRIVER].split()
                kill(node_id, int(pid))
                break
        time.sleep(0.02)
    else:
        pytest.fail("the trial ended (or never checkpointed) before it could be killed")
    thread.join(timeout=240)
    assert not thread.is_alive() and "summaries" in outcome, "the sweep did not finish"
    return outcome["summaries"], notices


def check_resumed(sweep: dict, summaries: list, notices: list[str], uninterrupted: float) -> None:
    (summary,) = summaries
    assert summary.counts == {"complete": 1, "pruned": 0, "failed": 0, "unfinished": 0}
    assert summary.restarts == 1
    assert any("restart 1 of 3" in line for line in notices), notices
    assert any("continues from its checkpoint at iteration" in line for line in notices), notices
    config = sweep_from_dict(sweep)
    (trial,) = optuna.load_study(study_name=f"{config.name}/maml",
                                 storage=config.storage_url()).trials
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert trial.value == uninterrupted  # bitwise: the same arithmetic, resumed exactly
    client = tracking.client(config.tracking_uri())
    (run,) = tracking.trial_runs(client, client.get_experiment_by_name(config.name).experiment_id)
    tags = run.data.tags
    assert run.info.status == "FINISHED" and tags[tracking.TAG_RESTARTS] == "1"
    resumed_at = int(tags[tracking.TAG_RESUMED_FROM].split()[1])
    assert resumed_at >= 2 * CHECKPOINT_EVERY
    assert 0 <= int(tags[tracking.TAG_RECOMPUTED]) < resumed_at  # fewer recomputed than done
    for key in ("val_loss", "train_loss"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)) and max(steps) == ITERATIONS, key


def test_the_trial_drivers_node_dies_and_the_trial_continues_elsewhere(three_nodes, tmp_path,
                                                                       uninterrupted):
    sweep = sweep_dict("node-lost", tmp_path / "runs")
    killed: list[str] = []

    def kill_node(node_id: str, pid: int) -> None:
        (node,) = [n for n in three_nodes.worker_nodes if n.node_id == node_id]
        three_nodes.remove_node(node, allow_graceful=False)  # SIGKILL: raylet and all its workers
        killed.append(node_id)

    summaries, notices = run_killing(sweep, kill_node)
    assert killed and any("NodeDiedError" in line or "node" in line.lower() for line in notices)
    check_resumed(sweep, summaries, notices, uninterrupted)


def test_the_trials_process_is_killed_and_the_trial_continues(three_nodes, tmp_path,
                                                              uninterrupted):
    # In-process shards here: the trial's process is all there is to kill (the node test above
    # covers the shard worker dying with it).
    sweep = sweep_dict("process-lost", tmp_path / "runs", workers=0)
    summaries, notices = run_killing(sweep, lambda node_id, pid: os.kill(pid, signal.SIGKILL))
    check_resumed(sweep, summaries, notices, uninterrupted)


def test_a_trial_out_of_restarts_is_set_aside_unfinished_not_failed(three_nodes, tmp_path,
                                                                    uninterrupted):
    """With ``search.restarts: 0`` a trial whose process dies is not restarted -- and not
    failed either: it is kept unfinished (RUNNING in Optuna, its run open, its checkpoints
    kept), the sweep says so, and a ``--resume`` finishes it where it was."""
    sweep = sweep_dict("no-restarts", tmp_path / "runs", workers=0)
    sweep["search"]["restarts"] = 0
    summaries, notices = run_killing(sweep, lambda node_id, pid: os.kill(pid, signal.SIGKILL))
    (summary,) = summaries
    assert summary.counts == {"complete": 0, "pruned": 0, "failed": 0, "unfinished": 1}
    assert summary.registration is None
    assert any("set aside unfinished, for orch launch --resume" in line for line in notices)
    config = sweep_from_dict(sweep)
    (trial,) = optuna.load_study(study_name="no-restarts/maml", storage=config.storage_url()).trials
    assert trial.state == optuna.trial.TrialState.RUNNING

    (summary,) = launch(config, resume=True)
    assert summary.counts["complete"] == 1 and summary.registration is not None
    (trial,) = optuna.load_study(study_name="no-restarts/maml", storage=config.storage_url()).trials
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == uninterrupted
