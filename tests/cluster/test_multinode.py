"""orch on a real two-node Ray cluster on 127.0.0.1 (cluster/local-cluster.sh): a sweep's workers
land on both nodes with the same metric as on one node, and a worker killed with SIGKILL in the
middle of an iteration is replaced without changing the result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import yaml

from orchestrator import tracking
from orchestrator.cluster import RayFarm
from orchestrator.config import sweep_from_dict
from orchestrator.training import LocalFarm, MetaTrainer, ShardWorker

SCRIPT = Path(__file__).resolve().parents[2] / "cluster" / "local-cluster.sh"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cluster_files import _free_base, _run, _script_env  # noqa: E402


@pytest.fixture(scope="module")
def loopback_cluster(tmp_path_factory):
    """Two Ray nodes of 2 CPUs each, this test process connected as a driver."""
    state = tmp_path_factory.mktemp("cluster")
    port = _free_base(2)
    env = _script_env(state, port)
    start = _run(["start", "2", "--cpus", "2"], env, timeout=180)
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        address = start.stdout.strip().splitlines()[-1]
        exports = dict(line.removeprefix("export ").split("=", 1)
                       for line in _run(["env"], env).stdout.splitlines() if line)
        if ray.is_initialized():
            ray.shutdown()
        ray.init(address=address, log_to_driver=False)
        yield address, {**os.environ, **exports}
    finally:
        ray.shutdown()
        _run(["stop"], env, timeout=90)


def sweep_file(path: Path, run_dir: Path, *, strategy: str = "SPREAD") -> Path:
    path.write_text(yaml.safe_dump({
        "name": "multinode", "run_dir": str(run_dir),
        "data": {"family": "sinusoid", "shots": 5, "queries": 5},
        "training": {"meta_batch": 10, "iterations": 20, "eval_every": 10, "eval_tasks": 40},
        "workers": {"count": 2, "cpus": 0.5, "driver_cpus": 0.5},
        "ray": {"placement_strategy": strategy},
        "search": {"trials": 1, "parallel": 1, "pruner": "none"},
        "algorithms": {"maml": {"inner_lr": 0.01, "outer_lr": 0.003}}}))
    return path


def launch_process(args: list[str], env: dict[str, str], cwd: Path) -> str:
    result = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env, cwd=cwd,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def only_trial(run_dir: Path):
    client = tracking.client(f"sqlite:///{run_dir}/mlflow.db")
    (run,) = tracking.trial_runs(client, client.get_experiment_by_name("multinode").experiment_id)
    return run


def test_sweep_spreads_workers_over_both_nodes_with_single_node_metric(loopback_cluster, tmp_path):
    address, env = loopback_cluster
    nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    assert len(nodes) == 2
    cluster_runs, local_runs = tmp_path / "cluster-runs", tmp_path / "local-runs"
    launch_process(["launch", str(sweep_file(tmp_path / "c.yaml", cluster_runs)), "--address", address,
                    "--quiet"], env, tmp_path)
    single_env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    launch_process(["launch", str(sweep_file(tmp_path / "l.yaml", local_runs, strategy="PACK")),
                    "--quiet"], single_env, tmp_path)
    on_cluster, single = only_trial(cluster_runs), only_trial(local_runs)
    assert set(on_cluster.data.tags[tracking.TAG_NODES].split(",")) == nodes
    assert len(single.data.tags[tracking.TAG_NODES].split(",")) == 1
    assert on_cluster.data.metrics["val_loss"] == pytest.approx(single.data.metrics["val_loss"], rel=1e-5)


def test_worker_killed_mid_iteration_is_replaced_and_result_unchanged(loopback_cluster):
    knobs = {"inner_lr": 0.01, "inner_steps": 5, "outer_lr": 0.003}
    config = sweep_from_dict({"name": "kill-worker", "workers": {"count": 2, "cpus": 1},
                              "training": {"meta_batch": 40, "iterations": 6, "eval_every": 3,
                                           "eval_tasks": 40, "vectorize": "off"},
                              "algorithms": {"maml": {}}})
    expected = MetaTrainer(config, "maml", knobs, LocalFarm(
        ShardWorker(config.model_dump(), "maml", knobs))).train().final["val_loss"]

    farm = RayFarm(config.model_dump(), "maml", knobs, config.workers)
    try:
        (_, victim), _ = farm.processes()
        killed = threading.Event()

        def kill_soon(iteration: int, stats: dict) -> None:
            if iteration == 1:  # iteration 2 is in flight 50 ms from now
                threading.Timer(0.05, lambda: (os.kill(victim, signal.SIGKILL), killed.set())).start()

        started = time.monotonic()
        outcome = MetaTrainer(config, "maml", knobs, farm).train(on_iteration=kill_soon)
        assert killed.is_set()
        assert victim not in {pid for _, pid in farm.processes()}  # the actor was restarted
        assert outcome.final["val_loss"] == pytest.approx(expected, rel=1e-5)
        assert time.monotonic() - started < 120
    finally:
        farm.shutdown()
