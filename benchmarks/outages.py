"""How long a store may be away while a sweep runs: each store of the production configuration
taken down mid-trial for ``--seconds``, then brought back, one store at a time.

    python benchmarks/outages.py [--seconds 60] [--only postgres --only mlflow --only s3]

The stack is the one cluster/README.md starts on one machine (tests/cluster/stack.py): PostgreSQL
18 (the Optuna storage and the MLflow server's backend), ``mlflow server`` with proxied
artifacts, moto's S3 server for checkpoints, a 3-host loopback Ray cluster. For each store a
sweep of one first-order MAML trial starts as ``orch launch``; once the trial has saved its
first checkpoint the store goes away -- PostgreSQL and the MLflow server SIGKILLed (the whole
server, as a crash), the S3 server frozen with SIGSTOP (every call to it times out, as an
overloaded or partitioned object store) -- for ``--seconds``, then comes back (restarted, or
SIGCONT). Printed per store: how long it was away, whether the sweep finished with the trial
complete, its run finished and one value per metric step, and the sweep's wall time beside an
undisturbed one's. ``services.outage_s`` is left at its default (300 s).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "cluster"))

import stack  # noqa: E402 -- the services of the production configuration, as the tests start them

from orchestrator.services import tracking  # noqa: E402
from orchestrator.services import study as studies

ITERATIONS = 1500


def sweep_file(folder: Path, name: str, stores: stack.Stack, cluster: stack.Cluster) -> Path:
    raw = {"name": name, "run_dir": str(folder / "runs"), "storage": stores.storage,
           "tracking": {"uri": stores.mlflow.url}, "ray": {"address": cluster.address},
           "data": {"family": "sinusoid", "shots": 5, "queries": 5},
           "training": {"meta_batch": 8, "iterations": ITERATIONS, "eval_every": 20,
                        "eval_tasks": 20, "checkpoint_storage": stores.checkpoints(name)},
           "workers": {"count": 0, "driver_cpus": 1},
           "search": {"trials": 1, "pruner": "none"},
           "algorithms": {"fomaml": {"inner_lr": 0.01, "outer_lr": 0.003}}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def checkpointed(stores: stack.Stack, name: str) -> bool:
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=stores.s3.endpoint, scheme="http")
    try:
        return any(info.base_name.startswith("ckpt-") for info in fs.get_file_info(
            pafs.FileSelector(f"{stack.BUCKET}/{name}/{name}/fomaml/trial-00000",
                              allow_not_found=True)))
    except OSError:
        return False


def outage(stores: stack.Stack, store: str, seconds: float) -> float:
    """Take ``store`` away for ``seconds`` and bring it back; returns how long it was away."""
    went = time.monotonic()
    if store == "s3":
        stores.s3.pause()
        time.sleep(seconds)
        stores.s3.resume()
        return time.monotonic() - went
    service = stores.postgres if store == "postgres" else stores.mlflow
    service.kill()
    time.sleep(seconds)
    service.start()  # returns once it answers again
    return time.monotonic() - went


def complete(stores: stack.Stack, name: str) -> str:
    """'yes' when the trial is complete, its run finished and every metric step logged once."""
    (trial,) = studies.trial_rows(stores.storage, name)
    client = tracking.client(stores.mlflow.url)
    (run,) = tracking.trial_runs(client, client.get_experiment_by_name(name).experiment_id)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")]
    problems = [what for what, bad in (
        (f"trial {trial['state']}", trial["state"] != "complete"),
        (f"run {run.info.status}", run.info.status != "FINISHED"),
        ("a step twice", len(steps) != len(set(steps))),
        ("steps lost", sorted(steps) != list(range(20, ITERATIONS + 1, 20))))
        if bad]
    return "yes" if not problems else "no: " + ", ".join(problems)


def run(folder: Path, name: str, stores, cluster, store: str | None,
        seconds: float) -> tuple[float, float, str]:
    path = sweep_file(folder, name, stores, cluster)
    started = time.monotonic()
    launch = subprocess.Popen([sys.executable, "-m", "orchestrator.cli.main", "launch", str(path),
                               "--quiet"], cwd=folder, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    away = 0.0
    if store is not None:
        while not checkpointed(stores, name):
            if launch.poll() is not None:
                raise SystemExit(f"{name} ended before its first checkpoint")
            time.sleep(0.2)
        away = outage(stores, store, seconds)
    output, _ = launch.communicate()
    wall = time.monotonic() - started
    if launch.returncode != 0:
        return away, wall, "no: " + output.strip().splitlines()[-1]
    return away, wall, complete(stores, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--only", action="append", choices=["postgres", "mlflow", "s3"])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="orch-outages-") as folder, \
            stack.stores() as stores, \
            stack.loopback_cluster(3, 1, Path(folder) / "cluster") as cluster:
        for store in [None, *(args.only or ["postgres", "mlflow", "s3"])]:
            name = f"outage-{store or 'none'}"
            work = Path(folder) / name
            work.mkdir()
            rows.append((store, *run(work, name, stores, cluster, store, args.seconds)))
            print(f"{name}: {rows[-1][1:]}", file=sys.stderr)
    print(f"one first-order MAML trial of {ITERATIONS} iterations; services.outage_s 300 (default)\n")
    print("| store away | how | away for s | sweep finished, nothing lost | sweep wall s |")
    print("| --- | --- | --- | --- | --- |")
    how = {None: "-", "postgres": "SIGKILL, restarted", "mlflow": "SIGKILL, restarted",
           "s3": "SIGSTOP (every call times out), SIGCONT"}
    for store, away, wall, verdict in rows:
        label = {None: "none (reference)", "postgres": "PostgreSQL", "mlflow": "MLflow server",
                 "s3": "S3 (checkpoints)"}[store]
        print(f"| {label} | {how[store]} | {away:.0f} | {verdict} | {wall:.0f} |")


if __name__ == "__main__":
    main()
