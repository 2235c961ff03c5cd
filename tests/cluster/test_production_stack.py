"""The production configuration, run for real on one machine, under faults and load.

One stack for the module (tests/cluster/stack.py): PostgreSQL 18 as the Optuna storage and as the
backend of an ``mlflow server`` that proxies artifacts, checkpoints on moto's S3 server, and a
3-node Ray cluster from ``orch cluster up --distinct-hosts`` whose nodes are the hosts 127.0.0.1,
127.0.0.2 and 127.0.0.3 -- so orch's multi-host rules hold (SQLite and local folders refused) and
the sweep uses the services, as on a real cluster. Sweeps run as real ``orch launch`` processes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import optuna
import pyarrow.fs as pafs
import pytest
import yaml

import stack
from orchestrator.services import tracking
from orchestrator.config import Choices, Range, sweep_from_dict
from orchestrator.training.loop import LocalFarm, MetaTrainer, ShardWorker

ORCH = [sys.executable, "-m", "orchestrator.cli.main"]
CHECKPOINT_EVERY = 20


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Iterator[tuple[stack.Stack, stack.Cluster]]:
    """The stores and a 3-host loopback cluster of one CPU per node, stopped on the way out."""
    with stack.stores() as stores, stack.loopback_cluster(
            3, 1, tmp_path_factory.mktemp("cluster-state")) as cluster:
        yield stores, cluster


def sweep(name: str, folder: Path, deployment, *, algorithms: dict, trials: int, parallel: int,
          iterations: int, outage_s: float = 300, driver_cpus: float = 1) -> Path:
    stores, cluster = deployment
    raw = {"name": name, "run_dir": str(folder / "runs"), "storage": stores.storage,
           "tracking": {"uri": stores.mlflow.url, "registry_prefix": f"{name}-"},
           "ray": {"address": cluster.address},
           "data": {"family": "sinusoid", "shots": 5, "queries": 5},
           "training": {"meta_batch": 8, "iterations": iterations, "eval_every": CHECKPOINT_EVERY,
                        "eval_tasks": 20, "checkpoint_storage": stores.checkpoints(name)},
           "workers": {"count": 0, "driver_cpus": driver_cpus},
           "search": {"trials": trials, "parallel": parallel, "pruner": "none"},
           "services": {"outage_s": outage_s},
           "algorithms": algorithms}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def orch(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([*ORCH, *args], cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"orch launch did not end within {timeout} s:\n{output}")
    return process.returncode, output


def kill(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()


def trials(storage: str, name: str, algorithm: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name=f"{name}/{algorithm}", storage=storage).trials
    except KeyError:  # not created yet
        return []


def checkpointed(stores: stack.Stack, name: str, algorithm: str, number: int, *,
                 at_least: int) -> bool:
    """Whether the trial has a checkpoint of iteration ``at_least`` or later on the S3 server."""
    fs = pafs.S3FileSystem(endpoint_override=stores.s3.endpoint, scheme="http")
    folder = f"{stack.BUCKET}/{name}/{name}/{algorithm}/trial-{number:05d}"
    try:
        infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    except OSError:
        return False
    return any(info.base_name.startswith("ckpt-") and int(info.base_name[5:13]) >= at_least
               for info in infos)


def checkpointed_on(stores, node_id: str, name: str, algorithm: str) -> bool:
    """Whether a trial whose process runs on the node ``node_id`` has saved a checkpoint."""
    client = tracking.client(stores.mlflow.url)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return False
    return any(run.data.tags.get(tracking.TAG_DRIVER, "").startswith(node_id) and checkpointed(
        stores, name, algorithm, int(run.data.tags[tracking.TAG_TRIAL]), at_least=CHECKPOINT_EVERY)
        for run in tracking.trial_runs(client, experiment.experiment_id, algorithm=algorithm))


def wait_for(condition, what: str, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"orch launch ended before {what}:\n{process.communicate()[0]}")
        if time.monotonic() > deadline:
            kill(process)
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def running_with_checkpoints(stores, name: str, algorithm: str, count: int, *,
                             at_least: int = CHECKPOINT_EVERY) -> bool:
    """Whether ``count`` trials of the study are running with a checkpoint of iteration
    ``at_least`` or later."""
    found = [t for t in trials(stores.storage, name, algorithm)
             if t.state == optuna.trial.TrialState.RUNNING]
    return sum(checkpointed(stores, name, algorithm, t.number, at_least=at_least)
               for t in found) >= count


def check_every_trial_complete_once(stores, config, *, expected: int) -> dict[str, list]:
    """Every trial COMPLETE (no other state, none twice); one FINISHED run per trial with one
    value per metric step. Returns the trials per algorithm."""
    found = {}
    client = tracking.client(stores.mlflow.url)
    experiment = client.get_experiment_by_name(config.name).experiment_id
    for algorithm in config.algorithms:
        done = trials(stores.storage, config.name, algorithm)
        assert [t.state for t in done] == [optuna.trial.TrialState.COMPLETE] * expected, algorithm
        runs = tracking.trial_runs(client, experiment, algorithm=algorithm)
        assert sorted(int(r.data.tags[tracking.TAG_TRIAL]) for r in runs) == list(range(expected))
        for run in runs:
            assert run.info.status == "FINISHED"
            for key in ("val_loss", "train_loss"):
                steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
                assert len(steps) == len(set(steps)), (algorithm, key, steps)
                assert max(steps) == config.training.iterations, (algorithm, key, steps,
                                                                   run.data.tags)
        found[algorithm] = done
    return found


def uninterrupted_value(config, algorithm: str, params: dict) -> float:
    """The trial's final metric, trained undisturbed in this process."""
    knobs = {**{k: v for k, v in config.space(algorithm).items()
                if not isinstance(v, (Range, Choices))}, **params}
    farm = LocalFarm(ShardWorker(config.model_dump(mode="json"), algorithm, knobs))
    return MetaTrainer(config, algorithm, knobs, farm).train().final[config.search.metric]


def test_a_sweep_survives_each_store_a_node_and_its_driver_failing(deployment, tmp_path):
    """MAML then first-order MAML, 3 trials each, 3 at a time. While the MAML trials run, a
    worker host dies (its trial restarts elsewhere), the MLflow server and then PostgreSQL are
    killed and restarted; then, with a trial past its second checkpoint, `orch launch` is
    SIGKILLed and `--resume`d."""
    stores, cluster = deployment
    space = {"inner_lr": {"low": 0.002, "high": 0.05, "log": True}, "outer_lr": 0.003}
    path = sweep("faults", tmp_path, deployment, algorithms={"maml": space, "fomaml": space},
                 trials=3, parallel=3, iterations=200)
    config = sweep_from_dict(yaml.safe_load(path.read_text()))
    launch = orch("launch", str(path), "--quiet", cwd=tmp_path)
    wait_for(lambda: checkpointed_on(stores, cluster.node_ids["127.0.0.3"], "faults", "maml"),
             "a MAML trial on 127.0.0.3 with a checkpoint", launch)
    assert stack.kill_node("127.0.0.3") > 0
    stores.mlflow.kill()
    time.sleep(2)
    stores.mlflow.start()
    stores.postgres.kill()
    time.sleep(2)
    stores.postgres.start()
    wait_for(lambda: any(running_with_checkpoints(stores, "faults", algorithm, 1,
                                                  at_least=2 * CHECKPOINT_EVERY)
                         for algorithm in ("maml", "fomaml")),
             "a trial past its second checkpoint", launch)
    kill(launch)
    status, output = finish(orch("launch", str(path), "--quiet", "--resume", cwd=tmp_path))
    assert status == 0, output
    assert "continues from its checkpoint" in output

    done = check_every_trial_complete_once(stores, config, expected=3)
    client = tracking.client(stores.mlflow.url)
    experiment = client.get_experiment_by_name("faults").experiment_id
    restarted = [r for r in tracking.trial_runs(client, experiment, algorithm="maml")
                 if int(r.data.tags.get(tracking.TAG_RESTARTS, 0)) > 0]
    assert restarted, "no MAML trial was restarted after its host died"
    for algorithm, found in done.items():
        versions = client.search_model_versions(f"name = 'faults-{algorithm}'")
        assert len(versions) == 1  # one registered version per algorithm's winner
        best = min(found, key=lambda t: t.value)
        champion = client.get_model_version_by_alias(f"faults-{algorithm}", "champion")
        assert champion.tags["orch.trial"] == str(best.number)
        # The champion is what an undisturbed training gives: its trial's knobs trained
        # without a fault end at the same value, bitwise.
        assert uninterrupted_value(config, algorithm, best.params) == best.value


def test_an_outage_past_the_bound_stops_the_sweep_resumably(deployment, tmp_path):
    """PostgreSQL (and with it the MLflow server's database) away for longer than
    services.outage_s: one line naming the store, a non-zero exit, no trial marked failed; back
    and `--resume`d, the sweep finishes with nothing lost."""
    stores, _ = deployment
    path = sweep("outage", tmp_path, deployment, trials=1, parallel=1, iterations=800,
                 outage_s=6, algorithms={"fomaml": {"inner_lr": 0.01, "outer_lr": 0.003}})
    config = sweep_from_dict(yaml.safe_load(path.read_text()))
    launch = orch("launch", str(path), "--quiet", cwd=tmp_path)
    wait_for(lambda: running_with_checkpoints(stores, "outage", "fomaml", 1),
             "the trial's first checkpoint", launch)
    stores.postgres.kill()
    try:
        status, output = finish(launch, timeout=120)
    finally:
        stores.postgres.start()
    assert status != 0
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, output
    assert ("Optuna storage at postgresql://orch@127.0.0.1" in errors[0]
            or f"MLflow tracking server at {stores.mlflow.url}" in errors[0]), errors
    assert "did not answer for" in errors[0] and "--resume" in errors[0]
    (trial,) = trials(stores.storage, "outage", "fomaml")
    assert trial.state == optuna.trial.TrialState.RUNNING  # kept for --resume, not failed

    status, output = finish(orch("launch", str(path), "--quiet", "--resume", cwd=tmp_path))
    assert status == 0, output
    check_every_trial_complete_once(stores, config, expected=1)


def test_sixteen_trials_at_once_on_the_stack(deployment, tmp_path):
    """Load: 16 trials in parallel (a tenth of a CPU each, oversubscribing the 3 CPUs): no lock
    error, no trial, run, metric step or registered version lost or doubled."""
    stores, _ = deployment
    path = sweep("load", tmp_path, deployment, trials=16, parallel=16, iterations=20,
                 driver_cpus=0.1,
                 algorithms={"fomaml": {"inner_lr": {"low": 0.002, "high": 0.05, "log": True},
                                        "outer_lr": 0.003}})
    config = sweep_from_dict(yaml.safe_load(path.read_text()))
    status, output = finish(orch("launch", str(path), "--quiet", cwd=tmp_path), timeout=400)
    assert status == 0, output
    check_every_trial_complete_once(stores, config, expected=16)
    versions = tracking.client(stores.mlflow.url).search_model_versions("name = 'load-fomaml'")
    assert len(versions) == 1


def test_the_loopback_hosts_are_held_to_the_rules_of_a_real_cluster(deployment, tmp_path):
    """The nodes of `orch cluster up --distinct-hosts` are three hosts to orch: a SQLite store or
    a local checkpoint folder is refused before anything is written, as on a real cluster."""
    path = sweep("rules", tmp_path, deployment, trials=1, parallel=1, iterations=20,
                 algorithms={"fomaml": {}})
    raw = yaml.safe_load(path.read_text())
    # Three hosts, or two once the faults test has killed 127.0.0.3.
    hosts = r"the Ray cluster spans [23] hosts \(127\.0\.0\.1, 127\.0\.0\.2(, 127\.0\.0\.3)?\)"
    for change, refused in (
            ({"storage": None}, "Optuna storage sqlite:///"),
            ({"training": {**raw["training"], "checkpoint_storage": str(tmp_path / "ckpt")}},
             "checkpoint storage /")):
        path.write_text(yaml.safe_dump({**raw, **change}))
        status, output = finish(orch("launch", str(path), "--quiet", cwd=tmp_path), timeout=120)
        assert status == 1 and re.search(f"{hosts} but the {re.escape(refused)}", output), output
        assert not (tmp_path / "runs").exists()  # nothing written
