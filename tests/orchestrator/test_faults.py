"""Faults lose nothing: diverging trials, a killed driver and --resume, two sweeps and two
promotions at once on shared stores. Real Ray, MLflow and Optuna; sweeps run as real `orch`
processes where the fault is a process's death."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from click.testing import CliRunner

from orchestrator.services import tracking
from orchestrator.cli.main import cli
from orchestrator.config import sweep_from_dict
from orchestrator.sweep.launch import launch

ORCH = [sys.executable, "-m", "orchestrator.cli.main"]


def small_sweep(name: str, run_dir: Path, *, trials: int = 3, iterations: int = 20) -> dict:
    return {"name": name, "run_dir": str(run_dir),
            "data": {"family": "sinusoid", "shots": 5, "queries": 5},
            "training": {"meta_batch": 8, "iterations": iterations, "eval_every": 10, "eval_tasks": 40},
            "workers": {"count": 0, "driver_cpus": 1},
            "search": {"trials": trials, "parallel": 1, "pruner": "none"},
            "algorithms": {"maml": {"inner_lr": {"low": 0.002, "high": 0.05, "log": True},
                                    "outer_lr": 0.003}}}


def write(path: Path, sweep: dict) -> Path:
    path.write_text(yaml.safe_dump(sweep))
    return path


FAST_HEALTH_CHECKS = {"RAY_health_check_initial_delay_ms": "0",
                      "RAY_health_check_period_ms": "500",
                      "RAY_health_check_timeout_ms": "500",
                      "RAY_health_check_failure_threshold": "2"}


def orch(*args: str, cwd: Path, extra_env: dict | None = None, **kwargs) -> subprocess.Popen:
    env = {**os.environ, **(extra_env or {}), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([*ORCH, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kwargs)


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output
    return output


def trial_states(db: Path) -> list[str]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db, timeout=1) as connection:
            return [row[0] for row in connection.execute("SELECT state FROM trials ORDER BY number")]
    except sqlite3.OperationalError:  # tables not created yet, or locked
        return []


def test_diverging_trial_fails_with_reason_and_sweep_continues(ray_local, tmp_path):
    raw = small_sweep("diverge", tmp_path / "runs", trials=1, iterations=10)
    raw["algorithms"] = {"maml": {"inner_lr": 1e4, "outer_lr": 1e3},
                         "reptile": {"inner_lr": 0.01, "inner_steps": 2, "outer_lr": 0.003}}
    maml, reptile = launch(sweep_from_dict(raw))
    assert maml.counts == {"complete": 0, "pruned": 0, "failed": 1, "unfinished": 0} and maml.registration is None
    assert reptile.counts["complete"] == 1 and reptile.registration is not None
    study = optuna.load_study(study_name="diverge/maml", storage=f"sqlite:///{tmp_path}/runs/optuna.db")
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.FAIL
    assert "meta-training loss became inf" in trial.user_attrs["fail_reason"]
    client = tracking.client(f"sqlite:///{tmp_path}/runs/mlflow.db")
    run = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED"
    assert "became inf" in run.data.tags[tracking.TAG_FAIL_REASON]


def registry_state(uri: str) -> list[tuple]:
    client = tracking.client(uri)
    rows = []
    for found in client.search_model_versions("name = 'orch-maml'"):
        version = client.get_model_version("orch-maml", found.version)  # search omits aliases
        rows.append((str(version.version), version.tags["orch.metric_value"], tuple(version.aliases)))
    return sorted(rows)


def complete_params(storage: str, name: str) -> list[tuple]:
    study = optuna.load_study(study_name=name, storage=storage)
    return sorted((round(t.params["inner_lr"], 12), round(t.value, 9)) for t in study.trials
                  if t.state == optuna.trial.TrialState.COMPLETE)


def checkpointed_iteration(run_dir: Path, sweep: str, number: int) -> int:
    """The newest checkpoint's iteration of trial ``number`` (0: none yet)."""
    folder = run_dir / "checkpoints" / sweep / "maml" / f"trial-{number:05d}"
    names = sorted(folder.glob("ckpt-*.pt")) if folder.is_dir() else []
    return int(names[-1].stem.split("-")[1]) if names else 0


def test_killed_driver_resumes_mid_trial_without_rerunning_or_duplicating(ray_local, tmp_path):
    """`orch launch` SIGKILLed (with its in-process Ray) while its second trial runs, past that
    trial's first checkpoint; `--resume` keeps the finished trial, continues the running one
    from its checkpoint in the same Optuna trial and MLflow run (one value per metric step),
    and ends with the uninterrupted sweep's trials and champion."""
    reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"
    sweep = small_sweep("kill", reference_dir, trials=2, iterations=80)
    sweep["training"].update(eval_every=20, meta_batch=10)
    resumed = write(tmp_path / "resumed.yaml", {**sweep, "run_dir": str(resumed_dir)})
    launch(sweep_from_dict(sweep))  # the uninterrupted reference, in this process's Ray

    driver = orch("launch", str(resumed), "--quiet", cwd=tmp_path)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # kill once trial 1 runs and has saved its 20th iteration
        states = trial_states(resumed_dir / "optuna.db")
        if states[:2] == ["COMPLETE", "RUNNING"] and checkpointed_iteration(resumed_dir, "kill", 1) >= 20:
            break
        assert driver.poll() is None, driver.communicate()[0]
        time.sleep(0.02)
    else:
        pytest.fail("the sweep never reached a checkpointed second trial")
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()

    refused = orch("launch", str(resumed), "--quiet", cwd=tmp_path)
    output, _ = refused.communicate(timeout=120)
    assert refused.returncode != 0 and "already exists" in output and "--resume" in output
    output = finish(orch("launch", str(resumed), "--resume", "--quiet", cwd=tmp_path))
    # The trial's process outlives its killed driver by a moment (until Ray's worker notices
    # its raylet is gone), so the checkpoint continued from may be later than the one seen.
    marker = "maml trial 1 continues from its checkpoint at iteration "
    assert marker in output, output
    saved = int(output.split(marker)[1].split()[0])
    assert 20 <= saved <= 80

    storage = f"sqlite:///{resumed_dir}/optuna.db"
    assert complete_params(storage, "kill/maml") == complete_params(
        f"sqlite:///{reference_dir}/optuna.db", "kill/maml")
    assert len(optuna.load_study(study_name="kill/maml", storage=storage).trials) == 2  # same trial
    client = tracking.client(f"sqlite:///{resumed_dir}/mlflow.db")
    experiment = client.get_experiment_by_name("kill")
    runs = tracking.trial_runs(client, experiment.experiment_id)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert len({r.data.tags[tracking.TAG_TRIAL] for r in runs}) == 2  # one run per trial
    (continued,) = [r for r in runs if r.data.tags[tracking.TAG_TRIAL] == "1"]
    assert continued.data.tags[tracking.TAG_RESUMED_FROM].startswith(f"iteration {saved} (")
    assert continued.data.tags[tracking.TAG_RESTARTS] == "1"
    for key in ("train_loss", "val_loss"):
        steps = [m.step for m in client.get_metric_history(continued.info.run_id, key)]
        assert len(steps) == len(set(steps)) and max(steps) == 80, key
    assert registry_state(f"sqlite:///{resumed_dir}/mlflow.db") == registry_state(
        f"sqlite:///{reference_dir}/mlflow.db")
    assert not any((resumed_dir / "checkpoints").rglob("*.pt"))  # finished trials keep none


def test_two_sweeps_and_two_promotions_at_once(tmp_path):
    run_dir = tmp_path / "shared-runs"
    files = [write(tmp_path / f"{name}.yaml", small_sweep(name, run_dir, trials=1, iterations=10))
             for name in ("alpha", "beta")]
    processes = [orch("launch", str(path), "--quiet", cwd=tmp_path) for path in files]
    for process in processes:
        finish(process)
    uri = f"sqlite:///{run_dir}/mlflow.db"
    client = tracking.client(uri)
    for name in ("alpha", "beta"):
        experiment = client.get_experiment_by_name(name)
        runs = tracking.trial_runs(client, experiment.experiment_id)
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        study = optuna.load_study(study_name=f"{name}/maml", storage=f"sqlite:///{run_dir}/optuna.db")
        assert [t.state.name for t in study.trials] == ["COMPLETE"]
    versions = sorted(str(v.version) for v in client.search_model_versions("name = 'orch-maml'"))
    assert versions == ["1", "2"]

    promotions = [orch("promote", "orch-maml", version, "--tracking-uri", uri, cwd=tmp_path)
                  for version in versions]
    for process in promotions:
        finish(process, timeout=120)
    # The last writer wins, so the race may leave either version as champion: one of them, and
    # only that one, holds the alias.
    aliases = client.get_registered_model("orch-maml").aliases
    assert set(aliases) == {"champion"}
    winner = str(aliases["champion"])
    assert champions(client, versions) == [winner]
    # The store still takes a promotion afterwards: the other version then holds it alone.
    (other,) = [v for v in versions if v != winner]
    tracking.promote(uri, "orch-maml", other)
    assert str(client.get_registered_model("orch-maml").aliases["champion"]) == other
    assert champions(client, versions) == [other]


def champions(client, versions: list[str]) -> list[str]:
    """The versions of orch-maml that carry the champion alias."""
    return [v for v in versions if "champion" in client.get_model_version("orch-maml", v).aliases]


def descendants(pid: int) -> list[int]:
    """Every process under ``pid``."""
    from orchestrator.services import processes

    parents = {int(p.name): (processes.stat(int(p.name)) or [0, 0])[1]
               for p in Path("/proc").iterdir() if p.name.isdigit()}
    found, frontier = [], {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if int(parent) in frontier}
        found += frontier
    return found


def test_a_lost_in_process_ray_stops_the_sweep_at_once_resumably(tmp_path):
    """The raylet of `orch launch`'s own Ray SIGKILLed mid-trial: every trial would fail the
    same way, so the sweep stops after the first, in one line, marks no trial failed and burns
    no restarts, and leaves the trial resumable ("interrupted")."""
    run_dir = tmp_path / "runs"
    path = write(tmp_path / "raylet.yaml", small_sweep("raylet", run_dir, trials=2,
                                                         iterations=20))
    # Ray's health checks tightened (as tests/cluster/stack.py does), so that Ray notices the
    # dead raylet in about a second instead of 15: how soon Ray tells is not what is tested.
    driver = orch("launch", str(path), "--quiet", cwd=tmp_path, extra_env=FAST_HEALTH_CHECKS)
    deadline = time.monotonic() + 240
    while checkpointed_iteration(run_dir, "raylet", 0) < 10:
        assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()[0]
        time.sleep(0.05)
    (raylet,) = [pid for pid in descendants(driver.pid)
                 if Path(f"/proc/{pid}/exe").resolve().name == "raylet"]
    os.kill(raylet, signal.SIGKILL)
    output, _ = driver.communicate(timeout=120)
    assert driver.returncode == 1, output
    (error,) = [line for line in output.splitlines() if line.startswith("Error:")]
    assert "lost this machine's node" in error and "LocalRayletDiedError" in error, error
    assert "nothing marked failed" in error and "--resume" in error
    assert "restart 1 of" not in output
    assert "FAIL" not in trial_states(run_dir / "optuna.db")
    listing = CliRunner().invoke(cli, ["runs", "raylet", "--storage",
                                       f"sqlite:///{run_dir}/optuna.db", "--json"])
    assert listing.exit_code == 0, listing.output
    rows = json.loads(listing.output)
    states = [row["state"] for row in rows]  # the trial it ran is no longer "running"
    assert states[-1] == "interrupted" and set(states) <= {"complete", "interrupted"}, states
    # That trial is set aside as one out of restarts is, and `--resume` finishes it the same way
    # (tests/cluster/test_preemption.py: a trial out of restarts; here only the state is checked).
