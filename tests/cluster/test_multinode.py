"""orch on a real two-node Ray cluster on 127.0.0.1 (`orch cluster up`), used as a user would:
`orch launch --address` with exactly the address `up` printed and no Ray variables in the
environment. The quickstart's workers land on both nodes with the same metric as in one process;
a worker killed with SIGKILL mid-iteration is replaced without changing the result; `orch cluster
down` ends every process of the cluster and nothing else. One cluster for the whole module."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import ray
import yaml

from orchestrator.services import tracking
from orchestrator.services.cluster import RayFarm
from orchestrator.config import sweep_from_dict
from orchestrator.training.loop import LocalFarm, MetaTrainer, ShardWorker

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_connect import orch, user_env  # noqa: E402


def free_port() -> int:
    """A port in 20000-29999: clear of Ray's default worker ports and the ephemeral range."""
    for port in range(20000 + (os.getpid() % 500) * 19, 30000, 19):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port in 20000-29999")


def cluster_command(*args: str, state: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(orch("cluster", *args, "--state-dir", str(state)), env=user_env(),
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def loopback_cluster(tmp_path_factory) -> Iterator[tuple[str, list[str], Path]]:
    """Two Ray nodes of 2 CPUs each; this test process connected to them as a driver."""
    state = tmp_path_factory.mktemp("cluster-state")
    up = cluster_command("up", "--nodes", "2", "--cpus", "2", "--port", str(free_port()),
                         state=state, timeout=240)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        lines = up.stdout.strip().splitlines()
        address, node_ids = lines[-1], [line.split()[0] for line in lines[:-1]]
        assert address.startswith("127.0.0.1:") and len(set(node_ids)) == 2
        if ray.is_initialized():
            ray.shutdown()
        ray.init(address=address, log_to_driver=False)
        yield address, node_ids, state
    finally:
        ray.shutdown()
        cluster_command("down", state=state, timeout=90)


def quickstart(path: Path, run_dir: Path, *, strategy: str, only: str | None = None) -> Path:
    """examples/quickstart.yaml, one short trial per algorithm (or of algorithm ``only``)."""
    sweep = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    sweep.update(name="multinode", run_dir=str(run_dir), ray={"placement_strategy": strategy})
    if only:
        sweep["algorithms"] = {only: sweep["algorithms"][only]}
    sweep["training"].update(meta_batch=10, iterations=10, eval_every=10, eval_tasks=20)
    sweep["search"].update(trials=1, pruner="none")
    path.write_text(yaml.safe_dump(sweep))
    return path


def launch(args: list[str], cwd: Path) -> None:
    result = subprocess.run(orch("launch", *args, "--quiet"), env=user_env(), cwd=cwd,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


def trial_runs(run_dir: Path) -> dict[str, object]:
    client = tracking.client(f"sqlite:///{run_dir}/mlflow.db")
    runs = tracking.trial_runs(client, client.get_experiment_by_name("multinode").experiment_id)
    return {run.data.params["algorithm"]: run for run in runs}


def test_quickstart_runs_on_both_nodes_at_the_printed_address(loopback_cluster, tmp_path):
    address, node_ids, _ = loopback_cluster
    cluster_runs = tmp_path / "cluster-runs"
    # MAML's trial of the quickstart only: the other two algorithms take the same path and would
    # add two minutes to CI.
    sweep_file = quickstart(tmp_path / "c.yaml", cluster_runs, strategy="SPREAD", only="maml")
    launch([str(sweep_file), "--address", address], tmp_path)
    on_cluster = trial_runs(cluster_runs)
    assert set(on_cluster) == {"maml"}
    run = on_cluster["maml"]
    assert set(run.data.tags[tracking.TAG_NODES].split(",")) == set(node_ids)
    # The same trial (the knobs Optuna gave it) in this one process reaches the same metric.
    config = sweep_from_dict(yaml.safe_load(sweep_file.read_text()))
    knobs = {name: json.loads(run.data.params[name]) for name in config.space("maml")}
    alone = MetaTrainer(config, "maml", knobs, LocalFarm(
        ShardWorker(config.model_dump(), "maml", knobs))).train().final["val_loss"]
    assert run.data.metrics["val_loss"] == pytest.approx(alone, rel=1e-5)


def cpu_ticks(pid: int) -> int:
    """User plus system CPU time of process ``pid``, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def test_worker_killed_mid_iteration_is_replaced_and_result_unchanged(loopback_cluster):
    knobs = {"inner_lr": 0.01, "inner_steps": 5, "outer_lr": 0.003}
    config = sweep_from_dict({"name": "kill-worker", "workers": {"count": 2, "cpus": 1},
                              "training": {"meta_batch": 80, "iterations": 6, "eval_every": 3,
                                           "eval_tasks": 40, "vectorize": "off"},
                              "algorithms": {"maml": {}}})
    expected = MetaTrainer(config, "maml", knobs, LocalFarm(
        ShardWorker(config.model_dump(), "maml", knobs))).train().final["val_loss"]

    farm = RayFarm(config.model_dump(), "maml", knobs, config.workers)
    try:
        (_, victim), _ = farm.processes()
        killed = threading.Event()
        killed_before_iteration_2_ended: list[bool] = []

        def kill_in_flight() -> None:
            """Kill the worker once it has computed 30 ms of iteration 2 (sampling ahead takes
            a few ms; its 40 tasks' gradients over 100 ms): the kill lands mid-computation."""
            start = cpu_ticks(victim)
            while cpu_ticks(victim) < start + 3:
                time.sleep(0.002)
            os.kill(victim, signal.SIGKILL)
            killed.set()

        def on_iteration(iteration: int, stats: dict) -> None:
            if iteration == 1:
                threading.Thread(target=kill_in_flight, daemon=True).start()
            if iteration == 2:
                killed_before_iteration_2_ended.append(killed.is_set())

        started = time.monotonic()
        outcome = MetaTrainer(config, "maml", knobs, farm).train(on_iteration=on_iteration)
        # Iteration 2 could only end after the kill if the kill hit its computation.
        assert killed_before_iteration_2_ended == [True]
        assert victim not in {pid for _, pid in farm.processes()}  # the actor was restarted
        assert outcome.final["val_loss"] == pytest.approx(expected, rel=1e-5)
        assert time.monotonic() - started < 120
    finally:
        farm.shutdown()


OTHER_RAY = textwrap.dedent("""
    import sys, time
    import ray
    ray.init(address="local", num_cpus=1, include_dashboard=False, _temp_dir=sys.argv[1])
    print("ready", flush=True)
    time.sleep(600)
""")


def _stat(pid: int) -> list[str] | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields


def _session(sid: int) -> dict[int, str]:
    """Live processes of session ``sid`` with their start times."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) and int(fields[3]) == sid:
            found[int(entry.name)] = fields[19]
    return found


def test_down_ends_every_process_of_the_cluster_and_nothing_else(loopback_cluster, tmp_path):
    """Runs last: it stops the module's cluster."""
    address, node_ids, state = loopback_cluster
    status = cluster_command("status", state=state)
    assert status.returncode == 0 and address in status.stdout and status.stdout.count("ALIVE") == 2

    temp = f"/tmp/orch-other-{os.getpid()}"
    other = subprocess.Popen([sys.executable, "-c", OTHER_RAY, temp],
                             env={**user_env(), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                                  "RAY_AUTH_MODE": "disabled"},
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             start_new_session=True)
    try:
        assert other.stdout.readline().strip() == "ready"
        others = _session(other.pid)
        assert len(others) >= 3  # the python, its GCS and raylet at least

        ray.shutdown()  # this process's driver connection goes first
        supervisor = int(yaml.safe_load((state / "cluster.json").read_text())["pid"])
        ours = _session(supervisor)
        assert len(ours) >= 5  # the supervisor, a GCS, two raylets and more
        started = time.monotonic()
        down = cluster_command("down", state=state, timeout=90)
        assert down.returncode == 0, down.stderr
        assert time.monotonic() - started < 60
        left = {pid: st for pid, st in ours.items() if (fields := _stat(pid)) and fields[19] == st}
        assert left == {}, f"still running after down: {left}"
        assert not (state / "cluster.json").exists()
        assert cluster_command("status", state=state).returncode == 1
        # The unrelated Ray is untouched.
        assert other.poll() is None and _session(other.pid) == others
    finally:
        try:
            os.killpg(other.pid, signal.SIGTERM)  # its own session: only what this test started
            other.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(other.pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", temp])
