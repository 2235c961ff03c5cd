"""What the stores add to a trial: the laptop defaults against the production configuration, at
1, 4 and 16 trials in parallel, measured side by side in one run.

    python benchmarks/stores.py [--parallel 1,4,16] [--iterations 40]

Each configuration runs the same sweep -- first-order MAML on sinusoid, ``--iterations`` per
trial, a validation and a checkpoint every 10, ``workers.count: 0``, a tenth of a CPU per trial
so that 16 fit -- as a real ``orch launch``:

- laptop: the embedded defaults, Ray in the ``orch launch`` process, Optuna and MLflow in SQLite
  files, checkpoints in a local folder;
- production: PostgreSQL 18 as the Optuna storage and the backend of an ``mlflow server`` that
  proxies artifacts, checkpoints on moto's S3 server, and a 3-host loopback Ray cluster
  (``orch cluster up --distinct-hosts``, 2 CPUs per node), started as tests/cluster/stack.py
  starts them (the commands of cluster/README.md).

Per trial it prints medians over the sweep's trials of what orch logs on every trial run: the
seconds its process spent in calls to the Optuna storage, the MLflow tracking store and the
checkpoint store (``store_seconds.*``; checkpoints on an object store are written in the
background while training goes on, shown apart), the sweep driver's store seconds (logged on
the algorithm's run) divided by the trials, and the trial's wall time (its run's start to end).
The settings take turns in the order given; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
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

ALGORITHM = "fomaml"


def sweep_file(folder: Path, name: str, *, parallel: int, iterations: int,
               production: tuple[stack.Stack, stack.Cluster] | None) -> Path:
    raw = {"name": name, "run_dir": str(folder / "runs"),
           "data": {"family": "sinusoid", "shots": 5, "queries": 5},
           "training": {"meta_batch": 8, "iterations": iterations, "eval_every": 10,
                        "eval_tasks": 20},
           "workers": {"count": 0, "driver_cpus": 0.1},
           "search": {"trials": max(4, parallel), "parallel": parallel, "pruner": "none"},
           "algorithms": {ALGORITHM: {"inner_lr": {"low": 0.002, "high": 0.05, "log": True},
                                      "outer_lr": 0.003}}}
    if production is not None:
        stores, cluster = production
        raw.update(storage=stores.storage, tracking={"uri": stores.mlflow.url},
                   ray={"address": cluster.address})
        raw["training"]["checkpoint_storage"] = stores.checkpoints(name)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def launch(path: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli.main", "launch", str(path), "--quiet"],
                          cwd=path.parent, capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode != 0:
        raise SystemExit(f"orch launch {path} failed:\n{done.stdout}{done.stderr}")
    return time.perf_counter() - started


def measured(uri: str, name: str) -> dict[str, float]:
    """Medians per trial of the sweep ``name``'s store seconds and wall time."""
    client = tracking.client(uri)
    experiment = client.get_experiment_by_name(name).experiment_id
    runs = tracking.trial_runs(client, experiment)
    parent = client.get_run(tracking.parent_run(client, experiment, name, ALGORITHM))
    keys = sorted({key for run in runs for key in run.data.metrics if key.startswith("store_")})
    row = {key: statistics.median(run.data.metrics.get(key, 0.0) for run in runs) for key in keys}
    driver = {k: v for k, v in parent.data.metrics.items()
              if k.startswith("store_") and not k.endswith("_background")}  # heartbeats overlap
    row["driver"] = sum(driver.values()) / len(runs)
    row["wall"] = statistics.median((r.info.end_time - r.info.start_time) / 1000 for r in runs)
    return row


# Columns: a store's metrics under one name (SQLite's tracking store and the tracking server are
# both "MLflow"), in the order printed.
COLUMNS = {"store_seconds.optuna_storage": "Optuna",
           "store_seconds.mlflow_tracking_store": "MLflow",
           "store_seconds.mlflow_tracking_server": "MLflow",
           "store_seconds.checkpoint_store": "checkpoints",
           "store_seconds.checkpoint_store_background": "checkpoints, background",
           "store_seconds.optuna_storage_background": "heartbeats, background"}


def by_column(row: dict[str, float]) -> dict[str, float]:
    merged: dict[str, float] = {}
    for key, value in row.items():
        if key in COLUMNS:
            merged[COLUMNS[key]] = merged.get(COLUMNS[key], 0.0) + value
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parallel", default="1,4,16")
    parser.add_argument("--iterations", type=int, default=40)
    args = parser.parse_args()
    settings = [int(p) for p in args.parallel.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="orch-stores-") as folder, stack.stores() as stores, \
            stack.loopback_cluster(3, 2, Path(folder) / "cluster") as cluster:
        for parallel in settings:
            for label, production in (("laptop", None), ("production", (stores, cluster))):
                name = f"{label}-{parallel}"
                work = Path(folder) / name
                work.mkdir()
                path = sweep_file(work, name, parallel=parallel, iterations=args.iterations,
                                  production=production)
                seconds = launch(path)
                uri = stores.mlflow.url if production else f"sqlite:///{work / 'runs' / 'mlflow.db'}"
                rows.append((parallel, label, seconds, measured(uri, name)))
                print(f"{name}: sweep {seconds:.1f} s", file=sys.stderr)
    columns = [c for c in dict.fromkeys(COLUMNS.values())
               if any(c in by_column(row) for *_, row in rows)]
    print(f"{ALGORITHM} on sinusoid, {args.iterations} iterations per trial; a trial's seconds in "
          "calls to each store (medians over the sweep's trials)\n")
    print("| parallel | stores | " + " | ".join(columns)
          + " | driver's store s / trial | trial wall s | sweep wall s |")
    print("|" + " --- |" * (len(columns) + 5))
    for parallel, label, seconds, row in rows:
        merged = by_column(row)
        cells = [f"{merged.get(c, 0.0):.3f}" for c in columns]
        print(f"| {parallel} | {label} | " + " | ".join(cells)
              + f" | {row['driver']:.3f} | {row['wall']:.2f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
